"""`docker compose up`, end to end, as a user would run it; needs a Docker daemon (not part of CI).

    .venv/bin/python scripts/compose_smoke.py                        # public base image
    BONEAGE_BASE_IMAGE=boneage-base:bookworm .venv/bin/python scripts/compose_smoke.py   # no registry here

Builds the image, starts the service with `docker compose up -d`, waits for healthy, posts a real
radiograph and the real DICOM, checks the page, /docs and /metrics, compares the answers with the
same model run on the host, then stops the container with SIGTERM while uploads are in flight and
checks that every one of them was answered. Prints the image size and the cold start to ready.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PNG = ROOT / "tests" / "fixtures" / "images" / "rsna-halfres-3225.png"
DICOM = ROOT / "tests" / "fixtures" / "images" / "hand-dx-ge-14bit-quarter.dcm"
URL = "http://127.0.0.1:8000"
IN_FLIGHT = 12


def compose_command() -> list[str]:
    """Compose v2 (`docker compose`) where installed, else v1 (`docker-compose`, e.g. Debian's package)."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True)
    return ["docker", "compose"] if v2.returncode == 0 else ["docker-compose"]


COMPOSE = compose_command()


def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*COMPOSE, *args], cwd=ROOT, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(COMPOSE + list(args))} failed:\n{done.stdout}\n{done.stderr}")
    return done


def container_id() -> str:
    return compose("ps", "-q", "boneage").stdout.strip()


def health(cid: str) -> str:
    out = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", cid], capture_output=True, text=True)
    return out.stdout.strip()


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def post(client: httpx.Client, path: Path, **data) -> dict:
    r = client.post("/v1/bone-age", files={"image": (path.name, path.read_bytes())}, data=data)
    assert r.status_code == 200, r.text
    return r.json()


async def uploads_in_flight() -> list[int]:
    async with httpx.AsyncClient(base_url=URL, timeout=120) as client:

        async def one() -> int:
            try:
                r = await client.post("/v1/bone-age", files={"image": (PNG.name, PNG.read_bytes())}, data={"sex": "f"})
                return r.status_code
            except httpx.HTTPError:
                return 0

        tasks = [asyncio.create_task(one()) for _ in range(IN_FLIGHT)]
        # SIGTERM once all of them are inside the service (its own in-flight gauge says so).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = (await client.get("/metrics")).text
            if metric(text, "boneage_in_flight") >= IN_FLIGHT:
                break
            await asyncio.sleep(0.01)
        subprocess.run(["docker", "kill", "--signal", "SIGTERM", container_id()], check=True, capture_output=True)
        return await asyncio.gather(*tasks)


def main() -> int:
    report: dict = {}
    t0 = time.monotonic()
    compose("build", "boneage")
    report["build_s"] = round(time.monotonic() - t0, 1)
    size = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{.Size}}", "boneage:cpu"], capture_output=True, text=True
    )
    report["image_mb"] = round(int(size.stdout) / 1e6)
    compose("down", "--remove-orphans", check=False)
    t0 = time.monotonic()
    compose("up", "-d", "boneage")
    cid = container_id()
    while True:  # ready as the service itself says (the healthcheck only looks every few seconds)
        try:
            if httpx.get(URL + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > 180:
            raise SystemExit("the service did not become ready")
        time.sleep(0.1)
    report["cold_start_to_ready_s"] = round(time.monotonic() - t0, 1)
    while health(cid) != "healthy":
        if time.monotonic() - t0 > 180 or health(cid) == "unhealthy":
            print(compose("logs", "boneage").stdout[-3000:])
            raise SystemExit("the container did not become healthy")
        time.sleep(0.25)
    report["cold_start_to_healthy_s"] = round(time.monotonic() - t0, 1)
    try:
        with httpx.Client(base_url=URL, timeout=60) as client:
            png = post(client, PNG, sex="female", chronological_age_months="40")
            dcm = post(client, DICOM)
            assert dcm["sex_source"] == "dicom", dcm
            assert "swagger-ui" in client.get("/docs").text
            assert "Pediatric bone age" in client.get("/").text
            assert metric(client.get("/metrics").text, 'boneage_requests_total{endpoint="/v1/bone-age",status="200"}')
            user = subprocess.run(["docker", "exec", cid, "id", "-u"], capture_output=True, text=True).stdout.strip()
            report["user_id"] = int(user)
            writable = subprocess.run(["docker", "exec", cid, "touch", "/srv/boneage/x"], capture_output=True)
            report["root_filesystem_read_only"] = writable.returncode != 0
        # The same files through the same model on the host: the container must not differ.
        from app.score import score_records

        host = {
            Path(r["path"]).name: r["bone_age_months"]
            for r in score_records(
                [{"path": str(PNG), "sex": "female"}, {"path": str(DICOM), "sex": None}],
                ROOT / "models" / "boneage.onnx",
            )
        }
        report["container_vs_host_months"] = {
            PNG.name: [png["bone_age_months"], host[PNG.name]],
            DICOM.name: [dcm["bone_age_months"], host[DICOM.name]],
        }
        statuses = asyncio.run(uploads_in_flight())
        report["sigterm_in_flight"] = {"sent": len(statuses), "answered_200": statuses.count(200)}
        subprocess.run(["docker", "wait", cid], capture_output=True, timeout=60)
        exit_code = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.ExitCode}}", cid], capture_output=True, text=True
        )
        report["exit_code_after_sigterm"] = int(exit_code.stdout)
    finally:
        compose("down", "--remove-orphans", check=False)
    report["date"] = time.strftime("%Y-%m-%d")
    # Other work on the machine slows the start: the load average says how busy it was.
    report["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))
    (ROOT / "docs" / "compose-smoke.json").write_text(json.dumps(report, indent=2) + "\n")
    ok = (
        report["sigterm_in_flight"]["answered_200"] == IN_FLIGHT
        and report["user_id"] != 0
        and report["root_filesystem_read_only"]
        and all(abs(a - b) <= 0.1 for a, b in report["container_vs_host_months"].values())
    )
    print("compose smoke test:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
