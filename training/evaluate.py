"""Evaluate a trained model on any labelled RSNA set.

    python -m training.evaluate --model runs/NAME/best.keras \\
        --csv ../shared/data/rsna-halfres/labels.csv --out runs/NAME/eval-halfres
    python -m training.evaluate --service http://127.0.0.1:8000 \\
        --csv ../shared/data/rsna-halfres/labels.csv --out docs/evaluation

Writes ``metrics.json`` (MAE overall, by sex and by age band, RMSE, mean bias, share
within 12 months), ``predictions.csv`` (one row per image), ``scatter.png`` and
``bland_altman.png`` and ``residuals.png``. Images go through :mod:`radiograph` with the spec saved beside
the model, exactly as the service would prepare them.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: Age bands (years) used in every report, by true bone age.
AGE_BANDS: list[tuple[str, float, float]] = [
    ("0-5y", 0, 60),
    ("5-10y", 60, 120),
    ("10-15y", 120, 180),
    ("15-19y", 180, 229),
]


def compute_metrics(y_true: Sequence[float], y_pred: Sequence[float], male: Sequence[bool]) -> dict:
    """Error summary in months; bias is mean(predicted − true)."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    m = np.asarray(male, dtype=bool)
    err = p - t

    def summary(mask: np.ndarray) -> dict:
        if not mask.any():
            return {"n": 0, "mae": None}
        return {"n": int(mask.sum()), "mae": float(np.abs(err[mask]).mean())}

    return {
        "n": int(t.size),
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "bias": float(err.mean()),
        "within_12_months": float((np.abs(err) <= 12).mean()),
        "by_sex": {"male": summary(m), "female": summary(~m)},
        "by_age_band": {name: summary((t >= lo) & (t < hi)) for name, lo, hi in AGE_BANDS},
        "mean_predictor_mae": float(np.abs(t - t.mean()).mean()),
    }


