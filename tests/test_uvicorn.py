"""Against a real uvicorn process on loopback: batching, overload, logs, shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.api.bone_age import PREDICTION_PATHS
from bench import server
from tests.conftest import HALFRES_PNG, SMALL_DICOM, THUMBNAILS


@contextmanager
def running_service(tmp_path: Path, **settings) -> Iterator[tuple[str, Path, subprocess.Popen]]:
    """``uvicorn app.main:app`` with BONEAGE_* settings; yield (base URL, log file, process)."""
    log = tmp_path / "uvicorn.log"
    with server.running("app.main:app", log, server.service_env(**settings), timeout=60) as (url, proc):
        yield url, log, proc


async def post_many(url: str, uploads: list[tuple[Path, str]], **headers) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(
            *(
                client.post("/v1/bone-age", files={"image": (p.name, p.read_bytes())}, data={"sex": sex})
                for p, sex in uploads
            )
        )


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_start_up_logs_the_execution_provider_and_serves(tmp_path, bundled_model):
    with running_service(tmp_path, model_path=bundled_model) as (url, log, _):
        assert httpx.get(url + "/healthz").json()["status"] == "ok"
        text = log.read_text()
        assert "execution providers: CPUExecutionProvider" in text
        assert "ready: warmed up batch sizes 1 and 16" in text


def test_an_explicit_cuda_setting_without_a_usable_gpu_stops_the_start_with_the_reason(tmp_path, bundled_model):
    """Issue 12 item 4: 'cuda' must not quietly run on the CPU; 'auto' keeps the fallback (test above)."""
    with (
        pytest.raises(RuntimeError, match="exited") as failed,
        running_service(tmp_path, model_path=bundled_model, providers="cuda"),
    ):
        pass
    assert "BONEAGE_PROVIDERS=cuda, but the CUDA execution provider is unusable" in str(failed.value)


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_answer(tmp_path, bundled_model):
    images = sorted(THUMBNAILS.glob("*.png"))[:12]
    uploads = [(p, "male" if i % 2 else "female") for i, p in enumerate(images)]
    with running_service(tmp_path, model_path=bundled_model, max_wait_ms=50, max_batch_size=16) as (url, _, _):
        alone = [asyncio.run(post_many(url, [u]))[0].json()["bone_age_months"] for u in uploads]
        before = httpx.get(url + "/metrics").text
        responses = asyncio.run(post_many(url, uploads))
        after = httpx.get(url + "/metrics").text
    assert all(r.status_code == 200 for r in responses)
    batches = metric(after, "boneage_batch_size_count") - metric(before, "boneage_batch_size_count")
    images_run = metric(after, "boneage_batch_size_sum") - metric(before, "boneage_batch_size_sum")
    assert images_run == 12 and batches < 12, (batches, images_run)
    # Each caller gets the answer its own image gets alone (batched float sums may move the last digit).
    for response, single, (_, sex) in zip(responses, alone, uploads, strict=True):
        assert response.json()["sex"] == sex
        assert response.json()["bone_age_months"] == pytest.approx(single, abs=0.11)


def test_overload_answers_503_with_retry_after_and_the_service_recovers(tmp_path, bundled_model):
    uploads = [(HALFRES_PNG, "female")] * 40
    with running_service(tmp_path, model_path=bundled_model, queue_size=2, max_batch_size=1, preprocess_workers=4) as (
        url,
        _,
        _,
    ):
        responses = asyncio.run(post_many(url, uploads))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert r.headers["content-type"] == "application/problem+json"
        assert httpx.get(url + "/readyz").status_code == 200
        again = asyncio.run(post_many(url, uploads[:1]))
        assert again[0].status_code == 200


def read_response(sock: socket.socket) -> tuple[str, dict]:
    """One HTTP/1.1 response from a raw socket: (head, JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(h for h in head.decode().split("\r\n") if h.lower().startswith("content-length:")).split(":")[1])
    while len(body) < length:
        body += sock.recv(65536)
    return head.decode(), json.loads(body)


