"""What a model file says about its own reliability: a prediction interval and a feature gate.

Both are fitted by ``python -m export`` on the training run's own data and stored in the
model file's metadata, so whichever model is bundled carries its own; the service only
applies them. NumPy only: the service must not import the training stack.

- :class:`IntervalModel`: split-conformal prediction intervals. Validation residuals
  (true − predicted) are grouped by predicted-age band (errors grow with age and the
  model's bias differs between young and old), and the interval at level ``1 − α`` is
  ``[pred + q_lo, pred + q_hi]`` with the band's conformal quantiles of the signed
  residuals at ``α/2`` and ``1 − α/2``. Any level can be asked for at run time, which
  is why the residuals themselves are stored rather than one pair of quantiles.
- :class:`FeatureGate`: how far an image's pooled features lie from the training
  images' (Mahalanobis distance in the leading principal components plus the scaled
  residual outside them), with a refusal threshold at a high percentile of held-out
  validation images' scores.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Predicted-age band edges (months) tried for the interval; a band with fewer than
#: ``MIN_PER_BAND`` validation residuals is merged into its neighbour.
BAND_EDGES = (0.0, 48.0, 84.0, 120.0, 156.0, 192.0)

#: Percentile of held-out validation radiographs' gate scores that sets the refusal threshold:
#: about 1% of real radiographs like the training set's are refused. Chosen on the bundled pair's
#: features (docs/trust/trust.md): at 99.5 the gate let 6 of 73 negatives through beside the file
#: checks, at 99 3 of 73, with the same real hands refused (2 of 300 half-resolution, none of the
#: 16 hospital JPEGs); at 98.5 more real hands are refused.
GATE_PERCENTILE = 99.0
MIN_PER_BAND = 50
#: Bone age cannot be negative; no RSNA label exceeds 228 months.
AGE_RANGE = (0.0, 300.0)


def _conformal_index(n: int, q: float) -> int:
    """0-based index of the finite-sample conformal quantile ``q`` among ``n`` sorted values."""
    return min(max(math.ceil((n + 1) * q - 1e-9) - 1, 0), n - 1)


@dataclass(frozen=True)
class IntervalModel:
    """Signed validation residuals by predicted-age band → an interval at any level."""

    lower_edges: tuple[float, ...]  # band i covers predictions >= lower_edges[i] (and < the next edge)
    residuals: tuple[tuple[float, ...], ...]  # sorted true − predicted, months, one tuple per band

    @classmethod
    def fit(cls, predicted: Sequence[float], true: Sequence[float]) -> IntervalModel:
        pred = np.asarray(predicted, dtype=np.float64)
        resid = np.asarray(true, dtype=np.float64) - pred
        if pred.size < MIN_PER_BAND:
            raise ValueError(f"an interval needs at least {MIN_PER_BAND} validation residuals, got {pred.size}")
        edges = list(BAND_EDGES)
        while True:  # Merge the smallest under-filled band into a neighbour until all are large enough.
            band = np.clip(np.searchsorted(edges, pred, side="right") - 1, 0, None)  # below 0 → first band
            counts = np.bincount(band, minlength=len(edges))
            small = [i for i, c in enumerate(counts) if c < MIN_PER_BAND]
            if not small or len(edges) == 1:
                break
            i = min(small, key=lambda j: counts[j])
            del edges[i if i > 0 else 1]  # Drop this band's lower edge (the first band absorbs the second).
        band = np.clip(np.searchsorted(edges, pred, side="right") - 1, 0, None)
        groups = tuple(tuple(np.round(np.sort(resid[band == i]), 2).tolist()) for i in range(len(edges)))
        return cls(tuple(float(e) for e in edges), groups)

    def band_of(self, predicted: float) -> int:
        return int(np.searchsorted(self.lower_edges, predicted, side="right") - 1)

    def max_level(self) -> float:
        """The highest level every band can honour (a band of n residuals gives at most 1 − 2/(n + 1))."""
        return 1 - 2 / (min(len(r) for r in self.residuals) + 1)

    def interval(self, predicted: float, level: float) -> tuple[float, float]:
        """``[lower, upper]`` months covering the true bone age with probability ``level``."""
        if not 0 < level <= self.max_level():
            raise ValueError(f"interval level {level} is outside (0, {self.max_level():.3f}] for this model")
        r = self.residuals[max(self.band_of(predicted), 0)]
        n, alpha = len(r), 1 - level
        # Conformal order statistics: the floor((n+1)α/2)-th and ceil((n+1)(1−α/2))-th smallest residuals
        # (max_level keeps both within 1…n).
        lo = r[max(math.floor((n + 1) * alpha / 2 + 1e-9) - 1, 0)]
        hi = r[_conformal_index(n, 1 - alpha / 2)]
        return max(predicted + lo, AGE_RANGE[0]), min(predicted + hi, AGE_RANGE[1])

    def bands(self) -> list[dict]:
        """Per band: its range and residual count (for /v1/model and the model card)."""
        uppers = [*self.lower_edges[1:], None]
        return [
            {"predicted_from_months": lo, "predicted_below_months": hi, "n": len(r)}
            for lo, hi, r in zip(self.lower_edges, uppers, self.residuals, strict=True)
        ]

    def to_dict(self) -> dict:
        return {
            "method": "split-conformal, signed residuals by predicted-age band",
            "lower_edges": list(self.lower_edges),
            "residuals": [list(r) for r in self.residuals],
        }

    @classmethod
    def from_dict(cls, d: dict) -> IntervalModel:
        edges, residuals = d["lower_edges"], d["residuals"]
        if not edges or len(edges) != len(residuals) or any(len(r) < 1 for r in residuals):
            raise ValueError("interval: bands and residuals do not match")
        if list(edges) != sorted(edges) or any(list(r) != sorted(r) for r in residuals):
            raise ValueError("interval: edges and residuals must be sorted")
        return cls(tuple(float(e) for e in edges), tuple(tuple(float(v) for v in r) for r in residuals))


def _pack(array: np.ndarray) -> str:
    """float32 array → base64 of its little-endian bytes (compact inside JSON metadata)."""
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def _unpack(text: str, shape: tuple[int, ...]) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if values.size != math.prod(shape):
        raise ValueError(f"gate: expected {math.prod(shape)} values, got {values.size}")
    return values.reshape(shape).astype(np.float32)


@dataclass(frozen=True)
class FeatureGate:
    """Distance of pooled image features from the training images' distribution."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D) leading principal directions, unit rows
    variances: np.ndarray  # (K,) variance along each direction
    residual_variance: float  # mean variance per dimension outside the K directions
    threshold: float  # scores above it are refused
    percentile: float  # of the validation scores, that set the threshold

    @classmethod
    def fit(
        cls,
        train_features: np.ndarray,
        val_features: np.ndarray,
        components: int = 64,
        percentile: float = GATE_PERCENTILE,
    ) -> FeatureGate:
        x = np.asarray(train_features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] <= components:
            raise ValueError(f"the gate needs more than {components} training feature vectors, got {x.shape}")
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        eig = s**2 / (x.shape[0] - 1)
        k = min(components, int((eig > eig[0] * 1e-9).sum()))
        rest = eig[k:]
        residual_variance = float(max(rest.mean() if rest.size else eig[k - 1] * 1e-3, 1e-12))
        gate = cls(
            mean.astype(np.float32),
            vt[:k].astype(np.float32),
            np.maximum(eig[:k], 1e-12).astype(np.float32),
            residual_variance,
            threshold=math.inf,
            percentile=percentile,
        )
        threshold = float(np.percentile(gate.scores(val_features), percentile))
        return cls(gate.mean, gate.components, gate.variances, residual_variance, threshold, percentile)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """``(N, D)`` features → ``(N,)`` distances (root of the per-dimension-scaled squared distance)."""
        centred = np.asarray(features, dtype=np.float32) - self.mean
        projected = centred @ self.components.T
        inside = (projected**2 / self.variances).sum(axis=1)
        outside = np.maximum((centred**2).sum(axis=1) - (projected**2).sum(axis=1), 0.0) / self.residual_variance
        dims = self.mean.size
        return np.sqrt((inside + outside) / dims).astype(np.float64)

    def to_dict(self) -> dict:
        k, d = self.components.shape
        return {
            "method": "Mahalanobis in the leading principal components of pooled image features + scaled residual",
            "dims": d,
            "components": k,
            "mean": _pack(self.mean),
            "directions": _pack(self.components),
            "variances": _pack(self.variances),
            "residual_variance": self.residual_variance,
            "threshold": self.threshold,
            "percentile": self.percentile,
        }

    @classmethod
    def from_dict(cls, d: dict) -> FeatureGate:
        dims, k = int(d["dims"]), int(d["components"])
        return cls(
            _unpack(d["mean"], (dims,)),
            _unpack(d["directions"], (k, dims)),
            _unpack(d["variances"], (k,)),
            float(d["residual_variance"]),
            float(d["threshold"]),
            float(d["percentile"]),
        )
