"""Replicas behind HAProxy (compose profile "replicas"): throughput with 1 and 2, and a rolling
restart under load without a failed request. Needs a Docker daemon; run on a quiet machine.

    BONEAGE_BASE_IMAGE=boneage-base:bookworm .venv/bin/python scripts/compose_replicas.py [--duration 20]

Writes docs/replicas.json and prints it. The load generator shares the machine with the replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import load  # noqa: E402
from scripts.compose_smoke import compose  # noqa: E402

LB = "http://127.0.0.1:8080"


def replicas() -> list[str]:
    return compose("--profile", "replicas", "ps", "-q", "replica").stdout.split()


def wait_ready(url: str, count: int, timeout: float = 240) -> None:
    """Until ``count`` replicas are healthy in Docker and the load balancer answers /readyz."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [
            subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Health.Status}}", c], capture_output=True, text=True
            ).stdout.strip()
            for c in replicas()
        ]
        try:
            lb_ok = httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            lb_ok = False
        if states.count("healthy") == count and lb_ok:
            time.sleep(3)  # HAProxy: two good checks (rise 2, 1 s apart) before a server takes traffic
            return
        time.sleep(0.5)
    raise SystemExit(f"{count} replicas did not become ready")


def uploads() -> list[tuple[str, bytes, str]]:
    from training.data import data_root

    folder = data_root() / "rsna-halfres" / "images"
    paths = sorted(folder.glob("*.png"))[:32] or [ROOT / "tests" / "fixtures" / "images" / "rsna-halfres-3225.png"]
    return [(p.name, p.read_bytes(), "female") for p in paths]


def up(count: int) -> None:
    compose("--profile", "replicas", "up", "-d", "--scale", f"replica={count}", "lb")
    wait_ready(LB, count)


def rolling_restart(events: list[str]) -> None:
    """One replica at a time: SIGTERM (drain), start again, wait until ready, then the next."""
    for cid in replicas():
        t0 = time.monotonic()
        subprocess.run(["docker", "stop", "-t", "40", cid], check=True, capture_output=True)
        subprocess.run(["docker", "start", cid], check=True, capture_output=True)
        wait_ready(LB, len(replicas()))
        events.append(f"{cid[:12]} restarted and ready again in {time.monotonic() - t0:.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    forms = uploads()
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "throughput": {},
    }
    if not args.skip_build:
        compose("--profile", "replicas", "build", "replica", "lb")
    compose("--profile", "replicas", "down", "--remove-orphans", check=False)
    try:
        for count in (1, 2):
            up(count)
            load.closed_loop(LB, forms, args.concurrency, 3)  # warm-up
            runs = [load.closed_loop(LB, forms, args.concurrency, args.duration) for _ in range(3)]
            report["throughput"][f"{count} replica(s)"] = {
                "img_s_median": sorted(r.throughput for r in runs)[1],
                "img_s_runs": [round(r.throughput, 1) for r in runs],
                "errors": sum(r.errors for r in runs),
            }
            print(json.dumps(report["throughput"]), flush=True)
        # Rolling restart of both replicas while requests keep arriving (open loop, a third of the peak).
        peak = report["throughput"]["2 replica(s)"]["img_s_median"]
        events: list[str] = []
        restarter = threading.Thread(target=rolling_restart, args=(events,))
        rate = max(peak / 3, 1.0)
        restarter.start()
        # Keep the load on for as long as the restart takes, in slices, so the total is known.
        slices = []
        while restarter.is_alive():
            slices.append(load.open_loop(LB, forms, rate, 5.0))
        restarter.join()
        slices.append(load.open_loop(LB, forms, rate, 5.0))  # and a little after the last replica is back
        statuses: dict[int, int] = {}
        failures: dict[str, int] = {}
        for result in slices:
            for status, n in result.statuses.items():
                statuses[status] = statuses.get(status, 0) + n
            for name, n in result.failures.items():
                failures[name] = failures.get(name, 0) + n
        report["rolling_restart"] = {
            "rate_per_s": round(rate, 1),
            "sent": sum(r.sent for r in slices),
            "statuses": statuses,
            "connection_failures": failures,
            "events": events,
        }
    finally:
        compose("--profile", "replicas", "down", "--remove-orphans", check=False)
    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)  # how busy the machine was
    (ROOT / "docs" / "replicas.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    failed = sum(n for s, n in report["rolling_restart"]["statuses"].items() if s != 200)
    print("rolling restart:", "no failed request" if failed == 0 else f"{failed} FAILED requests")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
