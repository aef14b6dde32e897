"""Evaluation metrics against values worked out by hand, and the report files."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from training.evaluate import compute_metrics, write_report


def test_metrics_match_hand_computation():
    true = [30, 90, 150, 200]
    pred = [40, 85, 150, 180]  # errors +10, -5, 0, -20
    male = [True, False, True, False]
    m = compute_metrics(true, pred, male)
    assert m["n"] == 4
    assert m["mae"] == pytest.approx((10 + 5 + 0 + 20) / 4)
    assert m["rmse"] == pytest.approx(np.sqrt((100 + 25 + 0 + 400) / 4))
    assert m["bias"] == pytest.approx((10 - 5 + 0 - 20) / 4)
    assert m["within_12_months"] == pytest.approx(3 / 4)
    assert m["by_sex"] == {"male": {"n": 2, "mae": 5.0}, "female": {"n": 2, "mae": 12.5}}
    assert m["by_age_band"] == {
        "0-5y": {"n": 1, "mae": 10.0},
        "5-10y": {"n": 1, "mae": 5.0},
        "10-15y": {"n": 1, "mae": 0.0},
        "15-19y": {"n": 1, "mae": 20.0},
    }
    assert m["mean_predictor_mae"] == pytest.approx(np.mean(np.abs(np.array(true) - 117.5)))


def test_an_empty_group_reports_no_mae():
    m = compute_metrics([100, 110], [100, 100], [True, True])
    assert m["by_sex"]["female"] == {"n": 0, "mae": None}


def test_report_writes_metrics_per_image_csv_and_both_plots(tmp_path):
    true = np.array([30.0, 90, 150, 200])
    pred = np.array([40.0, 85, 150, 180])
    write_report(tmp_path, ["a", "b", "c", "d"], true, pred, np.array([1, 0, 1, 0], bool), "test")
    assert json.loads((tmp_path / "metrics.json").read_text())["mae"] == pytest.approx(8.75)
    rows = list(csv.DictReader((tmp_path / "predictions.csv").open()))
    assert rows[0] == {
        "id": "a",
        "male": "True",
        "true_months": "30.00",
        "predicted_months": "40.00",
        "error_months": "10.00",
    }
    for plot in ("scatter.png", "bland_altman.png", "residuals.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
