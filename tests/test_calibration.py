"""The model file's reliability metadata: conformal intervals that cover, a gate that separates."""

from __future__ import annotations

import numpy as np
import pytest

from export.calibration import MIN_PER_BAND, FeatureGate, IntervalModel


def residual_sd(pred: np.ndarray) -> np.ndarray:
    """Errors that grow with age, as a bone-age model's do."""
    return 3 + pred / 15


def sample(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    pred = rng.uniform(10, 220, n)
    true = pred + 2.0 + rng.normal(0, residual_sd(pred))  # biased by +2 months
    return pred, true


def test_intervals_cover_at_the_asked_level_in_every_band():
    rng = np.random.default_rng(0)
    model = IntervalModel.fit(*sample(rng, 3000))
    pred, true = sample(rng, 30000)
    for level in (0.8, 0.9, 0.95):
        bounds = np.array([model.interval(p, level) for p in pred])
        inside = (bounds[:, 0] <= true) & (true <= bounds[:, 1])
        assert inside.mean() == pytest.approx(level, abs=0.015), level
        for lo in model.lower_edges:
            band = pred >= lo
            assert inside[band & (pred < lo + 36)].mean() == pytest.approx(level, abs=0.04), (level, lo)


def test_intervals_are_narrower_where_the_model_errs_less_and_follow_its_bias():
    model = IntervalModel.fit(*sample(np.random.default_rng(1), 3000))
    young, old = model.interval(30, 0.9), model.interval(200, 0.9)
    assert young[1] - young[0] < 0.6 * (old[1] - old[0])
    assert (young[0] + young[1]) / 2 == pytest.approx(32, abs=1.5)  # centred on pred + bias


def test_sparse_bands_are_merged_and_levels_beyond_the_data_are_refused():
    rng = np.random.default_rng(2)
    pred = np.concatenate([rng.uniform(100, 150, 400), rng.uniform(0, 40, 10)])
    pred[-1] = -3.0  # a linear output can answer just below zero for an infant
    model = IntervalModel.fit(pred, pred + rng.normal(0, 5, pred.size))
    assert all(len(r) >= MIN_PER_BAND for r in model.residuals)
    assert sum(len(r) for r in model.residuals) == pred.size
    assert model.interval(5, 0.9)[0] >= 0  # never a negative bone age
    with pytest.raises(ValueError, match="outside"):
        model.interval(120, 0.999)
    with pytest.raises(ValueError, match="at least"):
        IntervalModel.fit(pred[:10], pred[:10])


def test_interval_round_trips_and_malformed_metadata_is_refused():
    model = IntervalModel.fit(*sample(np.random.default_rng(3), 500))
    again = IntervalModel.from_dict(model.to_dict())
    assert again.interval(123.4, 0.9) == model.interval(123.4, 0.9)
    broken = model.to_dict() | {"lower_edges": model.to_dict()["lower_edges"][:-1]}
    with pytest.raises(ValueError, match="do not match"):
        IntervalModel.from_dict(broken)


def test_gate_passes_its_own_distribution_and_refuses_what_lies_far_from_it():
    rng = np.random.default_rng(4)
    basis = rng.normal(size=(16, 256))
    make = lambda n: np.maximum(rng.normal(size=(n, 16)) @ basis + rng.normal(0, 0.3, (n, 256)), 0)  # noqa: E731
    gate = FeatureGate.fit(make(3000), make(2000), components=16, percentile=99.5)
    fresh = gate.scores(make(4000))
    assert (fresh > gate.threshold).mean() == pytest.approx(0.005, abs=0.005)
    shifted = make(200) + rng.normal(0, 3, (200, 256))  # other structure in the same space
    assert (gate.scores(shifted) > gate.threshold).mean() > 0.95
    again = FeatureGate.from_dict(gate.to_dict())
    np.testing.assert_allclose(again.scores(shifted[:5]), gate.scores(shifted[:5]), rtol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        FeatureGate.from_dict(gate.to_dict() | {"dims": 255})


def test_by_default_the_gate_refuses_about_one_real_radiograph_in_a_hundred():
    """The default threshold: the 99th percentile of held-out scores (export --gate-percentile changes it)."""
    rng = np.random.default_rng(5)
    basis = rng.normal(size=(16, 256))
    make = lambda n: np.maximum(rng.normal(size=(n, 16)) @ basis + rng.normal(0, 0.3, (n, 256)), 0)  # noqa: E731
    gate = FeatureGate.fit(make(3000), make(4000), components=16)
    assert gate.percentile == 99.0
    assert (gate.scores(make(8000)) > gate.threshold).mean() == pytest.approx(0.01, abs=0.004)
