"""Preprocessing: a decoded radiograph → the model's input tensor, driven by a spec.

The :class:`PreprocessSpec` is saved in every training run and stored inside the
exported ONNX file; the service reads it back from there. Nothing downstream repeats
these constants, so a model cannot be served with preprocessing it was not trained on.

Contract of :func:`preprocess`: ``(H, W)`` brighter = denser, ``float32`` of any range or
``uint8``/``uint16`` read as fractions of their full scale (what :mod:`radiograph.decode` gives) →
``(S, S, 3) float32`` in ``[-1, 1]`` (Xception's input scaling), deterministic: the same
input gives bit-for-bit the same tensor in training, evaluation, export and serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from radiograph.decode import DEFAULT_MAX_PIXELS, DecodedImage, decode
from radiograph.errors import EmptyImage, ImplausibleImage

#: Percentiles are estimated on at most this many pixels (a strided grid), which keeps
#: a 5-megapixel radiograph cheap while staying deterministic.
_PERCENTILE_SAMPLE = 250_000
#: Hand radiographs are roughly 1:1 to 1:2 once borders are cropped; a thinner strip cannot
#: show a hand, and squeezing it into a square would produce a confident answer from noise.
MAX_ASPECT_RATIO = 6.0


class PreprocessSpec(BaseModel):
    """Everything that decides how a radiograph becomes a model input."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    input_size: int = Field(100, ge=71, le=1024, description="Side of the square model input (px).")
    square: Literal["stretch", "pad"] = Field(
        "stretch",
        description="'stretch' resizes the whole picture to a square (as the RSNA 100 px set "
        "was made); 'pad' keeps the aspect ratio and pads with black.",
    )
    low_percentile: float = Field(0.5, ge=0, lt=50)
    high_percentile: float = Field(99.5, gt=50, le=100)
    crop_borders: bool = Field(True, description="Remove uniform borders and black padding.")
    border_tolerance: float = Field(0.02, gt=0, lt=0.5, description="A row/column whose std is below this is border.")
    scaling: Literal["xception"] = Field("xception", description="[0, 1] → [-1, 1].")
    channels: Literal[3] = 3

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        """Parse a stored spec; raise ``ValueError`` with a readable reason when invalid."""
        try:
            return cls.model_validate(json.loads(text))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"preprocessing spec is not valid JSON: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"preprocessing spec is invalid: {problems}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PreprocessSpec:
        return cls.from_json(Path(path).read_text())


