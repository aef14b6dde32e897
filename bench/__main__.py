"""Benchmarks: the service against the bare runtime (the limit) and the per-request approach.

    python -m bench                      # full run, writes docs/benchmarks.{md,png,json}
    python -m bench --quick --out DIR    # seconds-long smoke run (the test suite runs this)

Everything is measured in one run on one machine, on real radiographs from
$BONEAGE_DATA_DIR (half- and full-resolution RSNA sets), with the bundled model. On a machine
with a usable GPU the same command uses the CUDA provider (BONEAGE_PROVIDERS=auto).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from app.config import BUNDLED_MODEL
from app.inference import Model
from bench import load, server
from radiograph import decode, preprocess
from radiograph.preprocess import load_model_input
from training.data import data_root

#: Issue 14: decode + preprocess per half-resolution image, one thread.
STAGES_TARGET_MS = 4.0
TARGETS = {"service_vs_limit": 0.9, "service_vs_per_request": 8.0, "p99_half_peak_vs_lone": 2.0}


def _cpuinfo_lines() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.exists() else []


def machine() -> dict:
    import onnxruntime as ort

    cpuinfo = _cpuinfo_lines()
    cpu = (
        next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
        if cpuinfo
        else ""
    )
    # The vector units decide how fast the convolutions run (ONNX Runtime's float32 and int8 kernels
    # differ by several times between AVX2 and AVX-512 VNNI), so figures from two machines compare only with them.
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    gpu = ""
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "vector_extensions": vector,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem, 1),
        "gpu": gpu or "none",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
    }


def uploads_from(folder: Path, count: int) -> list[tuple[str, bytes, str]]:
    """(name, bytes, sex) for the first ``count`` PNGs of a labelled folder (sex from labels.csv)."""
    labels = folder.parent / "labels.csv"
    sexes = {}
    if labels.is_file():
        sexes = {r["id"]: ("male" if r["male"] == "True" else "female") for r in csv.DictReader(labels.open())}
    paths = sorted(folder.glob("*.png"))[:count]
    return [(p.name, p.read_bytes(), sexes.get(p.stem, "female")) for p in paths]


def measure_limit(model: Model, uploads, batch_sizes: list[int], repeats: int) -> dict:
    """Per-stage cost per image, and the bare in-process pipeline at its best batch size."""
    spec = model.spec
    t0 = time.perf_counter()
    decoded = [decode(data).pixels for _, data, _ in uploads]
    decode_ms = (time.perf_counter() - t0) / len(uploads) * 1000
    t0 = time.perf_counter()
    tensors = [preprocess(pixels, spec) for pixels in decoded]
    preprocess_ms = (time.perf_counter() - t0) / len(uploads) * 1000
    inference = {}
    for n in batch_sizes:
        images = np.stack([tensors[i % len(tensors)] for i in range(n)])
        sex = np.ones((n, 1), np.float32)
        model.predict(images, sex)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.predict(images, sex)
        per_batch = (time.perf_counter() - t0) / repeats * 1000
        inference[n] = {"ms_per_batch": per_batch, "ms_per_image": per_batch / n}
    best = min(inference, key=lambda n: inference[n]["ms_per_image"])

    # The whole pipeline in-process: worker threads decode + preprocess while ONNX Runtime runs
    # batches of the best size (the same overlap the service aims for, without HTTP).
    total = max(len(uploads), best * repeats)
    work = [uploads[i % len(uploads)][1] for i in range(total)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        t0 = time.perf_counter()
        prepared = pool.map(lambda data: load_model_input(data, spec)[0], work)
        batch = []
        for tensor in prepared:
            batch.append(tensor)
            if len(batch) == best:
                model.predict(np.stack(batch), np.ones((len(batch), 1), np.float32))
                batch = []
        if batch:
            model.predict(np.stack(batch), np.ones((len(batch), 1), np.float32))
        seconds = time.perf_counter() - t0
    return {
        "decode_ms": decode_ms,
        "preprocess_ms": preprocess_ms,
        "inference": inference,
        "best_batch": best,
        "pipeline_images_per_s": total / seconds,
        "pipeline_images": total,
    }


def metric_sum(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def sweep(url: str, uploads, levels: list[int], duration: float, batch_metrics: bool) -> list[dict]:
    load.closed_loop(url, uploads, max(levels), min(duration, 2.0))  # Warm connections and caches.
    rows = []
    for c in levels:
        before = (
            (metric_sum(url, "boneage_batch_size_sum"), metric_sum(url, "boneage_batch_size_count"))
            if batch_metrics
            else (0, 0)
        )
        result = load.closed_loop(url, uploads, c, duration)
        mean_batch = None
        if batch_metrics:
            images = metric_sum(url, "boneage_batch_size_sum") - before[0]
            batches = metric_sum(url, "boneage_batch_size_count") - before[1]
            mean_batch = images / batches if batches else None
        rows.append(
            {
                "concurrency": c,
                "throughput": result.throughput,
                "p50_ms": result.percentile(50),
                "p95_ms": result.percentile(95),
                "p99_ms": result.percentile(99),
                "requests": result.ok,
                "errors": result.errors,
                "mean_batch": mean_batch,
                "client_cores": result.client_cores,
            }
        )
        print(
            f"  c={c:3d}: {result.throughput:7.1f} img/s  p50 {result.percentile(50):7.1f} ms  "
            f"p99 {result.percentile(99):7.1f} ms  errors {result.errors}  load generator "
            f"{result.client_cores:.2f} cores" + (f"  mean batch {mean_batch:.1f}" if mean_batch else ""),
            flush=True,
        )
    return rows


def half_peak_open_loop(url: str, uploads, service: list[dict], duration: float) -> dict:
    """p99 with requests *arriving* at half the peak throughput (open loop), the latency users see
    at a moderate load; a closed-loop row would only slow its clients down instead."""
    rate = max(r["throughput"] for r in service) / 2
    result = load.open_loop(url, uploads, rate, duration)
    row = {
        "rate": rate,
        "sent": result.sent,
        "throughput": result.throughput,
        "p50_ms": result.percentile(50),
        "p99_ms": result.percentile(99),
        "errors": result.errors,
        "client_cores": result.client_cores,
    }
    print(f"  open loop at {rate:.1f}/s: p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms", flush=True)
    return row


def lone_latency_under_json_uploads(url: str, uploads, big: bytes, repeats: int) -> dict:
    """A lone multipart request's latency alone, and while another client posts large base64 JSON
    bodies back to back (issue 12: their parse and decode run in the worker pool, not on the loop)."""
    import base64
    import threading

    name, data, sex = uploads[0]
    body = json.dumps({"image": base64.b64encode(big).decode(), "sex": "female"}).encode()

    def lone(client: httpx.Client) -> list[float]:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.post("/v1/bone-age", files={"image": (name, data)}, data={"sex": sex}).raise_for_status()
            times.append((time.perf_counter() - t0) * 1000)
        return times

    with httpx.Client(base_url=url, timeout=120) as client:
        lone(client)
        alone = lone(client)
    stop, sent = threading.Event(), []

    def uploader() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not stop.is_set():
                r = c.post("/v1/bone-age/json", content=body, headers={"content-type": "application/json"})
                sent.append(r.status_code)

    thread = threading.Thread(target=uploader)
    thread.start()
    time.sleep(0.5)
    with httpx.Client(base_url=url, timeout=120) as client:
        during = lone(client)
    stop.set()
    thread.join()
    row = {
        "json_body_mb": len(body) / 1e6,
        "lone_ms_median_alone": float(np.median(alone)),
        "lone_ms_median_during_json": float(np.median(during)),
        "json_uploads_during": len(sent),
        "repeats": repeats,
    }
    print(
        f"  lone request {row['lone_ms_median_alone']:.0f} ms alone, {row['lone_ms_median_during_json']:.0f} ms "
        f"while {row['json_body_mb']:.1f} MB JSON uploads arrive ({len(sent)} of them)",
        flush=True,
    )
    return row


def archive_scoring(model: Path, folder: Path, quick: bool) -> dict:
    """img/s of ``app.score`` on a folder (same decode, batcher and model as the service, no HTTP)."""
    from app.score import find_records, score_records

    records = [{**r, "sex": "female"} for r in find_records(folder)][: 32 if quick else 300]
    t0 = time.perf_counter()
    rows = score_records(records, model)
    seconds = time.perf_counter() - t0
    row = {"images": len(rows), "seconds": seconds, "img_s": len(rows) / seconds}
    print(f"  {row['img_s']:.1f} img/s over {len(rows)} images (model load included)", flush=True)
    return row


def explain_cost(url: str, uploads, service: list[dict], duration: float, repeats: int) -> dict:
    """ms per explanation alone, and other clients' p99 (open loop at a quarter of the peak rate)
    without and with one client asking for explanations back to back."""
    import threading

    def explain_once(client: httpx.Client, i: int) -> float:
        name, data, sex = uploads[i % len(uploads)]
        t0 = time.perf_counter()
        r = client.post("/v1/bone-age/explain", files={"image": (name, data)}, data={"sex": sex})
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    with httpx.Client(base_url=url, timeout=120) as client:
        explain_once(client, 0)  # first call pays for nothing the others do not
        alone = [explain_once(client, i) for i in range(repeats)]
    rate = max(r["throughput"] for r in service) / 4
    without = load.open_loop(url, uploads, rate, duration)
    stop, during = threading.Event(), []

    def explainer() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while not stop.is_set():
                during.append(explain_once(client, len(during)))

    thread = threading.Thread(target=explainer)
    thread.start()
    with_ = load.open_loop(url, uploads, rate, duration)
    stop.set()
    thread.join()
    row = {
        "explain_ms_median": float(np.median(alone)),
        "explain_ms_spread": [float(min(alone)), float(max(alone))],
        "repeats": repeats,
        "rate": rate,
        "p99_ms_without": without.percentile(99),
        "p99_ms_with": with_.percentile(99),
        "errors_with": with_.errors,
        "explanations_during": len(during),
        "explain_ms_during_median": float(np.median(during)) if during else None,
    }
    print(
        f"  explanation alone {row['explain_ms_median']:.0f} ms (median of {repeats}); others' p99 at {rate:.1f}/s "
        f"{row['p99_ms_without']:.0f} → {row['p99_ms_with']:.0f} ms with explanations running",
        flush=True,
    )
    return row


def spread(values: list[float]) -> dict:
    """Median of repeated runs with their range: the headline numbers are never one run's luck."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


