"""Would test-time augmentation pay? Validation MAE of single views and of their averages.

    python -m training.tta ~/runs/s2-224 models/boneage.onnx --cache-dir ~/runs/.cache

Runs an exported model file on its run's validation split (the same split export calibrates
on) with each view made from the model input itself: the picture as served, zoomed in and out
by 7% (out pads with the background value, -1), and shifted by 1/32 of its side both ways,
the kinds of change training augmented with (no flips: the model reads left hands). Prints MAE
per view and for averages of views. A probe to decide whether TTA earns its cost (n views cost
n model runs per answer), not a part of the served path: if it pays, it belongs inside the
exported file so the service keeps one session.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

View = Callable[[np.ndarray], np.ndarray]


def zoom(factor: float) -> View:
    """``(S, S)`` grey → the same side, content scaled by ``1 / factor`` (< 1: in, cropping; > 1: out, padding)."""

    def view(grey: np.ndarray) -> np.ndarray:
        side = grey.shape[0]
        if factor < 1:
            keep = round(side * factor)
            top = (side - keep) // 2
            crop = np.ascontiguousarray(grey[top : top + keep, top : top + keep])
            return np.asarray(Image.fromarray(crop, "F").resize((side, side), Image.Resampling.BILINEAR))
        small_side = int(side / factor)
        small = np.asarray(
            Image.fromarray(np.ascontiguousarray(grey), "F").resize((small_side, small_side), Image.Resampling.BILINEAR)
        )
        canvas = np.full((side, side), -1.0, np.float32)
        top = (side - small_side) // 2
        canvas[top : top + small_side, top : top + small_side] = small
        return canvas

    return view


def shift(step: int) -> View:
    """Move the content ``step`` pixels right and down (negative: left and up), padding with -1."""

    def view(grey: np.ndarray) -> np.ndarray:
        out = np.full_like(grey, -1.0)
        n, a, b = grey.shape[0], max(step, 0), max(-step, 0)
        out[a : n - b, a : n - b] = grey[b : n - a, b : n - a]
        return out

    return view


def views(side: int) -> dict[str, View]:
    step = max(1, side // 32)
    return {
        "as served": lambda grey: grey,
        "zoom in 7%": zoom(0.93),
        "zoom out 7%": zoom(1.07),
        f"shift +{step} px": shift(step),
        f"shift -{step} px": shift(-step),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.tta", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="the training run the model file was exported from")
    parser.add_argument("model", type=Path, help="its exported ONNX file")
    parser.add_argument("--csv", type=Path, help="the run's labels, when not where it trained")
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args(argv)

    from export.convert import predict_all, run_inputs, run_splits
    from export.modelfile import open_session

    session, model_file = open_session(args.model)
    _, _, val_s, _, val_dir = run_splits(args.run_dir, args.csv)
    images, sex, age = run_inputs(val_s, val_dir, model_file.spec, args.cache_dir)
    predictions = {}
    for name, view in views(model_file.spec.input_size).items():
        shown = np.stack([np.repeat(view(np.asarray(x[:, :, 0]))[:, :, None], 3, axis=2) for x in images])
        predictions[name] = predict_all(session, shown.astype(np.float32), sex)[0].reshape(-1)
        print(f"{name:>16}: validation MAE {np.abs(predictions[name] - age).mean():.3f} months", flush=True)
    names = list(predictions)
    for k in (3, 5):
        for combo in itertools.combinations(names, k):
            if names[0] not in combo:
                continue
            mean = np.mean([predictions[n] for n in combo], axis=0)
            print(f"average of {' + '.join(combo)}: validation MAE {np.abs(mean - age).mean():.3f} months")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
