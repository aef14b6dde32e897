"""Export a training run to ONNX, and verify any ONNX model file.

    python -m export convert runs/NAME --out models/boneage.onnx [--storage float16|float32|int8]
    python -m export ensemble LARGER.onnx SMALLER.onnx --out NEW.onnx [--storage int8-weights]
    python -m export ensemble models/boneage.onnx#0 SMALLER.onnx --out NEW.onnx   # FILE#K: an ensemble's member
    python -m export verify models/boneage.onnx --image hand.png --sex female

``convert`` checks Keras/ONNX parity on real radiographs for each storage option and
prints file size, parity and timings. ``ensemble`` combines exported files into one that
averages them (members from the same training split), checks it against its members and
calibrates it again. ``verify`` prints a file's metadata, runs it on one
image and exits non-zero with a plain message on a corrupted, foreign or misbehaving file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.calibration import GATE_PERCENTILE
from export.modelfile import INPUT_IMAGE, INPUT_SEX, OUTPUT, ModelFileError, open_session


def _parity_paths(source: Path, count: int) -> list[Path]:
    paths = sorted(source.glob("*.png")) if source.is_dir() else []
    return paths[:count]


def convert(args: argparse.Namespace) -> int:
    from export.convert import ExportError, export_run

    paths = _parity_paths(args.parity_images, args.parity_count)
    try:
        report = export_run(
            args.run_dir,
            args.out,
            paths,
            args.storage,
            args.name,
            args.version,
            calibration=args.calibration,
            csv_path=args.csv,
            cache_dir=args.cache_dir,
            gate_train_count=args.gate_train_count,
            gate_percentile=args.gate_percentile,
        )
    except ExportError as exc:
        print(f"export refused: {exc}", file=sys.stderr)
        return 1
    for name, row in report["storage"].items():
        print(
            f"{name:8s} weights: {row['size_mb']:6.2f} MB, max |Keras − ONNX| = "
            f"{row['max_abs_diff_months']:.5f} months (bound {row['bound_months']}) "
            f"on {report['parity_images']} radiographs"
        )
    if "mixed_precision_drift_months" in report:
        print(
            f"trained in mixed precision: the file computes in float32, which moves answers by at most "
            f"{report['mixed_precision_drift_months']:.3f} months on the parity radiographs"
        )
    if "int8" in report:
        q = report["int8"]
        print(
            f"int8: validation MAE {q['validation_mae_int8']:.2f} vs float32 {q['validation_mae_float32']:.2f} "
            f"({q['drift_months']:+.2f} months, bound +{q['bound_months']}) on {q['validation_images']} images"
        )
    t = report["timing_ms"]
    print(
        f"timing (median ms): ONNX Runtime batch 1 {t['onnxruntime_batch1']:.1f}, batch 16 "
        f"{t['onnxruntime_batch16']:.1f}; Keras batch 1 {t['keras_batch1']:.1f}, batch 16 {t['keras_batch16']:.1f}"
    )
    if "calibration" in report:
        meta = report["metadata"]
        print(
            f"calibration: interval from {meta['interval']['validation_images']} validation residuals in "
            f"{report['calibration']['interval_bands']} predicted-age bands; gate fitted on "
            f"{meta['gate']['training_images']} training images, threshold {meta['gate']['threshold']:.3f} "
            f"(the {meta['gate']['percentile']:g}th percentile of validation scores)"
        )
    else:
        print("calibration: none (--no-calibration): the service will give no interval and no gate")
    print(f"wrote {report['path']} ({report['file_size_mb']} MB, {args.storage} weights)")
    return 0


def ensemble(args: argparse.Namespace) -> int:
    from export.convert import ExportError
    from export.ensemble import export_ensemble

    try:
        report = export_ensemble(
            args.members,
            args.out,
            _parity_paths(args.parity_images, args.parity_count),
            args.storage,
            args.name,
            args.version,
            csv_path=args.csv,
            cache_dir=args.cache_dir,
            gate_train_count=args.gate_train_count,
            gate_percentile=args.gate_percentile,
        )
    except (ExportError, ModelFileError) as exc:
        print(f"export refused: {exc}", file=sys.stderr)
        return 1
    for name, row in report["members"].items():
        print(
            f"member {name} ({row['model_version']}, {row['input_size']} px): "
            f"validation MAE {row['validation_mae']:.3f}"
        )
    if "int8" in report:
        q = report["int8"]
        print(f"{args.storage}: validation MAE drift {q['drift_months']:+.3f} months (bound +{q['bound_months']})")
    for name, mae in report["validation_mae"].items():
        print(f"ensemble, {name:8s}: validation MAE {mae:.3f} months")
    for name, row in report["storage"].items():
        if row.get("max_abs_diff_months") is not None:
            print(
                f"{name:8s} {row['size_mb']:6.2f} MB, max |ensemble − mean of members| = "
                f"{row['max_abs_diff_months']:.4f} months (bound {row['bound_months']}) "
                f"on {report['parity_images']} radiographs"
            )
    t = report["timing_ms"]
    print(f"timing (median ms): batch 1 {t['onnxruntime_batch1']:.1f}, batch 16 {t['onnxruntime_batch16']:.1f}")
    print(f"wrote {report['path']} ({report['file_size_mb']} MB, {args.storage} weights)")
    return 0


def verify(args: argparse.Namespace) -> int:
    from radiograph import ImageError, load_model_input

    try:
        session, model = open_session(args.model)
    except ModelFileError as exc:
        print(f"invalid model file: {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "path": str(model.path),
                "preprocessing": model.spec.model_dump(),
                **model.public_metadata(),
                **model.calibration_summary(),
            },
            indent=2,
            default=str,
        )
    )
    if args.image is None:
        return 0
    try:
        tensor, decoded = load_model_input(args.image.read_bytes(), model.spec)
    except (OSError, ImageError) as exc:
        print(f"cannot use image {args.image}: {exc}", file=sys.stderr)
        return 2
    sex = args.sex or decoded.sex or "female"
    value = float(
        session.run(
            [OUTPUT], {INPUT_IMAGE: tensor[None], INPUT_SEX: np.array([[1.0 if sex == "male" else 0.0]], np.float32)}
        )[0].reshape(-1)[0]
    )
    print(f"{args.image.name} ({sex}): bone age {value:.1f} months")
    if not np.isfinite(value) or not 0 <= value <= 300:
        print(f"model output {value} is not a plausible bone age (0–300 months)", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from training.data import data_root

    parser = argparse.ArgumentParser(
        prog="python -m export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def percentile(text: str) -> float:
        value = float(text)
        if not 50 < value < 100:
            raise argparse.ArgumentTypeError(f"{value:g} is not a percentile between 50 and 100")
        return value

    gate_help = (
        f"percentile of validation radiographs' gate scores that sets the refusal threshold "
        f"(default {GATE_PERCENTILE:g}: about 1 in 100 refused)"
    )
    c = sub.add_parser("convert", help="training run → ONNX file with metadata, parity-checked")
    c.add_argument("run_dir", type=Path)
    c.add_argument("--out", type=Path, default=Path("models/boneage.onnx"))
    c.add_argument(
        "--storage",
        choices=["float16", "float32", "int8"],
        default="float16",
        help="float16: weights stored in half precision, computed in float32; int8: static QDQ quantisation "
        "of the convolutions, refused if it costs more than 0.3 months of validation MAE",
    )
    c.add_argument("--name", default="boneage-xception")
    c.add_argument("--version", help="model version (default: the run folder's name)")
    c.add_argument(
        "--parity-images",
        type=Path,
        default=data_root() / "rsna-halfres" / "images",
        help="folder of real radiographs (PNG) for the Keras/ONNX parity check",
    )
    c.add_argument("--parity-count", type=int, default=16)
    c.add_argument(
        "--no-calibration",
        dest="calibration",
        action="store_false",
        help="write no prediction interval and no out-of-distribution gate",
    )
    c.add_argument("--csv", type=Path, help="the run's training labels, if not where its config.json says")
    c.add_argument("--cache-dir", type=Path, help="preprocessed-tensor cache (default: the run's)")
    c.add_argument("--gate-train-count", type=int, default=3000, help="training images the gate is fitted on")
    c.add_argument("--gate-percentile", type=percentile, help=gate_help)
    c.set_defaults(func=convert)
    e = sub.add_parser("ensemble", help="exported files → one file averaging them, calibrated again")
    e.add_argument(
        "members",
        type=Path,
        nargs="+",
        help="model files, the one with the largest input first (FILE#K: member K of an ensemble file)",
    )
    e.add_argument("--out", type=Path, default=Path("models/boneage.onnx"))
    e.add_argument(
        "--storage",
        choices=["float16", "float32", "int8-weights", "int8"],
        default="float16",
        help="int8-weights: convolution weights stored as int8 (a quarter of float32), computed in float32; "
        "int8: static QDQ quantisation as for convert. Both refused beyond 0.3 months of validation MAE drift",
    )
    e.add_argument("--name", default="boneage-xception-ensemble")
    e.add_argument("--version", help="model version (default: the output file's name)")
    e.add_argument("--parity-images", type=Path, default=data_root() / "rsna-halfres" / "images")
    e.add_argument("--parity-count", type=int, default=16)
    e.add_argument("--csv", type=Path, help="the members' training labels, if not under the data folder")
    e.add_argument("--cache-dir", type=Path, help="preprocessed-tensor cache")
    e.add_argument("--gate-train-count", type=int, default=3000)
    e.add_argument("--gate-percentile", type=percentile, help=gate_help)
    e.set_defaults(func=ensemble)
    v = sub.add_parser("verify", help="print a model file's metadata and run it on one image")
    v.add_argument("model", type=Path)
    v.add_argument("--image", type=Path)
    v.add_argument("--sex", choices=["male", "female"])
    v.set_defaults(func=verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
