"""Preprocessing: shape and range contracts, border removal, one path for training and serving."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radiograph import EmptyImage, PreprocessSpec, decode_file, load_model_input, preprocess
from radiograph.preprocess import _percentiles_from_counts, crop_uniform_borders, make_square, robust_normalize
from tests.conftest import HALFRES_PNG, HOSPITAL_JPEG, SMALL_DICOM, THUMBNAILS
from training import data


@pytest.mark.parametrize("path", [HALFRES_PNG, HOSPITAL_JPEG, SMALL_DICOM])
@pytest.mark.parametrize("size", [71, 100, 299])
def test_every_format_becomes_a_square_three_channel_tensor_in_minus_one_to_one(path, size):
    x = preprocess(decode_file(path).pixels, PreprocessSpec(input_size=size))
    assert x.shape == (size, size, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() < x.max() <= 1.0
    assert np.array_equal(x[..., 0], x[..., 2])  # grey replicated to 3 channels


def test_robust_normalisation_ignores_a_few_extreme_pixels():
    rng = np.random.default_rng(0)
    image = rng.uniform(100, 200, size=(200, 200)).astype(np.float32)
    image[0, :5] = 10_000  # a burned-in label or hot pixel
    out = robust_normalize(image, 0.5, 99.5)
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.median(out) == pytest.approx(0.5, abs=0.05)  # contrast not squashed by the outlier


def test_black_padding_is_removed():
    hand = robust_normalize(decode_file(HALFRES_PNG).pixels, 0.5, 99.5)
    h, w = hand.shape
    padded = np.zeros((h + 300, w + 500), np.float32)
    padded[100 : 100 + h, 400 : 400 + w] = hand
    cropped = crop_uniform_borders(padded, 0.02)
    assert cropped.shape[0] <= h and cropped.shape[1] <= w
    assert cropped.shape[0] > 0.9 * h and cropped.shape[1] > 0.9 * w


def test_hospital_jpeg_margins_are_cropped():
    image = robust_normalize(decode_file(HOSPITAL_JPEG).pixels, 0.5, 99.5)
    cropped = crop_uniform_borders(image, 0.02)
    assert cropped.shape[1] < 0.5 * image.shape[1]  # the wide black side margins are gone


def test_pad_mode_keeps_aspect_ratio_with_black_bars():
    image = np.ones((50, 100), np.float32)
    square = make_square(image, "pad")
    assert square.shape == (100, 100)
    assert square[:25].max() == 0 and square[25:75].min() == 1 and square[75:].max() == 0
    assert make_square(image, "stretch") is image


def test_a_blank_image_is_refused_as_unusable():
    with pytest.raises(EmptyImage, match="blank"):
        preprocess(np.full((300, 200), 0.3, np.float32), PreprocessSpec())
    noisy_border_only = np.zeros((300, 300), np.float32)
    noisy_border_only[0, :] = 1
    with pytest.raises(EmptyImage):
        preprocess(noisy_border_only, PreprocessSpec())


def test_training_and_serving_give_bit_for_bit_the_same_tensor(tmp_path):
    spec = PreprocessSpec(input_size=71, square="pad")
    paths = [*sorted(THUMBNAILS.glob("*.png"))[:4], HALFRES_PNG]
    # Training: parallel worker processes, through the on-disk cache (second call reads it).
    trained = data.load_images(paths * 20, spec, cache_dir=tmp_path, workers=2)
    cached = data.load_images(paths * 20, spec, cache_dir=tmp_path, workers=2)
    # Serving: the uploaded bytes.
    served = np.stack([load_model_input(p.read_bytes(), spec)[0] for p in paths])
    assert np.array_equal(trained[: len(paths)], served)
    assert np.array_equal(cached, trained)


def test_spec_round_trips_and_invalid_specs_are_refused():
    spec = PreprocessSpec(input_size=299, square="pad")
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="input_size"):
        PreprocessSpec.from_json('{"input_size": 12}')
    with pytest.raises(ValueError, match="not valid JSON"):
        PreprocessSpec.from_json("{nope")
    with pytest.raises(ValueError, match="unknown_step: Extra inputs"):
        PreprocessSpec.from_json('{"unknown_step": true}')


def test_realistic_images_all_preprocess(data_dir):
    spec = PreprocessSpec(input_size=100)
    for path in sorted((data_dir / "unlabelled").rglob("*.*")) + sorted((data_dir / "rsna-fullres").rglob("*.png")):
        x = preprocess(decode_file(path).pixels, spec)
        assert np.isfinite(x).all() and x.std() > 0.05, path


# The integer road (8/16-bit files) is a faster way to the same numbers ----------------------


def _float_road(pixels: np.ndarray) -> np.ndarray:
    """What decoding gave before it kept integers: the same levels as float32 fractions."""
    full_scale = np.float32(np.iinfo(pixels.dtype).max)
    return pixels.astype(np.float32) / full_scale


@pytest.mark.parametrize("path", [HALFRES_PNG, HOSPITAL_JPEG, *sorted(THUMBNAILS.glob("*.png"))[:6]])
def test_8bit_files_give_bit_for_bit_the_tensor_of_the_float_road(path):
    spec = PreprocessSpec(input_size=128)
    pixels = decode_file(path).pixels
    assert pixels.dtype == np.uint8
    assert np.array_equal(preprocess(pixels, spec), preprocess(_float_road(pixels), spec))


def test_16bit_files_give_bit_for_bit_the_tensor_of_the_float_road():
    wide = decode_file(HALFRES_PNG).pixels.astype(np.uint16) * 256 + 100  # 100…65380
    spec = PreprocessSpec(input_size=100, square="pad")
    assert np.array_equal(preprocess(wide, spec), preprocess(_float_road(wide), spec))


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.integers(0, 255), min_size=1, max_size=400),
    low=st.floats(0, 49.9),
    high=st.floats(50.1, 100),
    wide=st.booleans(),
)
def test_percentiles_from_a_histogram_equal_numpys(values, low, high, wide):
    dtype, full_scale = (np.uint16, 65535) if wide else (np.uint8, 255)
    pixels = np.asarray(values, dtype=dtype) * (257 if wide else 1)
    levels = np.arange(full_scale + 1, dtype=np.float32) / np.float32(full_scale)
    counts = np.bincount(pixels, minlength=full_scale + 1)
    expected = np.percentile(_float_road(pixels), [low, high])
    assert np.array_equal(_percentiles_from_counts(counts, levels, [low, high]), expected)


@settings(max_examples=300, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 120), st.integers(1, 120)),
    lines=st.lists(st.tuples(st.booleans(), st.floats(0, 1), st.integers(0, 10_000)), max_size=12),
)
def test_searching_borders_from_the_edges_finds_the_window_of_a_full_scan(shape, lines):
    image = np.zeros(shape, np.float32)
    rng = np.random.default_rng(len(lines))
    for is_row, where, seed in lines:  # sparse non-uniform rows and columns anywhere
        if is_row:
            image[int(where * (shape[0] - 1))] = np.random.default_rng(seed).random(shape[1])
        else:
            image[:, int(where * (shape[1] - 1))] = rng.random(shape[0])
    rows = np.flatnonzero(image.std(axis=1) > 0.02)
    cols = np.flatnonzero(image.std(axis=0) > 0.02)
    if rows.size < 8 or cols.size < 8:
        with pytest.raises(EmptyImage):
            crop_uniform_borders(image, 0.02)
    else:
        window = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        cropped = crop_uniform_borders(image, 0.02)
        assert cropped.shape == window.shape
        assert np.array_equal(cropped, window)


def _borderline_column(rows: int = 100) -> np.ndarray:
    """A column whose std is just above the border tolerance when NumPy sums it as part of an
    image (row by row) and not above it when it sums the lone column (pairwise)."""
    for seed in range(200):
        base = np.random.default_rng(seed).random(rows).astype(np.float32)
        lo, hi = 0.0, 1.0
        for _ in range(60):  # the smallest scale at which the in-image std exceeds the tolerance
            mid = (lo + hi) / 2
            column = base * np.float32(mid)
            lo, hi = (lo, mid) if np.stack([column, column], axis=1).std(axis=0)[0] > 0.02 else (mid, hi)
        column = base * np.float32(hi)
        if not column.std() > 0.02:
            return column
    raise AssertionError("no borderline column found")


def test_a_column_on_the_tolerance_is_judged_as_a_full_scan_judges_it():
    column = _borderline_column()
    image = np.zeros((100, 33), np.float32)
    image[:, 5:21] = np.random.default_rng(0).random((100, 16))
    image[:, 32] = column  # alone in the last band, one column wide
    assert crop_uniform_borders(image, 0.02).shape == (100, 28)  # columns 5…32, as image.std(axis=0) says
    lone = np.zeros((100, 64), np.float32)
    lone[:, 31] = column  # one non-uniform column: blank, not a crash
    with pytest.raises(EmptyImage):
        crop_uniform_borders(lone, 0.02)
