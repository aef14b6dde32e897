"""An answer a clinician can trust: an interval on every bone age, and a refusal for what cannot be rated."""

from __future__ import annotations

import json
import logging

import onnx
import pytest

from bench.negatives import packaged
from export.modelfile import PREFIX
from tests.conftest import HALFRES_PNG, SMALL_DICOM

OOD = "/problems/out-of-distribution"


def post(client, data: bytes, name: str = "image.png", **fields):
    return client.post("/v1/bone-age", files={"image": (name, data)}, data={"sex": "female", **fields})


def photograph(name: str) -> bytes:
    return dict(packaged())[f"skimage/{name}"]


def with_gate_threshold(path, tmp_path, threshold: float):
    """A copy of a model file whose gate refuses everything scoring above ``threshold``."""
    model = onnx.load(path)
    for prop in model.metadata_props:
        if prop.key == PREFIX + "gate":
            prop.value = json.dumps(json.loads(prop.value) | {"threshold": threshold})
    out = tmp_path / "strict.onnx"
    onnx.save(model, out)
    return out


def test_every_answer_carries_a_prediction_interval_around_its_bone_age(make_client, calibrated_onnx):
    body = post(make_client(model_path=calibrated_onnx), HALFRES_PNG.read_bytes(), chronological_age_months=40).json()
    months, interval = body["bone_age_months"], body["bone_age_interval_months"]
    assert interval["level"] == 0.9 and interval["lower"] <= months <= interval["upper"]
    assert body["bone_age_interval_years"]["upper"] == pytest.approx(interval["upper"] / 12, abs=0.06)
    a = body["assessment"]
    assert a["z_score_interval"][0] <= a["z_score"] <= a["z_score_interval"][1]
    assert "90% interval" in a["statement"] and "whole prediction interval" in a["rule"]


def test_the_interval_level_is_a_setting(make_client, calibrated_onnx):
    wide = post(make_client(model_path=calibrated_onnx), HALFRES_PNG.read_bytes()).json()["bone_age_interval_months"]
    client = make_client(model_path=calibrated_onnx, interval_level=0.6)
    narrow = post(client, HALFRES_PNG.read_bytes()).json()["bone_age_interval_months"]
    assert narrow["level"] == 0.6 and narrow["upper"] - narrow["lower"] < wide["upper"] - wide["lower"]


def test_the_model_endpoint_describes_the_interval_and_gate_without_their_raw_statistics(make_client, calibrated_onnx):
    info = make_client(model_path=calibrated_onnx).get("/v1/model").json()
    assert info["interval"]["level"] == 0.9 and 110 <= info["interval"]["validation_images"] <= 130
    assert sum(b["n"] for b in info["interval"]["bands"]) == info["interval"]["validation_images"]
    assert info["gate"]["threshold"] > 0 and info["gate"]["action"] == "refuse"
    assert "interval" not in info["metadata"] and "gate" not in info["metadata"]
    assert len(json.dumps(info)) < 20_000


def test_a_colour_photograph_is_refused_as_an_image_that_cannot_be_rated(client):
    response = post(client, photograph("coffee.png"), "coffee.png")
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == OOD and problem["title"] == "Image cannot be rated"
    assert "photograph" in problem["detail"]
    assert "boneage_out_of_distribution_total 1.0" in client.get("/metrics").text


def test_an_inverted_radiograph_is_refused_and_the_same_radiograph_upright_is_not(client):
    """White background, dark bones: a radiograph exported or scanned inverted is not rated as it is."""
    from bench.negatives import _grey8, _png

    hand = _grey8(HALFRES_PNG)
    assert post(client, _png(hand), "hand.png").status_code == 200
    response = post(client, _png(255 - hand), "inverted.png")
    assert response.status_code == 422 and response.json()["type"] == OOD
    assert "inverted" in response.json()["detail"]


def test_set_to_warn_the_service_answers_with_the_reason_as_a_warning(make_client):
    response = post(make_client(out_of_distribution="warn"), photograph("coffee.png"), "coffee.png")
    assert response.status_code == 200 and "photograph" in response.json()["warnings"][0]


def test_an_image_beyond_the_gate_is_refused_and_with_warn_answered_with_a_warning(
    make_client, calibrated_onnx, tmp_path
):
    strict = with_gate_threshold(calibrated_onnx, tmp_path, 0.0)
    response = post(make_client(model_path=strict), SMALL_DICOM.read_bytes(), "hand.dcm")
    assert response.status_code == 422 and response.json()["type"] == OOD
    assert "unlike the children's hand radiographs" in response.json()["detail"]
    warned = post(make_client(model_path=strict, out_of_distribution="warn"), SMALL_DICOM.read_bytes(), "hand.dcm")
    assert warned.status_code == 200 and "feature distance" in warned.json()["warnings"][0]
    assert warned.json()["bone_age_interval_months"] is not None