def declared_but_unsent(port: int, path: str, content_type: str, length: int, headers: bytes = b"") -> tuple[str, dict]:
    """Send only the head of a request that declares ``length`` body bytes; return the answer to it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n".encode()
            + headers
            + f"Content-Length: {length}\r\n\r\n".encode()
        )
        return read_response(sock)


def multipart(image: bytes, sex: str, boundary: str = "b0undary") -> tuple[bytes, bytes]:
    """(request head, body) of a multipart bone-age request, for clients that send it in pieces."""
    part = f'--{boundary}\r\nContent-Disposition: form-data; name="sex"\r\n\r\n{sex}\r\n'
    part += f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="h.png"\r\n\r\n'
    body = part.encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST /v1/bone-age HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    )
    return head.encode(), body


def test_when_full_a_request_is_refused_at_the_door_before_its_upload_is_read(tmp_path, bundled_model):
    """A slow upload holds the only slot; the next request gets 503 at once, and both are counted."""
    image = HALFRES_PNG.read_bytes()
    head, body = multipart(image, "female")
    with running_service(tmp_path, model_path=bundled_model, queue_size=1) as (url, _, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(head + body[:1000])
            # Wait until the slow upload is inside the service, holding its one slot.
            deadline = time.monotonic() + 10
            while metric(httpx.get(url + "/metrics").text, "boneage_in_flight") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            # The second request declares 20 MB but sends none of it: refused without reading it.
            started = time.monotonic()
            refused, problem = declared_but_unsent(port, "/v1/bone-age/json", "application/json", 20_000_000)
            assert time.monotonic() - started < 2
            assert refused.startswith("HTTP/1.1 503") and "retry-after: 1" in refused.lower(), refused
            assert "content-type: application/problem+json" in refused.lower()
            assert problem["status"] == 503 and "at capacity" in problem["detail"]
            assert f"x-request-id: {problem['request_id']}" in refused.lower()
            slow.sendall(body[1000:])  # The slow client finishes and gets its answer.
            answer, result = read_response(slow)
            assert answer.startswith("HTTP/1.1 200") and result["sex"] == "female", answer
        assert (
            httpx.post(url + "/v1/bone-age", files={"image": ("h.png", image)}, data={"sex": "male"}).status_code == 200
        )
        text = httpx.get(url + "/metrics").text
        assert metric(text, 'boneage_requests_total{endpoint="/v1/bone-age/json",status="503"}') == 1
        assert metric(text, "boneage_refused_total") == 1 and metric(text, "boneage_in_flight") == 0
        assert metric(text, 'boneage_requests_total{endpoint="/v1/bone-age",status="200"}') == 2


def test_with_an_api_key_a_request_without_it_is_refused_before_its_upload_is_read(tmp_path, bundled_model):
    """Without a valid key a request never holds a slot: 401 at once, its declared 20 MB unread."""
    with running_service(tmp_path, model_path=bundled_model, queue_size=1, api_key="s3cret") as (url, _, _):
        port = int(url.rsplit(":", 1)[1])
        for key in (b"", b"X-API-Key: wrong\r\n"):
            head, problem = declared_but_unsent(
                port, "/v1/bone-age", "multipart/form-data; boundary=b", 20_000_000, key
            )
            assert head.startswith("HTTP/1.1 401") and "www-authenticate: apikey" in head.lower(), head
            assert problem["status"] == 401 and "X-API-Key" in problem["detail"]
        ok = httpx.post(
            url + "/v1/bone-age",
            files={"image": ("h.png", HALFRES_PNG.read_bytes())},
            data={"sex": "female"},
            headers={"X-API-Key": "s3cret"},
        )
        assert ok.status_code == 200
        text = httpx.get(url + "/metrics").text
        assert metric(text, 'boneage_requests_total{endpoint="/v1/bone-age",status="401"}') == 2
        assert metric(text, "boneage_in_flight") == 0 and metric(text, "boneage_refused_total") == 0


def test_logs_carry_request_facts_but_no_patient_data(tmp_path, bundled_model):
    import pydicom

    ds = pydicom.dcmread(SMALL_DICOM)
    with running_service(tmp_path, model_path=bundled_model) as (url, log, _):
        r = httpx.post(url + "/v1/bone-age", files={"image": ("hand.dcm", SMALL_DICOM.read_bytes())})
        assert r.status_code == 200
        # The DICOM results are built from the patient's header: nothing of it may reach the log either.
        for path, fmt in (("/v1/bone-age", "dicom-sr"), ("/v1/bone-age/explain", "dicom-sc")):
            files = {"image": ("hand.dcm", SMALL_DICOM.read_bytes())}
            assert httpx.post(url + path, params={"format": fmt}, files=files, timeout=60).status_code == 200
    text = log.read_text()
    assert f"request_id={r.json()['request_id']}" in text and "status=200" in text
    for tag in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientAge",
        "PatientSex",
        "InstitutionName",
        "StudyDate",
    ):
        value = str(ds.get(tag, "") or "")
        if len(value) >= 3:
            assert value not in text, tag
        assert tag not in text


def test_sigterm_lets_in_flight_requests_finish(tmp_path, bundled_model):
    """Four uploads are half sent when SIGTERM arrives (the in-flight gauge says so); all four are answered."""
    head, body = multipart(HALFRES_PNG.read_bytes(), "male")
    with running_service(tmp_path, model_path=bundled_model) as (url, log, proc):
        port = int(url.rsplit(":", 1)[1])
        clients = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4)]
        for sock in clients:
            sock.sendall(head + body[: len(body) // 2])
        deadline = time.monotonic() + 10
        while metric(httpx.get(url + "/metrics").text, "boneage_in_flight") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(httpx.get(url + "/metrics").text, "boneage_in_flight") == 4
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # shutdown has begun: the listening socket is closed
        answers = []
        for sock in clients:
            sock.sendall(body[len(body) // 2 :])
            answers.append(read_response(sock))
            sock.close()
        assert [h.split("\r\n")[0] for h, _ in answers] == ["HTTP/1.1 200 OK"] * 4
        assert all(result["sex"] == "male" for _, result in answers)
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit is by that signal.
        assert proc.wait(30) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "stopped" in text and "Finished server process" in text


def test_evaluation_through_the_running_service_writes_the_report(tmp_path, bundled_model):
    from tests.conftest import THUMBNAILS_CSV
    from training.evaluate import main as evaluate

    with running_service(tmp_path, model_path=bundled_model) as (url, _, _):
        assert evaluate(["--service", url, "--csv", str(THUMBNAILS_CSV), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # A thumbnail the quality gate refuses is reported as refused, not as an error or a crash.
    refused = metrics.get("refused", {"n": 0, "ids": []})
    assert metrics["n"] + refused["n"] == 40 and metrics["mae"] > 0 and refused["n"] == len(refused["ids"])
    assert len((tmp_path / "eval" / "predictions.csv").read_text().splitlines()) == metrics["n"] + 1


def test_an_oversize_upload_is_refused_at_the_door(tmp_path, bundled_model):
    """Issue 12 item 2: a 100 MB upload was read to the end before its 413; chunked bodies declare no length.

    (That nothing reaches the disk is tested in-process, where spooling can be watched:
    tests/test_hardening.py::test_uploads_are_never_written_to_disk.)
    """
    with running_service(tmp_path, model_path=bundled_model, max_upload_mb=1) as (url, _, _):
        port = int(url.rsplit(":", 1)[1])
        # Declared 100 MB, none of it sent: answered at once.
        started = time.monotonic()
        for path in sorted(PREDICTION_PATHS):  # every prediction endpoint, the explanation included
            kind = "application/json" if path.endswith("/json") else "multipart/form-data; boundary=b"
            head, problem = declared_but_unsent(port, path, kind, 100_000_000)
            assert head.startswith("HTTP/1.1 413") and "100,000,000 bytes" in problem["detail"], (path, head)
        assert time.monotonic() - started < 2 * len(PREDICTION_PATHS)
        # Chunked, no length: refused once the bytes that arrived pass the limit, not at the end.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/bone-age/json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            chunk = b"A" * 65536
            sent = 0
            try:
                while sent < 3 * 1024 * 1024:  # the JSON limit is 1.33 MB + 64 KB
                    sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            head, problem = read_response(sock)
        assert head.startswith("HTTP/1.1 413") and "more than" in problem["detail"], head
        text = httpx.get(url + "/metrics").text
        assert metric(text, 'boneage_requests_total{endpoint="/v1/bone-age",status="413"}') == 1
        assert metric(text, 'boneage_requests_total{endpoint="/v1/bone-age/explain",status="413"}') == 1
        assert (
            metric(text, 'boneage_requests_total{endpoint="/v1/bone-age/json",status="413"}') == 2
        )  # declared + chunked
        assert httpx.get(url + "/readyz").status_code == 200
