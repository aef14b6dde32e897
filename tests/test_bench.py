"""The benchmark command runs end to end on a tiny load, so it cannot rot (it measures; tests check)."""

from __future__ import annotations

import json

from bench.__main__ import main


def test_bench_quick_run_writes_the_report_table_and_plot(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    assert results["limit"]["pipeline_images_per_s"] > 0
    assert [r["concurrency"] for r in results["service"]] == [1, 4]
    half = results["half_peak_open_loop"]  # p99 at an arrival rate, not at a number of clients
    peak = max(r["throughput"] for r in results["service"])
    assert half["rate"] == peak / 2 and half["sent"] > 0 and half["errors"] == 0
    assert results["ratios"]["p99_half_peak_vs_lone"] == half["p99_ms"] / results["service"][0]["p50_ms"]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in results["service"] + results["per_request"])
    report = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## Summary", "## The limit", "## The service", "## The per-request approach"):
        assert heading in report
    assert (tmp_path / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"
