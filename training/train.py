"""Train the Xception + sex bone-age regressor on RSNA radiographs.

    python -m training.train --run-dir runs/xception-100 --epochs 20
    python -m training.train --run-dir runs/xception-100 --resume      # continue after a stop

Progressive resizing is two runs: most epochs at a small side, then a few at the final
side starting from the first run's weights (the network is fully convolutional with
global pooling, so the same weights fit any input size):

    python -m training.train --run-dir runs/s1-128 --input-size 128 --epochs 16
    python -m training.train --run-dir runs/s2-256 --input-size 256 --epochs 3 --init runs/s1-128/best.keras

Reads top to bottom: setup → data → model → callbacks → fit → validation report. The run
folder receives the best and last models, ``history.csv``, ``loss.png``, ``config.json``,
``preprocessing.json`` (the spec the export embeds in the ONNX file), ``data.json`` and the
best model's validation ``metrics.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import keras

from radiograph import PreprocessSpec
from training import data
from training.evaluate import format_metrics, predict_keras, write_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    root = data.data_root()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, default=root / "rsna-299px" / "boneage-training-dataset.csv")
    p.add_argument("--images", type=Path, help="image folder (default: beside the CSV, as in the release)")
    p.add_argument("--val-csv", type=Path, help="separate validation labels (any RSNA layout)")
    p.add_argument("--val-images", type=Path)
    p.add_argument("--val-fraction", type=float, default=0.15, help="used when no --val-csv is given")
    p.add_argument("--limit", type=int, help="use only the first N labelled images (smoke runs)")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--input-size", type=int, default=100)
    p.add_argument("--square", choices=["stretch", "pad"], default="stretch")
    p.add_argument("--weights", default="none", help="imagenet | none | PATH to Xception notop weights")
    p.add_argument("--init", type=Path, help="start from this .keras model's weights (progressive resizing)")
    p.add_argument("--epochs", type=int, help="default 20; with --resume, the run's own count")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument(
        "--loss",
        choices=["mse", "huber", "mae"],
        default="mse",
        help="on the normalised target: huber is quadratic within --huber-delta SDs, linear beyond",
    )
    p.add_argument("--huber-delta", type=float, default=0.25, help="in target SDs (the SD is ~41 months)")
    p.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled weight decay (adamw)")
    p.add_argument(
        "--schedule",
        choices=["plateau", "cosine"],
        default="plateau",
        help="plateau: halve on a stalled validation loss, stop early; cosine: warm-up then cosine to zero "
        "over --epochs, no early stop",
    )
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up (cosine schedule)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience (epochs, plateau schedule)")
    p.add_argument("--steps-per-epoch", type=int, help="cap batches per epoch (smoke runs)")
    p.add_argument(
        "--strategy",
        choices=["default", "mirrored"],
        default="default",
        help="'mirrored' trains on every visible GPU (tf.distribute.MirroredStrategy)",
    )
    p.add_argument("--mixed-precision", action="store_true", help="mixed_bfloat16 on CPU, mixed_float16 on GPU")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/.cache"), help="preprocessed-tensor cache")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decode processes")
    p.add_argument("--seed", type=int, default=42, help="weights, shuffling and augmentation")
    p.add_argument(
        "--split-seed",
        type=int,
        help="training/validation split (default: --seed); keep it and change --seed to train an "
        "independent ensemble member on the same split",
    )
    return p.parse_args(argv)


class LossPlot(keras.callbacks.Callback):
    """Redraws ``loss.png`` from ``history.csv`` after every epoch, so a long run can be watched."""

    def __init__(self, run_dir: Path):
        super().__init__()
        self.run_dir = run_dir

    def on_epoch_end(self, epoch, logs=None):
        plot_history(self.run_dir / "history.csv", self.run_dir / "loss.png")


def _public_name(path: Path) -> str:
    """A label file as its folder and name: data.json travels into the shipped model's metadata,
    which should name the release, not the directories of whoever trained it."""
    return f"{path.parent.name}/{path.name}"


def plot_history(history_csv: Path, out: Path) -> None:
    """Training and validation loss (and MAE) per epoch as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(history_csv.open()))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    for ax, key, label in ((axes[0], "loss", "MSE loss (months²)"), (axes[1], "mae", "MAE (months)")):
        ax.plot(epochs, [float(r[key]) for r in rows], "o-", label="training")
        if f"val_{key}" in rows[0]:
            ax.plot(epochs, [float(r[f"val_{key}"]) for r in rows], "o-", label="validation")
        ax.set(xlabel="epoch", ylabel=label)
        ax.legend()
    if all(float(r["loss"]) > 0 for r in rows):
        axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def make_loss(args: argparse.Namespace, target_std: float):
    """The training loss on the normalised target, written on months.

    The model answers in months; a loss on ``(months − mean) / std`` equals the same loss
    on months with its scale changed (Huber's threshold times ``std``), which Adam's
    per-weight step sizes do not notice. So the built-in, serialisable losses serve.
    """
    if args.loss == "huber":
        return keras.losses.Huber(delta=args.huber_delta * target_std)
    return {"mse": "mse", "mae": "mae"}[args.loss]