def test_rsna_hands_pass_the_gate_of_a_calibrated_model_about_as_often_as_it_promises(
    make_client, calibrated_onnx, data_dir
):
    """The gate is set at the 99th percentile of its validation images' distances, so nearly every
    RSNA hand passes. Only RSNA hands here: a one-epoch 71 px model's features are too rough to
    promise anything about other scanners (a GE DICOM sat at 0.91 of the threshold on one machine and
    above it on another); the bundled model passes the fixtures of three sources
    (test_the_real_hands_in_the_fixtures_pass_the_file_checks)."""
    client = make_client(model_path=calibrated_onnx)
    hands = [HALFRES_PNG, *sorted((data_dir / "rsna-halfres" / "images").glob("*.png"))[:19]]
    answers = [post(client, path.read_bytes(), path.name) for path in hands]
    passed = [r.status_code == 200 and r.json()["warnings"] == [] for r in answers]
    assert passed[0] and sum(passed) >= 18, [h.name for h, ok in zip(hands, passed, strict=True) if not ok]


def test_a_model_file_without_calibration_is_served_and_says_so_once(make_client, calibrated_onnx, tmp_path, caplog):
    # As `python -m export --no-calibration` writes it: the same file without its interval and gate.
    model = onnx.load(calibrated_onnx)
    kept = [p for p in model.metadata_props if p.key not in (PREFIX + "interval", PREFIX + "gate")]
    assert len(kept) == len(model.metadata_props) - 2
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, tmp_path / "uncalibrated.onnx")
    with caplog.at_level(logging.WARNING, logger="boneage"):
        client = make_client(model_path=tmp_path / "uncalibrated.onnx")
    said = [r.getMessage() for r in caplog.records]
    assert sum("no prediction interval" in m for m in said) == 1
    assert sum("no out-of-distribution gate" in m for m in said) == 1
    body = post(client, HALFRES_PNG.read_bytes(), chronological_age_months=40).json()
    assert body["bone_age_interval_months"] is None and body["warnings"] == []
    assert "no prediction interval" in body["assessment"]["statement"]
    info = client.get("/v1/model").json()
    assert info["interval"] is None and info["gate"] is None


def test_a_level_beyond_what_the_calibration_supports_stops_the_start_with_the_reason(make_client, calibrated_onnx):
    with pytest.raises(RuntimeError, match="more than this model's calibration supports"):
        make_client(model_path=calibrated_onnx, interval_level=0.999)


@pytest.mark.parametrize("case", ["rotated 90°", "fingers only", "side by side"])
def test_a_hand_on_its_side_cropped_to_the_fingers_or_doubled_is_refused_before_the_model(client, case):
    from bench.negatives import made_from_hands

    made = dict(made_from_hands([SMALL_DICOM, HALFRES_PNG]))
    name = next(n for n in made if case in n)  # the DICOM's hand: 0.75 wide for 1 high, 1.33 on its side
    response = post(client, made[name], "hand.png")
    assert response.status_code == 422 and response.json()["type"] == OOD, name
    assert "as wide as it is tall" in response.json()["detail"]


def test_the_real_hands_in_the_fixtures_pass_the_file_checks(client):
    from tests.conftest import HOSPITAL_JPEG

    for path in (HALFRES_PNG, HOSPITAL_JPEG, SMALL_DICOM):
        response = post(client, path.read_bytes(), path.name)
        assert response.status_code == 200 and response.json()["warnings"] == [], path.name


def test_a_radiograph_inside_a_viewer_screenshot_is_refused_for_its_coloured_interface(client):
    """A screenshot keeps the hand's grey and its own coloured bars; no radiograph has those."""
    from bench.negatives import _grey8, _png, screenshot

    response = post(client, _png(screenshot(_grey8(HALFRES_PNG))), "screenshot.png")
    assert response.status_code == 422 and response.json()["type"] == OOD
    assert "screenshot" in response.json()["detail"]


def test_every_real_hand_radiograph_here_passes_the_file_checks(data_dir):
    """Hospital JPEGs (phone photos of films among them), infant PNGs and the full-resolution set:
    the checks before the model refuse none (the gate's figures: docs/trust/trust.md)."""
    from app.quality import file_findings
    from radiograph import PreprocessSpec, load_model_input

    paths = [
        *sorted((data_dir / "unlabelled").rglob("*.jpg")),
        *sorted((data_dir / "unlabelled").rglob("*.png")),
        *sorted((data_dir / "rsna-fullres").rglob("*.png")),
        data_dir / "dicom" / "hand-dx-ge-14bit.dcm",
    ]
    assert len(paths) >= 40
    for path in paths:
        _, decoded = load_model_input(path.read_bytes(), PreprocessSpec(input_size=224))
        assert file_findings(decoded) == [], path.name