def combine_limits(runs: list[dict]) -> dict:
    """Repeated :func:`measure_limit` runs → one, every figure the median of the runs."""
    first = runs[0]
    return {
        **first,
        "decode_ms": float(np.median([r["decode_ms"] for r in runs])),
        "preprocess_ms": float(np.median([r["preprocess_ms"] for r in runs])),
        "inference": {
            n: {k: float(np.median([r["inference"][n][k] for r in runs])) for k in first["inference"][n]}
            for n in first["inference"]
        },
        "pipeline_images_per_s": float(np.median([r["pipeline_images_per_s"] for r in runs])),
        "best_batch": max({r["best_batch"] for r in runs}, key=[r["best_batch"] for r in runs].count),
        "pipeline_spread": spread([r["pipeline_images_per_s"] for r in runs]),
        "stage_ms_spread": spread([r["decode_ms"] + r["preprocess_ms"] for r in runs]),
        "runs": len(runs),
    }


def combine_sweeps(runs: list[list[dict]]) -> list[dict]:
    """Repeated sweeps → one row per level: medians, the range of img/s, errors summed."""
    rows = []
    for level in zip(*runs, strict=True):
        row = {"concurrency": level[0]["concurrency"]}
        for key in ("throughput", "p50_ms", "p95_ms", "p99_ms", "client_cores"):
            row[key] = float(np.median([r[key] for r in level]))
        batches = [r["mean_batch"] for r in level if r.get("mean_batch")]
        row["mean_batch"] = float(np.median(batches)) if batches else None
        row["requests"] = sum(r["requests"] for r in level)
        row["errors"] = sum(r["errors"] for r in level)
        row["throughput_range"] = [min(r["throughput"] for r in level), max(r["throughput"] for r in level)]
        rows.append(row)
    return rows


