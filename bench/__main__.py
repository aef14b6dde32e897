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

TARGETS = {"service_vs_limit": 0.85, "service_vs_per_request": 8.0, "p99_half_peak_vs_lone": 2.0}


def machine() -> dict:
    import onnxruntime as ort

    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    gpu = ""
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
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
            }
        )
        print(
            f"  c={c:3d}: {result.throughput:7.1f} img/s  p50 {result.percentile(50):7.1f} ms  "
            f"p99 {result.percentile(99):7.1f} ms  errors {result.errors}"
            + (f"  mean batch {mean_batch:.1f}" if mean_batch else ""),
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


def ratios(limit: dict, service: list[dict], per_request: list[dict], half: dict) -> dict:
    peak = max(service, key=lambda r: r["throughput"])
    lone = service[0]
    return {
        "service_peak": peak,
        "service_vs_limit": peak["throughput"] / limit["pipeline_images_per_s"],
        "service_vs_per_request": peak["throughput"] / max(r["throughput"] for r in per_request),
        "half_peak_open_loop": half,
        "p99_half_peak_vs_lone": half["p99_ms"] / lone["p50_ms"],
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
    head = "| clients | img/s | p50 ms | p95 ms | p99 ms | errors |" + (" mean batch |" if with_batch else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['concurrency']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['errors']} |"
        )
        if with_batch:
            line += f" {r['mean_batch']:.1f} |" if r["mean_batch"] else " – |"
        lines.append(line)
    return lines


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
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, GPU: {m['gpu']}; Python {m['python']}, "
        f"ONNX Runtime {m['onnxruntime']}. The load generator runs on the same machine and competes for its cores.",
        "",
        f"Inputs: {results['images']['halfres']} real half-resolution RSNA radiographs (PNG, ~330–1900 px), cycled; "
        f"each level runs {results['duration_s']:g} s of closed-loop load (each client sends its next request when "
        "the last returns).",
        "",
        "## Summary",
        "",
        "| measure | result | target | |",
        "|---|---|---|---|",
        f"| service peak / limit | {r['service_vs_limit']:.2f} ({r['service_peak']['throughput']:.1f} vs "
        f"{lim['pipeline_images_per_s']:.1f} img/s) | ≥ {TARGETS['service_vs_limit']} | "
        f"{mark[ok['service_vs_limit']]} |",
        f"| service peak / per-request peak | {r['service_vs_per_request']:.1f}× | ≥ "
        f"{TARGETS['service_vs_per_request']:g}× | {mark[ok['service_vs_per_request']]} |",
        f"| p99 with arrivals at half the peak ({r['half_peak_open_loop']['rate']:.1f}/s, open loop) / lone "
        f"request p50 | {r['p99_half_peak_vs_lone']:.2f} ({r['half_peak_open_loop']['p99_ms']:.0f} vs "
        f"{results['service'][0]['p50_ms']:.0f} ms) | ≤ {TARGETS['p99_half_peak_vs_lone']:g} | "
        f"{mark[ok['p99_half_peak_vs_lone']]} |",
        "",
        "![throughput and p99 vs concurrency](benchmarks.png)",
        "",
        "## The limit: bare in-process pipeline",
        "",
        f"Decode {lim['decode_ms']:.1f} ms + preprocess {lim['preprocess_ms']:.1f} ms per image (one thread); "
        f"ONNX Runtime per image by batch size:",
        "",
        "| batch | ms per batch | ms per image |",
        "|---|---|---|",
        *[f"| {n} | {v['ms_per_batch']:.1f} | {v['ms_per_image']:.2f} |" for n, v in lim["inference"].items()],
        "",
        f"Whole pipeline (decode + preprocess in {m['cores']} threads overlapping ONNX Runtime at batch "
        f"{lim['best_batch']}): **{lim['pipeline_images_per_s']:.1f} images/s** over {lim['pipeline_images']} images.",
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
    parser.add_argument("--quick", action="store_true", help="tiny load, no settings sweep (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.concurrency = 1.0, "1,4"
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
        "images": {"halfres": len(halfres), "fullres": len(fullres)},
    }
    print("limit: bare pipeline", flush=True)
    results["limit"] = measure_limit(model, halfres, [1, 2, 4, 8, 16, 32], 2 if args.quick else 10)
    print(f"  {results['limit']['pipeline_images_per_s']:.1f} images/s at batch {results['limit']['best_batch']}")
    del model
    results["compare"] = {}
    for other in args.compare:  # the same measurement, same run, same images: side by side
        print(f"limit: bare pipeline with {other.name}", flush=True)
        results["compare"][other.name] = measure_limit(
            Model(other, os.environ.get("BONEAGE_PROVIDERS", "auto")),
            halfres,
            [1, 2, 4, 8, 16, 32],
            2 if args.quick else 10,
        )

    logs = args.out / "bench-logs"
    logs.mkdir(exist_ok=True)
    print("service", flush=True)
    with server.running("app.main:app", logs / "service.log", env) as (url, _):
        results["service"] = sweep(url, halfres, levels, args.duration, True)
        results["half_peak_open_loop"] = half_peak_open_loop(url, halfres, results["service"], args.duration)
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
        results["per_request"] = sweep(url, halfres, levels, args.duration, False)

    if not args.quick:
        c = 32
        results["settings_concurrency"], results["settings"] = c, []
        for batch, wait in [(1, 0), (4, 5), (8, 5), (16, 0), (16, 2), (16, 5), (16, 10), (16, 20), (32, 5)]:
            print(f"settings: max batch {batch}, max wait {wait} ms", flush=True)
            settings_env = env | server.service_env(max_batch_size=batch, max_wait_ms=wait)
            with server.running("app.main:app", logs / "settings.log", settings_env) as (url, _):
                row = sweep(url, halfres, [c], args.duration / 2, True)[0]
            results["settings"].append({"max_batch_size": batch, "max_wait_ms": wait, **row})

    results["ratios"] = ratios(
        results["limit"], results["service"], results["per_request"], results["half_peak_open_loop"]
    )
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
