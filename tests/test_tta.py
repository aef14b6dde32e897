"""The TTA probe's views: the same picture, moved or scaled, on the model's own background."""

from __future__ import annotations

import numpy as np

from radiograph import PreprocessSpec, decode_file, preprocess
from tests.conftest import HALFRES_PNG
from training.tta import shift, views, zoom


def grey() -> np.ndarray:
    return preprocess(decode_file(HALFRES_PNG).pixels, PreprocessSpec(input_size=96))[:, :, 0]


def test_every_view_keeps_the_side_and_the_value_range():
    picture = grey()
    for name, view in views(96).items():
        out = view(picture)
        assert out.shape == (96, 96), name
        assert out.min() >= -1.0 and out.max() <= 1.0 + 1e-6, name
    assert np.array_equal(views(96)["as served"](picture), picture)


def test_zooming_out_pads_with_background_and_zooming_in_fills_the_frame():
    picture = grey()
    out = zoom(1.07)(picture)
    assert (out[0] == -1).all() and (out[:, 0] == -1).all()  # a border of background
    assert zoom(0.93)(picture).std() > 0 and not np.array_equal(zoom(0.93)(picture), picture)


def test_a_shift_moves_the_picture_and_pads_the_edge_it_left():
    picture = grey()
    moved = shift(3)(picture)
    assert np.array_equal(moved[3:, 3:], picture[:-3, :-3])
    assert (moved[:3] == -1).all() and (moved[:, :3] == -1).all()
    assert np.array_equal(shift(-3)(picture)[:-3, :-3], picture[3:, 3:])