def ratios(
    limits: list[dict], services: list[list[dict]], per_requests: list[list[dict]], halves: list[dict], cores: int
) -> dict:
    """The three headline ratios, each computed within one repeat and given as the median of the repeats.

    The load generator runs on the same cores as the service. *Accounted*, the limit is scaled by the
    share of the cores the load generator left free at the service's peak (its own CPU time, measured):
    the service cannot use the cycles its clients spend.
    """
    raw, accounted, per_request, ceiling, p99 = [], [], [], [], []
    for limit, service, keras, half in zip(limits, services, per_requests, halves, strict=True):
        peak = max(service, key=lambda r: r["throughput"])
        free = max(cores - peak["client_cores"], 0.1) / cores
        raw.append(peak["throughput"] / limit["pipeline_images_per_s"])
        accounted.append(peak["throughput"] / (limit["pipeline_images_per_s"] * free))
        per_request.append(peak["throughput"] / max(r["throughput"] for r in keras))
        ceiling.append(limit["pipeline_images_per_s"] / max(r["throughput"] for r in keras))
        p99.append(half["p99_ms"] / service[0]["p50_ms"])
    combined = combine_sweeps(services)
    return {
        "service_peak": max(combined, key=lambda r: r["throughput"]),
        "service_vs_limit": float(np.median(accounted)),
        "service_vs_limit_spread": spread(accounted),
        "service_vs_limit_raw": spread(raw),
        "service_vs_per_request": float(np.median(per_request)),
        "service_vs_per_request_spread": spread(per_request),
        # A service can at best reach the bare pipeline: this ratio bounds the one above on this machine.
        "limit_vs_per_request": float(np.median(ceiling)),
        "half_peak_open_loop": {k: float(np.median([h[k] for h in halves])) for k in ("rate", "p50_ms", "p99_ms")},
        "p99_half_peak_vs_lone": float(np.median(p99)),
        "p99_half_peak_vs_lone_spread": spread(p99),
    }


