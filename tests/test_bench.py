"""The benchmark command runs end to end on a tiny load, so it cannot rot (it measures; tests check)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import main

FAST_MODEL = Path(__file__).resolve().parents[1] / "models" / "boneage-fast.onnx"


@pytest.mark.alone
def test_bench_quick_run_writes_the_report_table_and_plot(tmp_path):
    # The command is checked, not the bundled model's speed: the faster model keeps this short.
    assert main(["--quick", "--repeats", "2", "--model", str(FAST_MODEL), "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    assert results["limit"]["pipeline_images_per_s"] > 0 and results["limit"]["pipeline_spread"]["n"] == 2
    assert [r["concurrency"] for r in results["service"]] == [1, 4]
    assert len(results["service_runs"]) == len(results["per_request_runs"]) == 2
    for run, half in zip(results["service_runs"], results["half_peak_open_loop_runs"], strict=True):
        peak = max(r["throughput"] for r in run)  # p99 at an arrival rate (half this repeat's peak), not clients
        assert half["rate"] == peak / 2 and half["sent"] > 0 and half["errors"] == 0
    runs = zip(results["service_runs"], results["half_peak_open_loop_runs"], strict=True)
    ratios = [half["p99_ms"] / run[0]["p50_ms"] for run, half in runs]
    assert results["ratios"]["p99_half_peak_vs_lone"] == sum(ratios) / 2  # the median of two repeats
    # The load generator's own CPU is measured, and the accounted ratio takes it out of the limit.
    assert all(r["client_cores"] > 0 for r in results["service"])
    assert results["ratios"]["service_vs_limit"] > results["ratios"]["service_vs_limit_raw"]["median"]
    assert all(r["errors"] == 0 and r["requests"] > 0 for r in results["service"] + results["per_request"])
    report = (tmp_path / "benchmarks.md").read_text()
    for heading in ("## Summary", "## The limit", "## The service", "## The per-request approach"):
        assert heading in report
    assert (tmp_path / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"