def make_optimizer(args: argparse.Namespace, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam or AdamW, at a fixed rate (plateau schedule) or warm-up + cosine decay to zero."""
    lr = args.lr
    if args.schedule == "cosine":
        warmup = round(args.warmup_epochs * steps_per_epoch)
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=args.lr / 100 if warmup else args.lr,
            decay_steps=max(args.epochs * steps_per_epoch - warmup, 1),
            warmup_target=args.lr if warmup else None,
            warmup_steps=warmup,
        )
    if args.optimizer == "adamw":
        return keras.optimizers.AdamW(lr, weight_decay=args.weight_decay)
    return keras.optimizers.Adam(lr)


def best_val_loss(run_dir: Path) -> float | None:
    """Best validation loss so far, so a resumed run keeps best.keras unless it beats it."""
    history = run_dir / "history.csv"
    losses = [float(r["val_loss"]) for r in csv.DictReader(history.open())] if history.is_file() else []
    return min(losses) if losses else None


def completed_epochs(run_dir: Path) -> int:
    history = run_dir / "history.csv"
    return len(list(csv.DictReader(history.open()))) if history.is_file() else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = args.run_dir
    if args.resume:
        if not (run / "last.keras").is_file():
            raise SystemExit(f"--resume: no checkpoint at {run / 'last.keras'}")
        saved = json.loads((run / "config.json").read_text())
        if args.epochs is None:
            args.epochs = saved["epochs"]
        elif saved.get("schedule") == "cosine" and args.epochs > saved["epochs"]:
            raise SystemExit(
                f"--resume: this run's cosine schedule was planned for {saved['epochs']} epochs and cannot be "
                f"extended to {args.epochs} (its learning rate is 0 past the end); start a new run with "
                f"--init {run / 'best.keras'}"
            )
        keep = {"resume", "epochs", "run_dir", "workers", "cache_dir"}
        for key, value in saved.items():
            if key not in keep and key in vars(args):
                is_path = isinstance(value, str) and key.endswith(("csv", "images", "init"))
                setattr(args, key, Path(value) if is_path else value)
    elif run.exists() and any(run.iterdir()):
        raise SystemExit(f"{run} is not empty: pass --resume to continue it, or choose another --run-dir")
    if args.epochs is None:
        args.epochs = 20
    run.mkdir(parents=True, exist_ok=True)

    # Setup.
    import tensorflow as tf

    from training.model import build_model

    keras.utils.set_random_seed(args.seed)
    if args.split_seed is None:
        args.split_seed = args.seed
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy(
            "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        )

    # Data: labels, split, one preprocessing pass (cached), tf.data pipelines.
    spec = PreprocessSpec(input_size=args.input_size, square=args.square)
    samples = data.read_labels(args.csv)[: args.limit]
    if args.val_csv:
        train_s = samples
        val_s = data.read_labels(args.val_csv)
        val_dir = args.val_images or data.default_image_dir(args.val_csv)
    else:
        train_s, val_s = data.stratified_split(samples, args.val_fraction, args.split_seed)
        val_dir = args.images or data.default_image_dir(args.csv)
    train_dir = args.images or data.default_image_dir(args.csv)
    t0 = time.perf_counter()
    x_train = data.load_images(data.image_paths(train_s, train_dir), spec, args.cache_dir, args.workers)
    x_val = data.load_images(data.image_paths(val_s, val_dir), spec, args.cache_dir, args.workers)
    print(
        f"prepared {len(x_train)} training and {len(x_val)} validation images "
        f"at {spec.input_size}px in {time.perf_counter() - t0:.1f}s"
    )
    sex_train, y_train = data.arrays(train_s)
    sex_val, y_val = data.arrays(val_s)
    train_ds = data.make_dataset(x_train, sex_train, y_train, args.batch_size, training=True, seed=args.seed)
    val_ds = data.make_dataset(x_val, sex_val, y_val, args.batch_size, training=False)

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config.update(target_mean=float(y_train.mean()), target_std=float(y_train.std()))
    # Rewritten on --resume too: the epoch count a resumed run was asked for is the one it has.
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if not args.resume:
        spec.save(run / "preprocessing.json")
        (run / "data.json").write_text(
            json.dumps(
                {
                    "source": "RSNA Pediatric Bone Age Challenge 2017 (Halabi et al., Radiology 2019)",
                    "labels": _public_name(args.csv),
                    "train_count": len(train_s),
                    "validation_count": len(val_s),
                    "validation_fingerprint": data.fingerprint(val_s),
                    **({"limit": args.limit} if args.limit else {}),
                    "validation_source": _public_name(args.val_csv)
                    if args.val_csv
                    else f"{args.val_fraction:.0%} stratified split",
                    "input_size": spec.input_size,
                    "boneage_months_range": [float(y_train.min()), float(y_train.max())],
                },
                indent=2,
            )
            + "\n"
        )

    # Model: a fresh one, or the last checkpoint (weights + optimizer state) when resuming.
    strategy = tf.distribute.MirroredStrategy() if args.strategy == "mirrored" else tf.distribute.get_strategy()
    initial_epoch = completed_epochs(run) if args.resume else 0
    with strategy.scope():
        if args.resume:
            model = keras.models.load_model(run / "last.keras")
            # Keras saves Huber without its delta (it reloads as delta 1.0): compile the run's own loss
            # again, keeping the restored optimizer and its state (step count, moments, schedule).
            model.compile(optimizer=model.optimizer, loss=make_loss(args, config["target_std"]), metrics=["mae"])
        else:
            weights = None if args.weights == "none" or args.init else args.weights
            model = build_model(args.input_size, weights, config["target_mean"], config["target_std"])
            if args.init:
                model.set_weights(keras.models.load_model(args.init, compile=False).get_weights())
            steps = args.steps_per_epoch or -(-len(x_train) // args.batch_size)
            model.compile(
                optimizer=make_optimizer(args, steps), loss=make_loss(args, config["target_std"]), metrics=["mae"]
            )
            # Create the optimizer's slots now, eagerly. Left to the first training step, they are
            # created inside tf.function's trace, which then traces the step twice: about 12 s more
            # per start on two cores (measured on Xception at 71 px), whatever the run's length.
            model.optimizer.build(model.trainable_variables)

    callbacks = [
        keras.callbacks.ModelCheckpoint(
            run / "best.keras",
            monitor="val_loss",
            save_best_only=True,
            initial_value_threshold=best_val_loss(run) if args.resume else None,
        ),
        keras.callbacks.ModelCheckpoint(run / "last.keras"),
        keras.callbacks.CSVLogger(run / "history.csv", append=args.resume),
        LossPlot(run),
    ]
    if args.schedule == "plateau":
        callbacks += [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=args.patience, verbose=1),
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-6, verbose=1),
        ]
    t0 = time.perf_counter()
    model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=args.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=args.steps_per_epoch,
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,  # one line per epoch in a log file
    )
    seconds = time.perf_counter() - t0
    epochs_run = max(completed_epochs(run) - initial_epoch, 1)
    seen = epochs_run * min(len(x_train), (args.steps_per_epoch or 10**9) * args.batch_size)
    print(
        f"trained {epochs_run} epoch(s) in {seconds / 60:.1f} min: {seen / seconds:.1f} images/s, "
        f"{seconds / 60 / epochs_run:.2f} min/epoch"
    )

    # Validation report of the best checkpoint (what the export will ship).
    best = keras.models.load_model(run / "best.keras")
    pred = predict_keras(best, x_val, sex_val, args.batch_size)
    metrics = write_report(
        run / "validation", [s.image_id for s in val_s], y_val, pred, sex_val[:, 0] > 0.5, "validation"
    )
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_metrics(metrics))
    print(f"run folder: {run}  (loss curve: {run / 'loss.png'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