def plot(out: Path, limit: dict, service: list[dict], per_request: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for rows, label in ((service, "service (batched ONNX Runtime)"), (per_request, "per-request Keras")):
        c = [r["concurrency"] for r in rows]
        a.plot(c, [r["throughput"] for r in rows], "o-", label=label)
        b.plot(c, [r["p99_ms"] for r in rows], "o-", label=label)
    a.axhline(limit["pipeline_images_per_s"], color="k", ls="--", lw=1, label="limit (bare pipeline)")
    a.set(xscale="log", xlabel="concurrent clients", ylabel="radiographs / s", title="throughput")
    b.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="p99 latency (ms)", title="p99 latency")
    for ax in (a, b):
        ax.set_xticks([r["concurrency"] for r in service], [str(r["concurrency"]) for r in service])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def table(rows: list[dict], with_batch: bool) -> list[str]:
    """Rows of a sweep; combined rows (:func:`combine_sweeps`) add the range of img/s over the repeats."""
    ranged = "throughput_range" in rows[0]
    head = (
        "| clients | img/s |"
        + (" range |" if ranged else "")
        + " p50 ms | p95 ms | p99 ms | errors | load generator cores |"
        + (" mean batch |" if with_batch else "")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        low_high = f" {r['throughput_range'][0]:.1f}–{r['throughput_range'][1]:.1f} |" if ranged else ""
        line = (
            f"| {r['concurrency']} | {r['throughput']:.1f} |{low_high} {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['errors']} | {r.get('client_cores', 0):.2f} |"
        )
        if with_batch:
            line += f" {r['mean_batch']:.1f} |" if r["mean_batch"] else " – |"
        lines.append(line)
    return lines


def _range(s: dict, fmt: str = ".2f") -> str:
    return f"{s['min']:{fmt}}–{s['max']:{fmt}}"


def compare_lines(results: dict) -> list[str]:
    """Model alone by batch size (ms per image) and the whole pipeline, the served model beside others."""
    if not results.get("compare"):
        return []
    models = {results["model"]: results["limit"], **results["compare"]}
    names = list(models)
    lines = [
        "### Model files side by side (same run, same images)",
        "",
        "| batch | " + " | ".join(f"{n} ms/image" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for b in results["limit"]["inference"]:
        lines.append(f"| {b} | " + " | ".join(f"{models[n]['inference'][b]['ms_per_image']:.2f}" for n in names) + " |")
    lines.append("| pipeline img/s | " + " | ".join(f"{models[n]['pipeline_images_per_s']:.1f}" for n in names) + " |")
    return [*lines, ""]


def report(results: dict, command: str) -> str:
    m, lim, r = results["machine"], results["limit"], results["ratios"]
    ok = {k: (r[k] >= v if k != "p99_half_peak_vs_lone" else r[k] <= v) for k, v in TARGETS.items()}
    mark = {True: "met", False: "**not met**"}
    lines = [
        "# Benchmarks",
        "",
        f"Measured {results['date']} with `{command}` ({results['wall_minutes']:.1f} min), bundled model "
        f"`{results['model']}` ({results['input_size']} px input), execution providers "
        f"{', '.join(results['providers'])}.",
        "",
        f"Machine: {m['cpu']} ({', '.join(m.get('vector_extensions') or ['no AVX2'])}), {m['cores']} cores, "
        f"{m['memory_gib']} GiB, GPU: {m['gpu']}; Python {m['python']}, "
        f"ONNX Runtime {m['onnxruntime']}. The load generator runs on the same machine and competes for its cores.",
        "",
        f"Inputs: {results['images']['halfres']} real half-resolution RSNA radiographs (PNG, ~330–1900 px), cycled; "
        f"each level runs {results['duration_s']:g} s of closed-loop load (each client sends its next request when "
        f"the last returns). The limit, both sweeps and the open-loop run are repeated {results['repeats']} times: "
        "tables give medians, ranges are min–max over the repeats, and each ratio is computed within a repeat "
        "(its median need not equal the ratio of the medians shown beside it).",
        "",
        "## Summary",
        "",
        "| measure | result (median) | range | target | |",
        "|---|---|---|---|---|",
        f"| service peak / limit, with the load generator's share of the cores taken out of the limit | "
        f"{r['service_vs_limit']:.2f} ({r['service_peak']['throughput']:.1f} img/s at "
        f"{r['service_peak']['client_cores']:.2f} load-generator cores; limit {lim['pipeline_images_per_s']:.1f}) | "
        f"{_range(r['service_vs_limit_spread'])} | ≥ {TARGETS['service_vs_limit']} | {mark[ok['service_vs_limit']]} |",
        f"| service peak / limit, raw | {r['service_vs_limit_raw']['median']:.2f} | "
        f"{_range(r['service_vs_limit_raw'])} | | |",
        f"| service peak / per-request peak | {r['service_vs_per_request']:.1f}× | "
        f"{_range(r['service_vs_per_request_spread'], '.1f')} | ≥ {TARGETS['service_vs_per_request']:g}× | "
        f"{mark[ok['service_vs_per_request']]} |",
        f"| ceiling of the above on this machine: limit / per-request peak | {r['limit_vs_per_request']:.1f}× | | | |",
        f"| decode + preprocess per half-resolution image, one thread | "
        f"{lim['decode_ms'] + lim['preprocess_ms']:.1f} ms | {_range(lim['stage_ms_spread'], '.1f')} | "
        f"≤ {STAGES_TARGET_MS:g} ms | {mark[lim['decode_ms'] + lim['preprocess_ms'] <= STAGES_TARGET_MS]} |",
        f"| p99 with arrivals at half the peak ({r['half_peak_open_loop']['rate']:.1f}/s, open loop) / lone "
        f"request p50 | {r['p99_half_peak_vs_lone']:.2f} ({r['half_peak_open_loop']['p99_ms']:.0f} vs "
        f"{results['service'][0]['p50_ms']:.0f} ms) | {_range(r['p99_half_peak_vs_lone_spread'])} | "
        f"≤ {TARGETS['p99_half_peak_vs_lone']:g} | {mark[ok['p99_half_peak_vs_lone']]} |",
        "",
        "![throughput and p99 vs concurrency](benchmarks.png)",
        "",
        "## The limit: bare in-process pipeline",
        "",
        f"Decode {lim['decode_ms']:.1f} ms + preprocess {lim['preprocess_ms']:.1f} ms per image (one thread; "
        f"together {_range(lim['stage_ms_spread'], '.1f')} ms over the repeats, target ≤ {STAGES_TARGET_MS:g}); "
        f"ONNX Runtime per image by batch size:",
        "",
        "| batch | ms per batch | ms per image |",
        "|---|---|---|",
        *[f"| {n} | {v['ms_per_batch']:.1f} | {v['ms_per_image']:.2f} |" for n, v in lim["inference"].items()],
        "",
        f"Whole pipeline (decode + preprocess in {m['cores']} threads overlapping ONNX Runtime at batch "
        f"{lim['best_batch']}): **{lim['pipeline_images_per_s']:.1f} images/s** over {lim['pipeline_images']} images "
        f"(range {_range(lim['pipeline_spread'], '.1f')}).",
        "",
        *compare_lines(results),
        "## The service (uvicorn, dynamic batching, default settings)",
        "",
        *table(results["service"], True),
        "",
        "## The per-request approach (synchronous endpoint, Keras `predict` per image)",
        "",
        *table(results["per_request"], False),
        "",
    ]
    if results.get("json_offload"):
        j = results["json_offload"]
        lines += [
            "## A lone request while large JSON uploads arrive",
            "",
            f"Median of {j['repeats']} sequential multipart requests: **{j['lone_ms_median_alone']:.0f} ms** alone, "
            f"**{j['lone_ms_median_during_json']:.0f} ms** while another client posts {j['json_body_mb']:.1f} MB "
            f"base64 JSON bodies back to back ({j['json_uploads_during']} during the measurement). Their JSON "
            "parse and base64 decode run in the worker pool, so the event loop that forms batches keeps moving; "
            "what remains is the cores they share.",
            "",
        ]
    if results.get("archive"):
        a = results["archive"]
        lines += [
            "## Scoring an archive (`python -m app.score`, in-process, no HTTP)",
            "",
            f"**{a['img_s']:.1f} img/s** over {a['images']} half-resolution radiographs ({a['seconds']:.1f} s, model "
            f"load included), against the service's peak of {r['service_peak']['throughput']:.1f} img/s and the "
            f"bare pipeline's {lim['pipeline_images_per_s']:.1f}.",
            "",
        ]
    if results.get("explain"):
        e = results["explain"]
        lines += [
            "## Explanations (occlusion heatmap, `POST /v1/bone-age/explain`, 8 × 8 grid = 65 model inputs)",
            "",
            f"One explanation alone: **{e['explain_ms_median']:.0f} ms** (median of {e['repeats']}; "
            f"{e['explain_ms_spread'][0]:.0f}–{e['explain_ms_spread'][1]:.0f}).",
            "",
            f"Other clients arriving at {e['rate']:.1f}/s (a quarter of the peak, open loop): p99 "
            f"**{e['p99_ms_without']:.0f} ms** alone, **{e['p99_ms_with']:.0f} ms** while one client asks for "
            f"explanations back to back ({e['explanations_during']} done, median "
            f"{e['explain_ms_during_median'] or 0:.0f} ms each; {e['errors_with']} errors).",
            "",
        ]
    if results.get("settings"):
        lines += [
            f"## Batch size and wait (service, {results['settings_concurrency']} clients)",
            "",
            "| max batch | max wait ms | img/s | p50 ms | p99 ms | mean batch |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["settings"]:
            lines.append(
                f"| {row['max_batch_size']} | {row['max_wait_ms']:g} | {row['throughput']:.1f} | "
                f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['mean_batch'] or 0:.1f} |"
            )
        lines.append("")
    if results.get("resolution"):
        lines += [
            "## Input resolution (service, default settings)",
            "",
            "| images | clients | img/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
        ]
        for row in results["resolution"]:
            lines.append(
                f"| {row['set']} | {row['concurrency']} | {row['throughput']:.1f} | {row['p50_ms']:.0f} | "
                f"{row['p99_ms']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--keras-model", type=Path, help="a .keras file for the per-request baseline")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another model file (e.g. the int8 one) measured beside --model: model alone and pipeline",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per level")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    parser.add_argument(
        "--repeats",
        type=int,
        help="runs of the limit, the sweeps and the open loop; medians are reported (default 3, --quick 1)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny load, no settings sweep (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.concurrency = 1.0, "1,4"
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    levels = [int(c) for c in args.concurrency.split(",")]
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    root = data_root()
    half_dir, full_dir = root / "rsna-halfres" / "images", root / "rsna-fullres" / "images"
    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "rsna-100px" / "boneage-training-dataset"
    halfres = uploads_from(half_dir, 64) if half_dir.is_dir() else uploads_from(fixtures, 16)
    fullres = uploads_from(full_dir, 21) if full_dir.is_dir() else []
    if not args.quick and not half_dir.is_dir():
        raise SystemExit(f"real radiographs not found under {root}; set BONEAGE_DATA_DIR")

    env = {"BONEAGE_MODEL_PATH": str(args.model)}
    model = Model(args.model, os.environ.get("BONEAGE_PROVIDERS", "auto"))
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "model": args.model.name,
        "input_size": model.spec.input_size,
        "providers": model.providers,
        "duration_s": args.duration,
        "repeats": repeats,
        "images": {"halfres": len(halfres), "fullres": len(fullres)},
    }
    batch_sizes, rounds = ([1, 4, 16], 2) if args.quick else ([1, 2, 4, 8, 16, 32], 10)
    limit_runs = []
    for i in range(repeats):
        print(f"limit: bare pipeline ({i + 1} of {repeats})", flush=True)
        limit_runs.append(measure_limit(model, halfres, batch_sizes, rounds))
        print(f"  {limit_runs[-1]['pipeline_images_per_s']:.1f} images/s at batch {limit_runs[-1]['best_batch']}")
    results["limit"] = combine_limits(limit_runs)
    del model
    results["compare"] = {}
    for other in args.compare:  # the same measurement, same run, same images: side by side
        print(f"limit: bare pipeline with {other.name}", flush=True)
        other_model = Model(other, os.environ.get("BONEAGE_PROVIDERS", "auto"))
        results["compare"][other.name] = combine_limits(
            [measure_limit(other_model, halfres, batch_sizes, rounds) for _ in range(repeats)]
        )

    logs = args.out / "bench-logs"
    logs.mkdir(exist_ok=True)
    print("service", flush=True)
    with server.running("app.main:app", logs / "service.log", env) as (url, _):
        service_runs, half_runs = [], []
        for i in range(repeats):
            print(f"  repeat {i + 1} of {repeats}", flush=True)
            service_runs.append(sweep(url, halfres, levels, args.duration, True))
            half_runs.append(half_peak_open_loop(url, halfres, service_runs[-1], args.duration))
        results["service"], results["service_runs"] = combine_sweeps(service_runs), service_runs
        results["half_peak_open_loop_runs"] = half_runs
        if fullres:
            print("lone request while large JSON uploads arrive", flush=True)
            biggest = max(fullres, key=lambda u: len(u[1]))[1]
            results["json_offload"] = lone_latency_under_json_uploads(url, halfres, biggest, 5 if args.quick else 20)
        print("explanations (occlusion heatmap)", flush=True)
        results["explain"] = explain_cost(url, halfres, results["service"], args.duration, 2 if args.quick else 5)
        if fullres:
            results["resolution"] = []
            for name, images in (("half-resolution", halfres), ("full-resolution", fullres)):
                for c in (1, 16):
                    row = sweep(url, images, [c], args.duration, False)[0]
                    results["resolution"].append({"set": name, **row})
    print("archive scoring (python -m app.score, in-process)", flush=True)
    results["archive"] = archive_scoring(args.model, half_dir if half_dir.is_dir() else fixtures, args.quick)
    print("per-request Keras", flush=True)
    keras_env = {"BENCH_SPEC_MODEL": str(args.model), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if args.keras_model:
        keras_env["BENCH_KERAS_MODEL"] = str(args.keras_model)
    with server.running("bench.keras_server:app", logs / "per-request.log", keras_env) as (url, _):
        per_request_runs = [sweep(url, halfres, levels, args.duration, False) for _ in range(repeats)]
    results["per_request"], results["per_request_runs"] = combine_sweeps(per_request_runs), per_request_runs

    if not args.quick:
        c = 32
        results["settings_concurrency"], results["settings"] = c, []
        for batch, wait in [(1, 0), (4, 5), (8, 5), (16, 0), (16, 2), (16, 5), (16, 10), (16, 20), (32, 5)]:
            print(f"settings: max batch {batch}, max wait {wait} ms", flush=True)
            settings_env = env | server.service_env(max_batch_size=batch, max_wait_ms=wait)
            with server.running("app.main:app", logs / "settings.log", settings_env) as (url, _):
                row = sweep(url, halfres, [c], args.duration / 2, True)[0]
            results["settings"].append({"max_batch_size": batch, "max_wait_ms": wait, **row})

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    results["ratios"] = ratios(limit_runs, service_runs, per_request_runs, half_runs, cores)
    results["wall_minutes"] = (time.perf_counter() - started) / 60
    command = "python -m bench" + (" --quick" if args.quick else "")
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(args.out / "benchmarks.png", results["limit"], results["service"], results["per_request"])
    # A "## Notes" section written by people (reading the numbers, choosing defaults) survives reruns.
    target = args.out / "benchmarks.md"
    notes = target.read_text().partition("\n## Notes\n")[2] if target.is_file() else ""
    target.write_text(report(results, command) + "\n" + (f"\n## Notes\n{notes}" if notes else ""))
    r = results["ratios"]
    print(
        f"service/limit {r['service_vs_limit']:.2f}, service/per-request {r['service_vs_per_request']:.1f}x, "
        f"p99 at half peak / lone {r['p99_half_peak_vs_lone']:.2f}; report: {args.out / 'benchmarks.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
