"""The heatmap: which squares of the radiograph moved the bone age (occlusion sensitivity)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from app.explain import occluded_copies
from radiograph import load_model_input
from tests.conftest import HALFRES_PNG, SMALL_DICOM
from tests.test_api import is_problem, post


def explain(client, path, **data):
    return client.post("/v1/bone-age/explain", files={"image": (path.name, path.read_bytes())}, data=data)


def test_each_occluded_copy_differs_from_the_image_in_its_own_square_only():
    image = np.random.default_rng(0).uniform(-1, 1, (30, 30, 3)).astype(np.float32)
    copies = occluded_copies(image, grid=3)
    assert copies.shape == (9, 30, 30, 3)
    for k, copy in enumerate(copies):
        changed = np.argwhere((copy != image).any(axis=2))
        rows, cols = changed[:, 0], changed[:, 1]
        r, c = divmod(k, 3)
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10 * r, 10 * r + 9, 10 * c, 10 * c + 9)
        assert np.allclose(copy[10 * r, 10 * c], image.mean(), atol=1e-6)


def test_explain_gives_the_same_bone_age_with_a_grid_and_an_overlay_of_what_the_model_saw(client):
    plain = post(client, HALFRES_PNG, sex="female", age=40).json()
    response = explain(client, HALFRES_PNG, sex="female", chronological_age_months="40", grid="6")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["bone_age"]["bone_age_months"] == plain["bone_age_months"]
    assert body["bone_age"]["assessment"]["classification"] == plain["assessment"]["classification"]
    heat = body["explanation"]
    grid = np.array(heat["change_months"])
    assert grid.shape == (6, 6) and heat["model_inputs"] == 37
    assert np.abs(grid).max() > 0.5  # covering parts of a hand changes the answer
    # Each cell is that square's covered copy through the served model, minus the whole image's answer.
    runtime = client.app.state.runtime
    tensor, _ = load_model_input(HALFRES_PNG.read_bytes(), runtime.model.spec)
    copies = occluded_copies(tensor, 6)
    sex = np.zeros((len(copies), 1), np.float32)
    base = runtime.model.predict(tensor[None], sex[:1])[0].months
    expected = np.array([p.months for p in runtime.model.predict(copies, sex)]).reshape(6, 6) - base
    np.testing.assert_allclose(grid, expected, atol=0.02)
    assert "not evidence" in heat["caveat"]
    overlay = Image.open(io.BytesIO(base64.b64decode(heat["overlay_png_base64"])))
    side = client.get("/v1/model").json()["preprocessing"]["input_size"]
    assert (overlay.format, overlay.mode, overlay.size) == ("PNG", "RGB", (side, side))
    # The strongest square is drawn in colour; the plain radiograph stays grey.
    pixels = np.asarray(overlay).astype(int)
    assert (np.ptp(pixels, axis=2) > 60).any() and (np.ptp(pixels, axis=2) == 0).any()


def test_explain_reads_a_dicom_like_the_plain_endpoint(client):
    response = explain(client, SMALL_DICOM)
    assert response.status_code == 200, response.text
    assert response.json()["bone_age"]["sex_source"] == "dicom"


@pytest.mark.parametrize("grid", ["2", "17", "x"])
def test_an_unusable_grid_is_422(client, grid):
    assert is_problem(explain(client, HALFRES_PNG, sex="male", grid=grid), 422)


def test_explain_without_sex_is_refused_like_the_plain_endpoint(client):
    assert is_problem(explain(client, HALFRES_PNG), 422, "sex is required")
