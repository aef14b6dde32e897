"""Occlusion sensitivity: which parts of the radiograph moved the bone age (Zeiler & Fergus, 2014).

Each copy of the model input has one square of a grid covered with the image's mean grey; the
change in the predicted bone age when a square is covered is that square's weight. It needs
nothing but the served model (no gradients, no second session), and its copies go through the
service's own batcher, so they share batches with other clients' requests instead of holding the
model for one long call.

A qualitative aid for the reader, not evidence: occlusion shows where covering the image changes
the answer, not why the model answers as it does, and a grey square is itself unlike any
radiograph the model was trained on.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

METHOD = "occlusion sensitivity (Zeiler & Fergus 2014): change in bone age when each grid square is covered"
CAVEAT = (
    "A qualitative aid, not evidence: it shows where covering the image changes the answer, not why the model "
    "answers as it does."
)


def occluded_copies(image: np.ndarray, grid: int) -> np.ndarray:
    """``(S, S, C)`` model input → ``(grid², S, S, C)``: copy *k* has square *k* (row-major) set to the mean."""
    side = image.shape[0]
    edges = np.linspace(0, side, grid + 1).round().astype(int)
    fill = image.mean(dtype=np.float64).astype(image.dtype)
    copies = np.repeat(image[None], grid * grid, axis=0)
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        copies[k, edges[r] : edges[r + 1], edges[c] : edges[c + 1]] = fill
    return copies


@dataclass(frozen=True)
class Heatmap:
    #: ``grid × grid`` months: bone age with the square covered − bone age of the whole image.
    change_months: np.ndarray

    @property
    def weight(self) -> np.ndarray:
        """How much each square matters, 0–1 (the largest absolute change is 1)."""
        magnitude = np.abs(self.change_months)
        top = magnitude.max()
        return magnitude / top if top > 0 else magnitude


def heatmap(base_months: float, occluded_months: np.ndarray, grid: int) -> Heatmap:
    return Heatmap(np.asarray(occluded_months, dtype=np.float64).reshape(grid, grid) - base_months)


def _colormap(weight: np.ndarray) -> np.ndarray:
    """0–1 → RGB uint8 on a dark-blue → red → yellow ramp (readable over a grey radiograph)."""
    stops = np.array([[0, 0, 64], [0, 64, 255], [255, 0, 0], [255, 255, 0]], dtype=np.float64)
    x = np.clip(weight, 0, 1) * (len(stops) - 1)
    low = np.floor(x).astype(int).clip(0, len(stops) - 2)
    t = (x - low)[..., None]
    return ((1 - t) * stops[low] + t * stops[low + 1]).astype(np.uint8)


def as_rgb(image: np.ndarray) -> np.ndarray:
    """``(S, S, C)`` model input in [-1, 1] → ``(S, S, 3) uint8`` grey picture."""
    grey = ((image[..., 0] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def overlay_rgb(image: np.ndarray, map_: Heatmap, alpha: float = 0.45) -> np.ndarray:
    """The model input as the model saw it, with the heatmap blended over it: ``(S, S, 3) uint8``."""
    side = image.shape[0]
    base = as_rgb(image).astype(np.float64)
    weight = np.asarray(
        Image.fromarray(map_.weight.astype(np.float32), mode="F").resize((side, side), Image.Resampling.BILINEAR)
    )
    colour = _colormap(weight).astype(np.float64)
    blend = alpha * weight[..., None]  # Unimportant squares stay the plain radiograph.
    return ((1 - blend) * base + blend * colour).round().astype(np.uint8)


def png_base64(rgb: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
