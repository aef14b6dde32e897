"""Model files side by side on their shared validation split: alone, averaged in pairs, and what each gains.

    python -m training.compare OLD.onnx models/boneage.onnx --baseline 1 --cache-dir ~/runs/.cache
    python -m training.compare models/boneage.onnx models/boneage.onnx#0 models/boneage-fast.onnx NEW.onnx \\
        --baseline 2+3

``FILE#K`` is member K of an ensemble file, alone, as ``training.recover --member K`` rebuilds it
(its int8-stored weights as the file computes with them): a member whose own file is gone can
still be paired with a new one.

Why: what to bundle is chosen by validation (the 300 half-resolution radiographs are measured once
per finalist), and between two good pairs the difference is a few hundredths of a month, within
the noise of 1,704 images. So every candidate is compared with a baseline on the same images by a
paired bootstrap: the gain in MAE with its 95% interval, and a file replaces another only when
that interval lies above zero.

Each file runs on its own preprocessing, as ``export ensemble`` checks its members; a pair is the
mean of two files' answers. That approximates the ensemble file made of them, which feeds its
smaller member the larger input resized in the graph and may store its weights as int8 (for
`xception-ensemble-v1.2`'s pair, 8.350 here against 8.317 for the file itself): list the ensemble file too for its own
figure, and compare pairs with pairs. The
split is rebuilt from what the files record and checked (``export.ensemble.shared_split``): files
validated on different splits are refused, since one's validation images could be another's
training images. An ensemble file is a file like any other here.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Bootstrap resamples of the validation images behind each interval.
DRAWS = 5000


@dataclass
class Row:
    """One candidate (a file, or the mean of two) against the baseline, in months."""

    name: str
    mae: float
    bias: float
    gain: float  # baseline MAE − this MAE: positive is better
    low: float  # 95% interval of the gain
    high: float


def validation_answers(
    paths: Sequence[Path], csv_path: Path | None = None, cache_dir: Path | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each file's answers on the files' shared validation split (by name) and the true ages."""
    from export.convert import predict_all, run_inputs
    from export.ensemble import open_entry, shared_split

    opened = [open_entry(p) for p in paths]
    files = [f for _, f in opened]
    _, (_, val_s, _, val_dir) = shared_split(files, csv_path)
    answers: dict[str, np.ndarray] = {}
    age = np.empty(0)
    for (session, f), path in zip(opened, paths, strict=True):
        images, sex, age = run_inputs(val_s, val_dir, f.spec, cache_dir)
        name = f.version if f.version != "unknown" else Path(path).name
        while name in answers:  # two entries with one name: tell them apart by their place in the list
            name = f"{name} ({len(answers) + 1})"
        answers[name] = predict_all(session, images, sex)[0].reshape(-1).astype(np.float64)
    return answers, np.asarray(age, dtype=np.float64)


def candidates(answers: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every file alone, then every pair averaged (``a + b``)."""
    out = dict(answers)
    for a, b in itertools.combinations(answers, 2):
        out[f"{a} + {b}"] = (answers[a] + answers[b]) / 2
    return out


def paired_gain(
    baseline_errors: np.ndarray, errors: np.ndarray, draws: int = DRAWS, seed: int = 0
) -> tuple[float, float, float]:
    """Mean |baseline error| − mean |error|, with a 95% paired-bootstrap interval over the images."""
    difference = np.abs(baseline_errors) - np.abs(errors)
    rng = np.random.default_rng(seed)
    n = len(difference)
    means = np.array([difference[rng.integers(0, n, n)].mean() for _ in range(draws)])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(difference.mean()), float(low), float(high)


def compare(candidate_answers: dict[str, np.ndarray], age: np.ndarray, baseline: str) -> list[Row]:
    """Rows for every candidate against ``baseline`` (one of them), best MAE first."""
    if baseline not in candidate_answers:
        raise KeyError(f"no candidate named {baseline!r}; candidates: {', '.join(candidate_answers)}")
    base_errors = candidate_answers[baseline] - age
    rows = []
    for name, predicted in candidate_answers.items():
        errors = predicted - age
        gain, low, high = paired_gain(base_errors, errors)
        rows.append(Row(name, float(np.abs(errors).mean()), float(errors.mean()), gain, low, high))
    return sorted(rows, key=lambda r: r.mae)


def baseline_name(spec: str, names: Sequence[str]) -> str:
    """``"2"`` → the second file's name; ``"2+3"`` → the mean of the second and third (1-based, as listed)."""
    try:
        picks = [int(part) for part in spec.split("+")]
    except ValueError:
        raise ValueError(f"--baseline {spec!r}: give file numbers as listed, e.g. 1 or 2+3") from None
    if not 1 <= len(picks) <= 2 or any(not 1 <= k <= len(names) for k in picks) or len(set(picks)) != len(picks):
        raise ValueError(f"--baseline {spec!r}: one file or two different files, numbered 1 to {len(names)}")
    chosen = sorted(picks)
    return " + ".join(names[k - 1] for k in chosen)


def table(rows: Sequence[Row], baseline: str, n: int) -> str:
    lines = [
        f"Validation split: {n} radiographs; gain = MAE of {baseline} − MAE of the row "
        f"(paired bootstrap, {DRAWS} draws, 95% interval).",
        "",
        "| candidate | MAE (months) | bias | gain | 95% interval |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " (baseline)" if r.name == baseline else ""
        interval = f"{r.low:+.3f} to {r.high:+.3f}"
        lines.append(f"| {r.name}{mark} | {r.mae:.3f} | {r.bias:+.2f} | {r.gain:+.3f} | {interval} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="model files (FILE#K: an ensemble's member K)")
    parser.add_argument("--baseline", default="1", help="file number, or two joined by + (default: 1)")
    parser.add_argument("--csv", type=Path, help="the files' training labels, if not under the data folder")
    parser.add_argument("--cache-dir", type=Path, help="preprocessed-tensor cache")
    args = parser.parse_args(argv)

    from export.convert import ExportError
    from export.modelfile import ModelFileError

    try:
        answers, age = validation_answers(args.files, args.csv, args.cache_dir)
        baseline = baseline_name(args.baseline, list(answers))
    except (ExportError, ModelFileError, ValueError) as exc:
        print(f"compare: {exc}", file=sys.stderr)
        return 2
    print(table(compare(candidates(answers), age, baseline), baseline, len(age)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
