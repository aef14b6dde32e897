"""Hardening: a corpus of bad input on both endpoints, property-based API tests, overload,
injected faults and privacy. Every request gets a clear answer and the service keeps running."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless
from schemathesis.checks import positive_data_acceptance
from starlette.formparsers import MultiPartParser

from bench import load, server
from tests.conftest import HALFRES_PNG, HOSPITAL_JPEG, SMALL_DICOM


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    )


def _dicom(edit) -> bytes:
    ds = pydicom.dcmread(SMALL_DICOM)
    edit(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _no_pixels(ds):
    del ds.PixelData


def _jpeg_ls(ds):
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 64])
    ds["PixelData"].VR = "OB"


def _monochrome1(ds):
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.PixelData = (16383 - ds.pixel_array).astype(np.uint16).tobytes()


def _no_sex_no_age(ds):
    del ds.PatientSex
    del ds.PatientAge


def _bad_sex_bad_age(ds):
    ds.PatientSex, ds.PatientAge = "Q", "seven"


def _absurd_dicom_age(ds):
    ds.PatientAge = "999Y"


def _animated_gif() -> bytes:
    frames = [Image.open(HALFRES_PNG).convert("P"), Image.open(HALFRES_PNG).rotate(10).convert("P")]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:])


@dataclass
class Kind:
    """One kind of input, what both endpoints must answer, and why."""

    name: str
    data: bytes
    fields: dict
    multipart: int
    json: int  # Status for the base64 JSON endpoint.


def corpus() -> list[Kind]:
    grey = Image.open(HALFRES_PNG)
    png = HALFRES_PNG.read_bytes()
    jpeg = HOSPITAL_JPEG.read_bytes()
    male = {"sex": "male"}
    wide = Image.fromarray(np.tile(np.asarray(grey)[:40], (1, 6)))  # A 40-pixel-high strip of hand.
    return [
        # Bad files: 4xx with a reason.
        Kind("empty file", b"", male, 400, 422),
        Kind("random bytes", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), male, 400, 400),
        Kind("text named .png", b"this is not a radiograph\n" * 20, male, 400, 400),
        Kind("truncated PNG", png[: len(png) // 2], male, 400, 400),
        Kind("truncated JPEG", jpeg[: len(jpeg) // 3], male, 400, 400),
        Kind("PNG declaring 60000x60000 (decompression bomb)", _png_header_only(60_000, 60_000), male, 413, 413),
        Kind("PNG declaring 0x0", _png_header_only(0, 0), male, 400, 400),
        Kind("1x1 PNG", _png(Image.new("L", (1, 1), 128)), male, 400, 400),
        Kind("uniform grey PNG", _png(Image.new("L", (300, 400), 90)), male, 400, 400),
        Kind("extreme aspect ratio (strip)", _png(wide), male, 400, 400),
        Kind("animated GIF", _animated_gif(), male, 415, 415),
        Kind("BMP", _save(grey, "BMP"), male, 415, 415),
        Kind("TIFF", _save(grey, "TIFF"), male, 415, 415),
        Kind("DICOM without pixel data", _dicom(_no_pixels), {}, 400, 400),
        Kind("DICOM in JPEG-LS (not decodable here)", _dicom(_jpeg_ls), {}, 415, 415),
        Kind("truncated DICOM", _dicom(lambda ds: None)[:-5000], {}, 400, 400),
        Kind("DICOM without sex or age, none sent", _dicom(_no_sex_no_age), {}, 422, 422),
        Kind("DICOM with malformed sex, none sent", _dicom(_bad_sex_bad_age), {}, 422, 422),
        Kind("missing sex", png, {}, 422, 422),
        Kind("unknown sex", png, {"sex": "unknown"}, 422, 422),
        Kind("negative age", png, {"sex": "F", "chronological_age_months": -12}, 422, 422),
        Kind("absurd age", png, {"sex": "F", "chronological_age_months": 5000}, 422, 422),
        Kind("age not a number", png, {"sex": "F", "chronological_age_months": "ten"}, 422, 422),
        # Valid but unusual: accepted and predicted.
        Kind(
            "16-bit PNG", _png(Image.fromarray((np.asarray(grey, np.uint16) * 257).astype(np.uint16))), male, 200, 200
        ),
        Kind("palette PNG", _png(grey.convert("P")), male, 200, 200),
        Kind("RGBA PNG", _png(grey.convert("RGBA")), male, 200, 200),
        Kind("CMYK JPEG", _save(grey.convert("CMYK"), "JPEG", quality=90), male, 200, 200),
        Kind("progressive JPEG", _save(grey, "JPEG", quality=90, progressive=True), male, 200, 200),
        Kind("MONOCHROME1 DICOM", _dicom(_monochrome1), {}, 200, 200),
        Kind("DICOM with malformed sex and age, sex sent", _dicom(_bad_sex_bad_age), male, 200, 200),
        Kind("DICOM with an absurd age (ignored, noted)", _dicom(_absurd_dicom_age), {}, 200, 200),
        Kind("sex as F, age as a decimal", png, {"sex": "F", "chronological_age_months": "84.5"}, 200, 200),
    ]


CORPUS = corpus()


def check(response: httpx.Response, expected: int, what: str) -> None:
    assert response.status_code == expected, f"{what}: {response.status_code} {response.text[:300]}"
    if expected >= 400:
        assert response.headers["content-type"] == "application/problem+json", what
        body = response.json()
        assert body["status"] == expected and len(body["detail"]) > 10, what
    else:
        assert 0 < response.json()["bone_age_months"] < 300, what


@pytest.mark.parametrize("kind", CORPUS, ids=[k.name for k in CORPUS])
def test_bad_and_odd_input_on_both_endpoints(client, kind):
    multipart = client.post("/v1/bone-age", files={"image": ("upload.png", kind.data)}, data=kind.fields)
    check(multipart, kind.multipart, f"multipart: {kind.name}")
    body = {"image": base64.b64encode(kind.data).decode(), **kind.fields}
    check(client.post("/v1/bone-age/json", json=body), kind.json, f"json: {kind.name}")
    assert client.get("/readyz").status_code == 200


REQUEST_LEVEL = [
    (
        "oversized upload",
        lambda c: c.post(
            "/v1/bone-age", files={"image": ("a.jpg", b"\xff\xd8\xff" + b"0" * 300_000)}, data={"sex": "male"}
        ),
        413,
    ),
    (
        "oversized base64",
        lambda c: c.post(
            "/v1/bone-age/json",
            json={"image": base64.b64encode(b"\xff\xd8\xff" + b"0" * 300_000).decode(), "sex": "male"},
        ),
        413,
    ),
    (
        "wrong content type (text/plain)",
        lambda c: c.post("/v1/bone-age", content=b"hello", headers={"content-type": "text/plain"}),
        415,
    ),
    ("JSON sent to the multipart endpoint", lambda c: c.post("/v1/bone-age", json={"image": "x"}), 415),
    ("multipart sent to the JSON endpoint", lambda c: c.post("/v1/bone-age/json", files={"image": ("a", b"x")}), 415),
    (
        "malformed multipart",
        lambda c: c.post("/v1/bone-age", content=b"--XX\r\nbroken", headers={"content-type": "multipart/form-data"}),
        400,
    ),
    (
        "multipart without the image part",
        lambda c: c.post("/v1/bone-age", data={"sex": "male"}, files={"other": ("a", b"x")}),
        422,
    ),
    (
        "malformed JSON",
        lambda c: c.post("/v1/bone-age/json", content=b'{"image": ', headers={"content-type": "application/json"}),
        422,
    ),
    ("bad base64", lambda c: c.post("/v1/bone-age/json", json={"image": "!!notbase64!!", "sex": "male"}), 400),
    (
        "unknown JSON field",
        lambda c: c.post("/v1/bone-age/json", json={"image": "aGk=", "sex": "male", "patient_name": "x"}),
        422,
    ),
    ("image as a JSON number", lambda c: c.post("/v1/bone-age/json", json={"image": 12, "sex": "male"}), 422),
]


@pytest.mark.parametrize(("name", "send", "status"), REQUEST_LEVEL, ids=[r[0] for r in REQUEST_LEVEL])
def test_malformed_requests(make_client, name, send, status):
    client = make_client(max_upload_mb=0.25)
    response = send(client)
    assert response.status_code == status, f"{name}: {response.text[:300]}"
    assert response.headers["content-type"] == "application/problem+json"
    assert client.get("/readyz").status_code == 200


# Property-based: schemathesis against the service's own OpenAPI document, on a real uvicorn.
# (Driven with hypothesis directly: schemathesis' lazy pytest fixture loader relies on a pytest
# attribute that pytest 9.2 removed.)


def test_property_based_no_server_errors_no_schema_violations(tmp_path, bundled_model):
    env = server.service_env(model_path=bundled_model, max_batch_size=4)
    with server.running("app.main:app", tmp_path / "uvicorn.log", env) as (url, _):
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 6
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case):
                # Every check except "schema-valid data must be accepted": the schema cannot say that
                # an upload must be a radiograph, so random bytes rightly get a documented 400.
                case.call_and_validate(base_url=url, excluded_checks=[positive_data_acceptance])

            run()
        assert httpx.get(url + "/readyz").status_code == 200


# Overload: twice the measured capacity for half a minute, against a real uvicorn.


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@pytest.mark.slow
@pytest.mark.alone
def test_overload_at_twice_capacity_for_half_a_minute(tmp_path, bundled_model):
    seconds = float(os.environ.get("BONEAGE_OVERLOAD_SECONDS", "30"))
    uploads = [
        (HALFRES_PNG.name, HALFRES_PNG.read_bytes(), "female"),
        (HOSPITAL_JPEG.name, HOSPITAL_JPEG.read_bytes(), "male"),
    ]
    # 32 admitted requests are a few seconds of work here, well within the default 30 s deadline. With
    # a deadline shorter than the queue's wait (5 s against the ensemble's ~5 s for 32), requests time
    # out inside the batch that computes them, and the work is thrown away.
    env = server.service_env(model_path=bundled_model, queue_size=32)
    with server.running("app.main:app", tmp_path / "uvicorn.log", env) as (url, proc):
        capacity = load.closed_loop(url, uploads, 8, 5).throughput
        rss_before = _rss_mb(proc.pid)
        rss: list[float] = []
        result = load.open_loop(url, uploads, 2 * capacity, seconds, tick=lambda: rss.append(_rss_mb(proc.pid)))
        after = load.closed_loop(url, uploads, 8, 5)
        rss_after = _rss_mb(proc.pid)
    figures = {
        "capacity_per_s": round(capacity, 1),
        "rate_per_s": round(2 * capacity, 1),
        "seconds": seconds,
        "sent": result.sent,
        "statuses": result.statuses,
        "failures": result.failures,
        "rss_before_mb": round(rss_before),
        "rss_peak_mb": round(max(rss, default=0)),
        "rss_after_mb": round(rss_after),
        "rss_samples": len(rss),
        "throughput_after_per_s": round(after.throughput, 1),
    }
    print("overload figures:", json.dumps(figures))
    answered = sum(result.statuses.values())
    assert answered == result.sent  # Every request is accounted for...
    # ...every one got an HTTP answer (status 0 would be a connection-level failure, named in
    # "failures"), and every answer is of a documented kind.
    assert set(result.statuses) <= {200, 503, 504}, figures
    assert result.statuses.get(503, 0) > 0 and result.retry_after_missing == 0
    assert result.statuses.get(200, 0) > 0.5 * capacity * seconds  # It kept serving at capacity.
    last_third = rss[-max(1, len(rss) // 3) :]
    assert figures["rss_peak_mb"] < rss_before + 600  # Memory stays bounded by the queue...
    # ...and is flat by the end, not still growing: 100 MB over the last third of a minute, scaled to
    # the run's length (a leak CI once caught grew 180 MB in 20 s).
    assert max(last_third) - min(last_third) < 100 * max(seconds, 30) / 60
    assert after.errors == 0 and after.throughput > 0.7 * capacity  # And it recovers.


# Faults.


@pytest.mark.parametrize(
    ("prepare", "problem"),
    [
        (lambda p, m: p / "missing.onnx", "model file not found"),
        (
            lambda p, m: (p / "cut.onnx").write_bytes(m.read_bytes()[:100_000]) and p / "cut.onnx",
            "not a readable ONNX model",
        ),
        (
            lambda p, m: (p / "foreign.onnx").write_bytes(b"\x08\x07" + os.urandom(2000)) and p / "foreign.onnx",
            "not a readable ONNX model",
        ),
    ],
)
def test_a_bad_model_file_stops_start_up_naming_file_and_problem(tmp_path, bundled_model, prepare, problem):
    path = prepare(tmp_path, bundled_model)
    env = server.service_env(model_path=path)
    with pytest.raises(RuntimeError) as failed, server.running("app.main:app", tmp_path / "log.txt", env, timeout=60):
        pass
    message = str(failed.value)
    assert "exited with" in message and f"{path}: {problem}" in message


def test_a_failing_batch_answers_its_callers_and_the_service_goes_on(client):
    runtime = client.app.state.runtime
    real = runtime.batcher.predict
    calls = {"n": 0}

    def fail_once(images, sex):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(images, sex)

    runtime.batcher.predict = fail_once
    files = {"image": ("h.png", HALFRES_PNG.read_bytes())}
    failed = client.post("/v1/bone-age", files=files, data={"sex": "male"})
    assert failed.status_code == 500 and failed.json()["title"] == "Inference failed"
    assert client.post("/v1/bone-age", files=files, data={"sex": "male"}).status_code == 200
    assert client.get("/readyz").status_code == 200


# Privacy.


def test_uploads_are_never_written_to_disk(make_client, monkeypatch):
    rolled = []
    original = tempfile.SpooledTemporaryFile.rollover
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(True) or original(self))
    client = make_client(out_of_distribution="warn")  # a noisy hand may be refused by the gate; read all the same
    noise = np.random.default_rng(1).integers(0, 256, (1800, 1800), dtype=np.uint8)
    noise[:, :] = np.maximum(noise, np.asarray(Image.open(HALFRES_PNG).resize((1800, 1800))))
    big = _png(Image.fromarray(noise))
    assert len(big) > 2 * 1024 * 1024  # Larger than Starlette's default 1 MB in-memory spool.
    assert client.post("/v1/bone-age", files={"image": ("big.png", big)}, data={"sex": "male"}).status_code == 200
    # A part just over the image limit but within what the door lets in (form framing): refused by the
    # endpoint, but read in memory like any other.
    monkeypatch.setattr(MultiPartParser, "spool_max_size", 1024 * 1024)  # Starlette's default: one app per process
    small = make_client(max_upload_mb=1)
    over = big[: 1024 * 1024 + 30 * 1024]
    response = small.post("/v1/bone-age", files={"image": ("big.png", over)}, data={"sex": "male"})
    assert response.status_code == 413 and "The image is" in response.json()["detail"]
    assert rolled == []
