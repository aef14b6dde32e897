"""Start a real uvicorn process on loopback and wait until it is ready (benchmarks and tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(
    app: str, log: Path, env: dict[str, str] | None = None, ready_path: str = "/readyz", timeout: float = 120
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``uvicorn APP`` on a free loopback port; yield (base URL, process); SIGTERM it afterwards."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{app} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{app} not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def service_env(**settings) -> dict[str, str]:
    """BONEAGE_* environment for the service from keyword settings."""
    return {f"BONEAGE_{k.upper()}": str(v) for k, v in settings.items()}