def plot_scatter(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str = "") -> None:
    """Predicted vs. true bone age with the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.scatter(y_true, y_pred, s=6, alpha=0.5)
    lim = [0, max(240.0, float(np.max(y_true)), float(np.max(y_pred)))]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(xlim=lim, ylim=lim, xlabel="true bone age (months)", ylabel="predicted (months)", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bland_altman(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str = "") -> None:
    """Difference vs. mean, with the bias and 95% limits of agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = (y_true + y_pred) / 2
    diff = y_pred - y_true
    bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=100)
    ax.scatter(mean, diff, s=6, alpha=0.5)
    for y, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
        ax.axhline(y, color="k", ls=style, lw=1)
    ax.set(xlabel="mean of predicted and true (months)", ylabel="predicted − true (months)", title=title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_residuals(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str = "") -> None:
    """Distribution of predicted − true, overall and by age band (what the prediction interval is built on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    err = y_pred - y_true
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    left.hist(err, bins=40, color="tab:blue", alpha=0.8)
    left.axvline(0, color="k", lw=1)
    left.set(xlabel="predicted − true (months)", ylabel="images", title=title)
    bands = [(name, err[(y_true >= lo) & (y_true < hi)]) for name, lo, hi in AGE_BANDS]
    bands = [(name, e) for name, e in bands if e.size]
    right.boxplot([e for _, e in bands], tick_labels=[f"{name}\n(n={e.size})" for name, e in bands], showfliers=True)
    right.axhline(0, color="k", lw=1)
    right.set(xlabel="true bone age", ylabel="predicted − true (months)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(
    out: Path, ids: Sequence[str], y_true: np.ndarray, y_pred: np.ndarray, male: np.ndarray, title: str
) -> dict:
    """Metrics JSON, per-image CSV and both plots into ``out``; returns the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = compute_metrics(y_true, y_pred, male)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out / "predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "male", "true_months", "predicted_months", "error_months"])
        for i, t, p, m in zip(ids, y_true, y_pred, male, strict=True):
            writer.writerow([i, bool(m), f"{t:.2f}", f"{p:.2f}", f"{p - t:.2f}"])
    plot_scatter(y_true, y_pred, out / "scatter.png", title)
    plot_bland_altman(y_true, y_pred, out / "bland_altman.png", title)
    plot_residuals(y_true, y_pred, out / "residuals.png", title)
    return metrics


def format_metrics(metrics: dict) -> str:
    """A short human-readable table of a metrics dict."""
    lines = [
        f"n={metrics['n']}  MAE={metrics['mae']:.2f}  RMSE={metrics['rmse']:.2f}  "
        f"bias={metrics['bias']:+.2f}  within 12 mo={metrics['within_12_months']:.1%}  "
        f"(mean-predictor MAE {metrics['mean_predictor_mae']:.2f})"
    ]
    if metrics.get("refused"):
        refused = metrics["refused"]
        lines.append(f"  refused by the service's quality gate: {refused['n']} ({', '.join(refused['ids'])})")
    for group in ("by_sex", "by_age_band"):
        parts = [f"{k}: {v['mae']:.2f} (n={v['n']})" if v["n"] else f"{k}: – (n=0)" for k, v in metrics[group].items()]
        lines.append("  " + "  ".join(parts))
    return "\n".join(lines)


def predict_keras(model, images: np.ndarray, sex: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Bone age in months for preprocessed images (Keras)."""
    return np.asarray(model.predict({"image": images, "sex": sex}, batch_size=batch_size, verbose=0)).reshape(-1)


def predict_service(url: str, paths: Sequence[Path], male: np.ndarray, api_key: str | None = None) -> np.ndarray:
    """Bone age for each image as the running service answers it (the path a user's upload takes).

    An image the service refuses as one it cannot rate (its quality gate) is NaN: a refusal is an
    answer, reported beside the error of the rest; any other failure stops the evaluation.
    """
    import httpx

    from app.quality import PROBLEM_TYPE

    headers = {"X-API-Key": api_key} if api_key else {}
    out = []
    with httpx.Client(base_url=url, timeout=120, headers=headers) as client:
        for path, is_male in zip(paths, male, strict=True):
            response = client.post(
                "/v1/bone-age",
                files={"image": (path.name, path.read_bytes())},
                data={"sex": "male" if is_male else "female"},
            )
            if response.status_code == 422 and response.json().get("type") == PROBLEM_TYPE:
                out.append(np.nan)
                continue
            if response.status_code != 200:
                raise RuntimeError(f"{path.name}: service answered {response.status_code}: {response.text}")
            out.append(response.json()["bone_age_months"])
    return np.array(out, dtype=np.float64)


def main(argv: Sequence[str] | None = None) -> int:
    from radiograph import PreprocessSpec
    from training import data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a .keras file from a training run")
    source.add_argument("--service", help="URL of a running service, e.g. http://127.0.0.1:8000")
    parser.add_argument("--csv", type=Path, required=True, help="labels in any RSNA layout")
    parser.add_argument("--images", type=Path, help="image folder (default: beside the CSV)")
    parser.add_argument("--spec", type=Path, help="preprocessing.json (default: beside the model)")
    parser.add_argument("--out", type=Path, help="report folder (default: <model dir>/eval-<csv dir>)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--api-key", help="X-API-Key for a service that requires one")
    args = parser.parse_args(argv)
    if args.service and not args.out:
        parser.error("--out is required with --service")

    samples = data.read_labels(args.csv)
    paths = data.image_paths(samples, args.images or data.default_image_dir(args.csv))
    sex, age = data.arrays(samples)
    male = sex[:, 0] > 0.5
    if args.service:
        pred = predict_service(args.service, paths, male, args.api_key)
        title = f"{args.csv.parent.name} via service"
    else:
        import keras

        spec = PreprocessSpec.load(args.spec or args.model.parent / "preprocessing.json")
        images = data.load_images(paths, spec)
        pred = predict_keras(keras.models.load_model(args.model), images, sex, args.batch_size)
        title = args.csv.parent.name
    out = args.out or args.model.parent / f"eval-{args.csv.parent.name}"
    ids = [s.image_id for s in samples]
    answered = ~np.isnan(pred)
    metrics = write_report(
        out, [i for i, a in zip(ids, answered, strict=True) if a], age[answered], pred[answered], male[answered], title
    )
    refused = [i for i, a in zip(ids, answered, strict=True) if not a]
    if refused:  # by the service's quality gate; the error above is over the images it answered
        metrics["refused"] = {"n": len(refused), "ids": refused}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_metrics(metrics))
    print(f"report: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
