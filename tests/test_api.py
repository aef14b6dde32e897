"""The HTTP API in-process (lifespan really runs): a user's checklist, one endpoint at a time."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from openapi_spec_validator import validate
from PIL import Image

from export.modelfile import open_session
from radiograph import load_model_input
from tests.conftest import HALFRES_PNG, HOSPITAL_JPEG, SMALL_DICOM, THUMBNAILS


def post(client, path, sex=None, age=None, content_type="application/octet-stream", **extra):
    data = {k: v for k, v in {"sex": sex, "chronological_age_months": age}.items() if v is not None}
    return client.post(
        "/v1/bone-age", files={"image": (path.name, path.read_bytes(), content_type)}, data=data, **extra
    )


def is_problem(response, status: int, detail: str = "") -> bool:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and detail.lower() in body["detail"].lower()
    return True


def test_a_png_with_sex_gets_bone_age_in_months_and_years(client):
    r = post(client, HALFRES_PNG, sex="female")
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 < body["bone_age_months"] < 300
    assert body["bone_age_years"] == round(body["bone_age_months"] / 12, 1)
    assert (body["sex"], body["sex_source"], body["assessment"]) == ("female", "request", None)
    assert body["model"]["name"] and re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
    assert r.headers["x-request-id"] == body["request_id"]


def test_a_hospital_jpeg_with_m_and_age_gets_an_assessment(client):
    body = post(client, HOSPITAL_JPEG, sex="M", age=47).json()
    a = body["assessment"]
    assert body["sex"] == "male" and body["chronological_age_source"] == "request"
    assert a["sd_months"] == pytest.approx(6.66 - (48 - 47) / 6 * (6.66 - 5.4), abs=0.01)
    assert a["z_score"] == pytest.approx((body["bone_age_months"] - 47) / a["sd_months"], abs=0.02)
    # Indeterminate too: the interval rule says so when the model's own interval straddles ±2 SD.
    assert a["classification"] in ("delayed", "normal", "advanced", "indeterminate") and "Greulich" in a["sd_source"]


def test_the_real_dicom_supplies_sex_and_age(client):
    body = post(client, SMALL_DICOM, content_type="application/dicom").json()
    assert (body["sex"], body["sex_source"]) == ("female", "dicom")
    assert (body["chronological_age_months"], body["chronological_age_source"]) == (84.0, "dicom")
    assert body["assessment"]["sd_months"] == 9.64


def test_the_request_overrides_the_dicom_and_says_so(client):
    body = post(client, SMALL_DICOM, sex="male", age=90).json()
    assert (body["sex"], body["sex_source"], body["chronological_age_source"]) == ("male", "request", "request")
    assert any("differs from the request" in note for note in body["notes"])


def test_json_endpoint_gives_the_same_answer_as_multipart(client):
    multipart = post(client, HALFRES_PNG, sex="F", age=40).json()
    payload = {
        "image": base64.b64encode(HALFRES_PNG.read_bytes()).decode(),
        "sex": "female",
        "chronological_age_months": 40,
    }
    body = client.post("/v1/bone-age/json", json=payload).json()
    for key in ("bone_age_months", "sex", "assessment"):
        assert body[key] == multipart[key]


def test_the_service_computes_what_the_model_file_computes(client, bundled_model):
    session, model = open_session(bundled_model)
    for path in [*sorted(THUMBNAILS.glob("*.png"))[:3], HALFRES_PNG]:
        tensor, _ = load_model_input(path.read_bytes(), model.spec)
        expected = session.run(None, {"image": tensor[None], "sex": np.array([[1.0]], np.float32)})[0].item()
        assert post(client, path, sex="male").json()["bone_age_months"] == round(expected, 1)


def test_model_health_readiness_and_metrics(client):
    info = client.get("/v1/model").json()
    assert info["input_size"] == info["preprocessing"]["input_size"]
    assert info["execution_providers"][-1] == "CPUExecutionProvider"
    assert info["batching"]["max_batch_size"] == 4 and "training_data" in info["metadata"]
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert client.get("/readyz").json()["status"] == "ready"
    post(client, HALFRES_PNG, sex="female")
    post(client, HALFRES_PNG)
    text = client.get("/metrics").text
    assert 'boneage_requests_total{endpoint="/v1/bone-age",status="200"} 1.0' in text
    assert 'boneage_requests_total{endpoint="/v1/bone-age",status="422"} 1.0' in text
    for name in (
        "boneage_request_latency_seconds_bucket",
        "boneage_batch_size_bucket",
        "boneage_queue_depth",
        "boneage_queue_wait_seconds_bucket",
        "boneage_inference_seconds_bucket",
    ):
        assert name in text


@pytest.mark.parametrize(("sex", "message"), [(None, "sex is required"), ("x", "sex"), ("unknown", "sex")])
def test_missing_or_unknown_sex_is_422(client, sex, message):
    assert is_problem(post(client, HALFRES_PNG, sex=sex), 422, message)


@pytest.mark.parametrize("age", ["-3", "0", "301", "ten"])
def test_impossible_ages_are_422(client, age):
    assert is_problem(post(client, HALFRES_PNG, sex="male", age=age), 422, "chronological_age_months")


def test_bad_images_get_the_documented_status(client, tmp_path):
    text = tmp_path / "hand.png"
    text.write_text("not an image")
    assert is_problem(post(client, text, sex="male"), 400, "not a recognisable image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(HALFRES_PNG.read_bytes()[:5000])
    assert is_problem(post(client, truncated, sex="male"), 400, "truncated")
    gif = tmp_path / "hand.gif"
    Image.open(HALFRES_PNG).save(gif)
    assert is_problem(post(client, gif, sex="male"), 415, "GIF")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert is_problem(post(client, empty, sex="male"), 400, "empty")
    assert client.get("/readyz").status_code == 200


def test_limits_on_upload_size_and_pixels_are_413(make_client, tmp_path):
    client = make_client(max_upload_mb=0.01, max_pixels=100_000)
    assert is_problem(post(client, HOSPITAL_JPEG, sex="male"), 413, "limit")
    big = tmp_path / "big.png"
    buf = io.BytesIO()
    Image.new("L", (400, 400)).save(buf, format="PNG")
    big.write_bytes(buf.getvalue())
    assert is_problem(post(client, big, sex="male"), 413, "limit is 100,000")


def test_json_errors(client):
    assert is_problem(client.post("/v1/bone-age/json", json={"image": "%%%not base64", "sex": "male"}), 400, "base64")
    bad = client.post("/v1/bone-age/json", content=b"{not json", headers={"content-type": "application/json"})
    assert is_problem(bad, 422)
    assert is_problem(client.post("/v1/bone-age/json", json={"sex": "male"}), 422, "image")


def test_an_api_key_protects_v1_when_configured(make_client):
    client = make_client(api_key="s3cret")
    assert is_problem(post(client, HALFRES_PNG, sex="male"), 401, "X-API-Key")
    assert is_problem(client.get("/v1/model", headers={"X-API-Key": "wrong"}), 401)
    assert post(client, HALFRES_PNG, sex="male", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/healthz").status_code == 200  # Probes stay open for the orchestrator.


def test_an_empty_api_key_setting_means_no_key(monkeypatch):
    """Compose passes an unset ``${BONEAGE_API_KEY:-}`` as an empty string: that must not lock everyone out."""
    from app.config import Settings

    monkeypatch.setenv("BONEAGE_API_KEY", "")
    assert Settings().api_key is None
    monkeypatch.setenv("BONEAGE_API_KEY", "s3cret")
    assert Settings().api_key.get_secret_value() == "s3cret"


def test_cors_is_off_unless_configured(make_client):
    closed = make_client().options(
        "/v1/model", headers={"Origin": "https://x.example", "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in closed.headers
    open_ = make_client(cors_origins=["https://x.example"]).options(
        "/v1/model", headers={"Origin": "https://x.example", "Access-Control-Request-Method": "GET"}
    )
    assert open_.headers["access-control-allow-origin"] == "https://x.example"


@pytest.mark.parametrize(("page", "marker"), [("/docs", "swagger-ui"), ("/redoc", "redoc")])
def test_api_pages_are_served_from_the_package_without_internet(client, page, marker):
    """Issue 12 item 11: ReDoc loaded its fonts from Google; no page may reference an outside host."""
    html = client.get(page).text
    assert marker in html
    assets = re.findall(r'(?:src|href|spec-url)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from a CDN
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert "https://" not in html and "http://" not in html


def test_openapi_document_is_valid_and_documents_examples(client):
    spec = client.get("/openapi.json").json()
    validate(spec)
    paths = spec["paths"]
    assert {"/v1/bone-age", "/v1/bone-age/json", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert {"400", "413", "415", "422", "503", "504"} <= set(paths["/v1/bone-age"]["post"]["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["BoneAgeResponse"]["examples"] and schemas["Problem"]["examples"]


def test_when_the_batcher_stops_for_good_readiness_fails_and_requests_get_503_at_once(client):
    """Issue 12 item 3: a dead batcher must not look ready nor leave requests waiting for their deadline."""
    import time

    batcher = client.app.state.runtime.batcher

    async def broken_collect():
        raise RuntimeError("injected failure while collecting")

    assert client.get("/readyz").status_code == 200
    batcher._collect = broken_collect
    post = {"files": {"image": ("a.png", HALFRES_PNG.read_bytes())}, "data": {"sex": "female"}}
    client.post("/v1/bone-age", **post)  # wakes the loop; it then fails on every restart
    deadline = time.monotonic() + 5
    while batcher.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "batcher" in ready.json()["detail"]
    assert client.get("/healthz").status_code == 503  # liveness too: an orchestrator replaces the process
    started = time.monotonic()
    response = client.post("/v1/bone-age", **post)
    assert response.status_code == 503 and time.monotonic() - started < 2


def test_a_compressed_dicom_from_pacs_gets_the_same_answer_as_the_uncompressed_one(client, tmp_path):
    from tests.test_decode import transcoded

    lossless = transcoded(SMALL_DICOM, "JPEGLosslessProcess14_1", tmp_path / "jpeg-lossless.dcm")
    answers = [
        client.post("/v1/bone-age", files={"image": (p.name, p.read_bytes())}).json() for p in (SMALL_DICOM, lossless)
    ]
    assert answers[0]["bone_age_months"] == answers[1]["bone_age_months"]
    assert answers[1]["sex_source"] == "dicom" and answers[1]["chronological_age_source"] == "dicom"


def test_refusals_at_the_door_carry_cors_headers(make_client):
    """Issue 12 item 6: Admission answered 401/503 outside CORS, so browsers could not read them."""
    client = make_client(api_key="secret", cors_origins=["https://x.example"])
    response = client.post(
        "/v1/bone-age", files={"image": ("a.png", HALFRES_PNG.read_bytes())}, headers={"Origin": "https://x.example"}
    )
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "https://x.example"


def test_an_unexpected_error_is_answered_logged_and_counted(client, caplog):
    """Issue 12 item 6: an exception used to skip the request log line and the metrics."""
    import logging

    async def broken_submit(*args, **kwargs):
        raise KeyError("injected")

    client.app.state.runtime.batcher.submit = broken_submit
    with caplog.at_level(logging.INFO, logger="boneage"):
        response = client.post("/v1/bone-age", files={"image": ("a.png", HALFRES_PNG.read_bytes())}, data={"sex": "F"})
    assert response.status_code == 500 and response.headers["content-type"] == "application/problem+json"
    request_id = response.headers["x-request-id"]
    assert response.json()["request_id"] == request_id
    lines = [r.getMessage() for r in caplog.records]
    assert any(request_id in m and "status=500" in m for m in lines), lines
    assert 'boneage_requests_total{endpoint="/v1/bone-age",status="500"} 1.0' in client.get("/metrics").text


def test_a_request_past_the_deadline_gets_504_and_the_service_goes_on(make_client):
    """docs/reliability.md lists it; now through HTTP: a model call slower than the deadline."""
    import time

    # A deadline the next, normal request meets with room to spare on a busy machine (the bundled
    # ensemble takes about 0.1 s alone), and a model call well past it.
    client = make_client(request_timeout_s=2.0)
    batcher = client.app.state.runtime.batcher
    real = batcher.predict

    def slow(images, sex):
        time.sleep(3.0)
        return real(images, sex)

    batcher.predict = slow
    files = {"image": ("h.png", HALFRES_PNG.read_bytes())}
    response = client.post("/v1/bone-age", files=files, data={"sex": "male"})
    assert response.status_code == 504 and response.json()["title"] == "Timed out"
    batcher.predict = real
    time.sleep(1.5)  # the slow call still holds the model thread
    assert client.post("/v1/bone-age", files=files, data={"sex": "male"}).status_code == 200


def test_the_json_body_is_parsed_and_decoded_off_the_event_loop(client, monkeypatch):
    """Issue 12 item 7: a large JSON body's parse and base64 decode stalled the loop that drives batching."""
    import threading

    from app.api import bone_age

    threads = []
    real = bone_age.parse_json_request

    def recording(raw):
        threads.append(threading.current_thread().name)
        return real(raw)

    monkeypatch.setattr(bone_age, "parse_json_request", recording)
    body = {"image": base64.b64encode(HALFRES_PNG.read_bytes()).decode(), "sex": "F"}
    assert client.post("/v1/bone-age/json", json=body).status_code == 200
    assert len(threads) == 1 and threads[0].startswith("preprocess"), threads
    invalid = client.post("/v1/bone-age/json", json={"image": "x", "sex": "X"})
    assert invalid.status_code == 422 and invalid.json()["errors"][0]["loc"][:2] == ["body", "sex"]