def robust_normalize(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(H, W)`` any range → ``(H, W) float32`` in [0, 1], clipped at the given percentiles.

    Percentiles rather than min/max, so burned-in labels, collimator edges and hot
    pixels do not squash the bone contrast.

    8- and 16-bit pictures (what PNG and JPEG decode to) take a faster road to the same
    numbers: the percentiles come from a histogram instead of a partial sort, and the
    normalisation is a lookup table applied in one pass instead of float arithmetic on a
    full-size copy. ``tests/test_preprocess.py`` holds both roads to the same result.
    """
    h, w = pixels.shape
    step = max(1, int(np.sqrt(h * w / _PERCENTILE_SAMPLE)))
    sample = pixels[::step, ::step]
    full_scale = _FULL_SCALE.get(pixels.dtype)
    if full_scale is None:
        lo, hi = np.percentile(sample, [low, high]).astype(np.float32)
    else:
        levels = np.arange(full_scale + 1, dtype=np.float32) / np.float32(full_scale)
        counts = _histogram(sample, full_scale)
        lo, hi = _percentiles_from_counts(counts, levels, [low, high]).astype(np.float32)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-6:
        raise EmptyImage("The image is blank: it has no contrast to assess.")
    if full_scale is not None:
        lut = np.clip((levels - lo) / (hi - lo), 0.0, 1.0)
        return np.take(lut, pixels)
    out = (pixels.astype(np.float32) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


#: Integer pictures are fractions of their type's full scale (what :mod:`radiograph.decode` returns).
_FULL_SCALE = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


def _histogram(pixels: np.ndarray, full_scale: int) -> np.ndarray:
    """Counts of each grey level 0…``full_scale`` of an integer picture. Pillow's histogram of an
    8-bit picture is a single C loop, about 3× faster than ``np.bincount`` (which widens every
    pixel to int64 first); Pillow bins 16-bit pictures into 256, so those take NumPy's road."""
    if pixels.dtype == np.uint8:
        pixels = np.ascontiguousarray(pixels)
        shared = Image.frombuffer("L", pixels.shape[::-1], pixels, "raw", "L", 0, 1)
        return np.asarray(shared.histogram(), dtype=np.int64)
    return np.bincount(pixels.ravel(), minlength=full_scale + 1)


def _percentiles_from_counts(counts: np.ndarray, levels: np.ndarray, q: list[float]) -> np.ndarray:
    """``np.percentile(values, q)`` (its default 'linear' method) for values given as a histogram:
    ``counts[i]`` copies of ``levels[i]``. Same order statistics, same interpolation, same numbers."""
    cumulative = np.cumsum(counts)
    position = (cumulative[-1] - 1) * (np.asarray(q, dtype=np.float64) / 100)
    below = np.floor(position)
    gamma = position - below
    # The value at sorted index i is the first level whose cumulative count exceeds i.
    index = below.astype(np.int64)
    prev = levels[np.searchsorted(cumulative, index, side="right")]
    nxt = levels[np.searchsorted(cumulative, np.minimum(index + 1, cumulative[-1] - 1), side="right")]
    diff = nxt - prev
    return np.where(gamma >= 0.5, nxt - diff * (1 - gamma), prev + diff * gamma)


def crop_uniform_borders(image: np.ndarray, tolerance: float) -> np.ndarray:
    """``(H, W)`` in [0, 1] → the smallest window outside which every row/column is uniform.

    Hospital exports pad radiographs with wide black (or white) margins; left in, they
    shrink the hand to a fraction of the model's input.

    Only the first and last non-uniform row and column matter, so each side is searched from
    its edge inwards a band at a time; a picture without borders costs four thin bands, not
    two passes over every pixel. The result is the same window as a full scan, a view.
    """
    rows = _nonuniform_lines(image, 1, tolerance)
    cols = _nonuniform_lines(image, 0, tolerance)
    if rows is None or cols is None:
        raise EmptyImage("The image is blank: no hand or structure was found in it.")
    return image[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1]


#: Rows/columns examined at a time from each edge by :func:`crop_uniform_borders`.
_BAND = 32
#: A picture with fewer non-uniform rows (or columns) than this holds no hand.
_MIN_LINES = 8


def _nonuniform_lines(image: np.ndarray, axis: int, tolerance: float) -> tuple[int, int] | None:
    """(first, last) index of the lines (rows for ``axis=1``, columns for ``axis=0``) whose std
    exceeds ``tolerance``; None when there are fewer than ``_MIN_LINES`` of them."""
    n = image.shape[1 - axis]

    def stds(start: int, stop: int) -> np.ndarray:
        if axis == 1:
            return image[start:stop].std(axis=1)
        # NumPy sums a lone strided column pairwise but a wider block row by row, as in a full scan;
        # a one-column band borrows a neighbour so its std is the full scan's to the last bit.
        wide = start - 1 if stop - start == 1 and start > 0 else start
        wider = stop + 1 if stop - wide == 1 and stop < n else stop
        return image[:, wide:wider].std(axis=0)[start - wide : start - wide + stop - start]

    first = last = None
    seen = 0  # non-uniform lines found in the bands searched so far (never counted twice)
    top = 0
    first_band: np.ndarray = np.empty(0, dtype=np.intp)
    while top < n and first is None:
        found = np.flatnonzero(stds(top, min(n, top + _BAND)) > tolerance)
        if found.size:
            first_band = top + found
            first, seen = int(first_band[0]), found.size
        top = min(n, top + _BAND)
    if first is None:
        return None
    bottom = n
    while bottom > top and last is None:
        start = max(top, bottom - _BAND)
        found = np.flatnonzero(stds(start, bottom) > tolerance)
        if found.size:
            last, seen = start + int(found[-1]), seen + found.size
        bottom = start
    if last is None:  # every non-uniform line lies in the band where the first one was found
        last = int(first_band[-1])
        bottom = top
    if seen < _MIN_LINES and np.count_nonzero(stds(top, bottom) > tolerance) + seen < _MIN_LINES:
        return None
    return first, last


def make_square(image: np.ndarray, mode: Literal["stretch", "pad"]) -> np.ndarray:
    """``(H, W)`` → ``(S, S)`` with black padding for 'pad'; unchanged for 'stretch'."""
    if mode == "stretch":
        return image
    h, w = image.shape
    side = max(h, w)
    out = np.zeros((side, side), dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = image
    return out


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """``(H, W) float32`` → ``(size, size) float32``, antialiased bilinear (Pillow, mode F)."""
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def content(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """``(H, W)`` decoded radiograph → the normalised picture inside its uniform borders (what gets squared)."""
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise EmptyImage("The image has no pixels.")
    image = robust_normalize(pixels, spec.low_percentile, spec.high_percentile)
    if spec.crop_borders:
        image = crop_uniform_borders(image, spec.border_tolerance)
    return image


def preprocess(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """``(H, W)`` decoded radiograph → ``(S, S, 3) float32`` in [-1, 1]."""
    return to_model_input(content(pixels, spec), spec)


def to_model_input(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The picture inside its borders (:func:`content`) → ``(S, S, 3) float32`` in [-1, 1]."""
    h, w = image.shape
    if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
        raise ImplausibleImage(
            f"The picture is {w}×{h} pixels (aspect ratio over {MAX_ASPECT_RATIO:g}:1): not a hand radiograph."
        )
    image = make_square(image, spec.square)
    image = np.clip(resize(image, spec.input_size), 0.0, 1.0)
    scaled = image * np.float32(2.0) - np.float32(1.0)  # Xception: [0, 1] → [-1, 1]
    return np.ascontiguousarray(np.repeat(scaled[:, :, None], spec.channels, axis=2))


def load_model_input(
    data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, DecodedImage]:
    """Raw file bytes → (model input tensor, decoded image with its DICOM facts and content shape)."""
    decoded = decode(data, max_pixels=max_pixels)
    image = content(decoded.pixels, spec)
    decoded.content_shape = image.shape
    decoded.brightness = brightness(image)
    return to_model_input(image, spec), decoded


def brightness(image: np.ndarray, margin: float = 0.08, step: int = 4) -> tuple[float, float]:
    """(median of the outer ``margin`` frame, median of the whole) of a [0, 1] picture, on every
    ``step``-th pixel (a quality signal, not part of the model input: about a millisecond)."""
    sample = image[::step, ::step]
    h, w = sample.shape
    dh, dw = max(1, int(h * margin)), max(1, int(w * margin))
    frame = np.concatenate(
        [sample[:dh].ravel(), sample[-dh:].ravel(), sample[dh:-dh, :dw].ravel(), sample[dh:-dh, -dw:].ravel()]
    )
    return float(np.median(frame)), float(np.median(sample))


def load_file(path: str | Path, spec: PreprocessSpec) -> np.ndarray:
    """A file on disk → model input tensor (the training and evaluation entry point)."""
    return load_model_input(Path(path).read_bytes(), spec)[0]
