"""Keras run → one self-describing ONNX file, parity-checked against Keras on real radiographs.

Why the checks live here: export is where a trained model becomes what users deploy, so
this is the last point where "the file computes what was trained, with the preprocessing
it was trained with" can be proven. Every export measures it and refuses to write a file
that fails.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.modelfile import FEATURES, INPUT_IMAGE, INPUT_SEX, OUTPUT, SPEC_KEY, encode_metadata, open_session
from radiograph import PreprocessSpec
from radiograph.preprocess import load_file
from training.evaluate import predict_keras

#: Largest allowed |Keras − ONNX| for float32 weights: conversion must be exact up to
#: float32 round-off (observed ~1e-4 months).
PARITY_FP32_MONTHS = 0.05
#: For float16-stored weights the file differs from Keras by the weights' rounding
#: (relative 2^-11). 0.5 months is 1/20 of the service's target error and far below the
#: 6–12 month steps between Greulich & Pyle standards, so it cannot change a reading.
PARITY_FP16_MONTHS = 0.5
#: int8 moves single answers by months (quantisation noise), so its check is on the validation
#: split instead: its MAE may exceed the float32 file's by at most this much, else nothing is written.
INT8_MAX_MAE_DRIFT_MONTHS = 0.3
#: Training radiographs that calibrate the int8 activation ranges.
INT8_CALIBRATION_IMAGES = 256
OPSET = 18


class ExportError(RuntimeError):
    """The export was refused (parity, inputs or run folder); the message says why."""


def load_run(run_dir: Path):
    """The run's best model exactly as training saved it, + its spec and config.

    Nothing is rebuilt from code: what is converted and parity-checked is the saved model.
    """
    import keras

    config = json.loads((run_dir / "config.json").read_text())
    spec = PreprocessSpec.load(run_dir / "preprocessing.json")
    model = keras.models.load_model(run_dir / "best.keras", compile=False)
    return model, spec, config


def float32_twin(model):
    """The saved model computing in float32: the same layers and weights, cloned from the model itself.

    A model trained with mixed precision keeps bfloat16 (or float16) convolutions, which ONNX Conv
    and ONNX Runtime's CPU kernels do not take; the file computes in float32 instead. A float32
    model is returned as it is.
    """
    import keras

    if all(layer.dtype_policy.name == "float32" for layer in model.layers):
        return model

    def in_float32(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    twin = keras.models.clone_model(model, clone_function=in_float32)
    twin.set_weights(model.get_weights())
    return twin


def with_features(model):
    """The same model with a second output: its pooled image features (float32).

    They are the base's global average pooling, the image half of what the head's
    ``features`` layer joins with the sex branch (``training/model.py``).
    """
    import keras

    pooled = model.get_layer("features").input[0]
    features = keras.layers.Activation("linear", dtype="float32", name=FEATURES)(pooled)
    return keras.Model(model.inputs, {OUTPUT: model.output, FEATURES: features}, name=model.name)


def to_onnx(model, input_size: int):
    """tf2onnx conversion with a dynamic batch dimension and the public input/output names.

    ``model`` is :func:`with_features` of the trained model: outputs months and pooled features.
    """
    import tensorflow as tf
    import tf2onnx

    signature = (
        tf.TensorSpec((None, input_size, input_size, 3), tf.float32, name=INPUT_IMAGE),
        tf.TensorSpec((None, 1), tf.float32, name=INPUT_SEX),
    )

    @tf.function(input_signature=signature)
    def serve(image, sex):
        out = model({INPUT_IMAGE: image, INPUT_SEX: sex}, training=False)
        return {OUTPUT: tf.cast(out[OUTPUT], tf.float32), FEATURES: tf.cast(out[FEATURES], tf.float32)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=signature, opset=OPSET)
    return proto


def store_weights_fp16(proto, min_elements: int = 1024, keep: frozenset[str] = frozenset()):
    """Store large float32 initializers as float16, each followed by a Cast back to float32.

    ONNX Runtime folds those Casts when it loads the file (constant folding), so the graph
    the CPU runs is float32 as before: half the file size, no run-time cost.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    kept, casts = [], []
    for init in graph.initializer:
        values = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        if values is None or values.size < min_elements or init.name in keep or np.abs(values).max() >= 65000:
            kept.append(init)
            continue
        half = numpy_helper.from_array(values.astype(np.float16), init.name + "__fp16")
        kept.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return proto


def store_weights_int8(proto, min_elements: int = 1024):
    """Store convolution weights as int8 (symmetric, one scale per output channel), each followed by a
    DequantizeLinear back to float32; other large weights as float16 (:func:`store_weights_fp16`).

    Storage only: ONNX Runtime folds the DequantizeLinear nodes when it loads the file, so the
    model computes in float32 on the rounded weights (a quarter of their float32 size). Unlike
    static quantisation of the activations (:func:`quantize_int8`) it needs no calibration and
    moves answers far less; it does not make the model faster.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    weights = {n.input[1] for n in graph.node if n.op_type == "Conv" and len(n.input) > 1}
    kept, dequantize = [], []
    for init in graph.initializer:
        values = numpy_helper.to_array(init) if init.data_type == TensorProto.FLOAT else None
        if init.name not in weights or values is None or values.size < min_elements:
            kept.append(init)
            continue
        flat = values.reshape(values.shape[0], -1)
        scale = np.maximum(np.abs(flat).max(axis=1), 1e-12) / 127.0
        q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8).reshape(values.shape)
        names = (init.name + "__int8", init.name + "__scale", init.name + "__zero")
        kept += [
            numpy_helper.from_array(q, names[0]),
            numpy_helper.from_array(scale.astype(np.float32), names[1]),
            numpy_helper.from_array(np.zeros(values.shape[0], np.int8), names[2]),
        ]
        dequantize.append(helper.make_node("DequantizeLinear", list(names), [init.name], axis=0))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dequantize + nodes)
    # The per-channel scales stay float32: small kernels' scales would be float16 subnormals.
    return store_weights_fp16(proto, min_elements, keep=frozenset(n.input[1] for n in dequantize))


#: Operators quantised to int8. Convolutions carry nearly all of Xception's arithmetic; the small
#: dense head that turns features into months stays float32, as does everything else.
INT8_OPS = ("Conv",)


def quantize_int8(fp32, images: np.ndarray, sex: np.ndarray, batch: int = 16):
    """Static int8 quantisation (QDQ, per-channel int8 weights, uint8 activations: the U8S8 form that
    x86 VNNI runs fastest), calibrated with MinMax on ``images`` (real radiographs through the shared
    preprocessing). Returns the quantised ModelProto."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                {INPUT_IMAGE: images[i : i + batch], INPUT_SEX: sex[i : i + batch]}
                for i in range(0, len(images), batch)
            )

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save(fp32, src)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(INT8_OPS),
        )
        return onnx.load(str(dst))


def _session(proto):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def predict_onnx(session, images: np.ndarray, sex: np.ndarray) -> np.ndarray:
    return session.run([OUTPUT], {INPUT_IMAGE: images, INPUT_SEX: sex})[0].reshape(-1)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


#: Training options that describe the recipe (the model file's ``training_config``).
RECIPE_KEYS = (
    "input_size",
    "square",
    "batch_size",
    "lr",
    "loss",
    "huber_delta",
    "optimizer",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "weights",
    "mixed_precision",
    "val_fraction",
    "seed",
    "split_seed",
)


def split_seed(config: dict) -> int:
    """The seed of a run's training/validation split: runs before ``--split-seed`` used ``--seed``."""
    return config["split_seed"] if config.get("split_seed") is not None else config["seed"]


def training_summary(run_dir: Path) -> dict:
    """What the model file says about its training, read from the run's own records.

    Epochs come from ``history.csv`` (what ran, across every ``--resume``), not from the
    options of the first launch; a run started from an earlier run's weights (``--init``)
    includes that run's summary, so a progressive-resizing model describes every stage; weights
    rebuilt from a model file (``training.recover``) bring that file's own ``training_config``.
    Only run folder names are kept: no path of the training machine.
    """
    config = json.loads((run_dir / "config.json").read_text())
    summary = {k: config[k] for k in RECIPE_KEYS if k in config}
    if summary.get("weights") not in (None, "none", "imagenet"):
        summary["weights"] = f"file:{Path(summary['weights']).name}"  # a local weights file: its name only
    history = run_dir / "history.csv"
    rows = list(csv.DictReader(history.open())) if history.is_file() else []
    summary["epochs_trained"] = len(rows)
    if rows and "val_loss" in rows[0]:
        summary["best_epoch"] = 1 + min(range(len(rows)), key=lambda i: float(rows[i]["val_loss"]))
    init = config.get("init")
    if init:
        earlier = Path(init).parent
        if (earlier / "config.json").is_file():
            summary["init_from"] = training_summary(earlier) | {"run": earlier.name}
        elif (earlier / "recovered.json").is_file():  # weights rebuilt from a model file (training.recover)
            recovered = json.loads((earlier / "recovered.json").read_text())
            summary["init_from"] = dict(recovered.get("training_config") or {}) | {
                "recovered_from": {
                    "model_version": recovered.get("model_version") or recovered.get("source"),
                    "weights_storage": recovered.get("weights_storage"),
                    "batchnorm_statistics_from": f"{recovered.get('calibration_images')} training radiographs",
                    "folder": earlier.name,
                }
                | ({"ensemble_member": recovered["ensemble_member"]} if "ensemble_member" in recovered else {}),
                "run": recovered.get("source_run") or earlier.name,  # the run that made the file
            }
        else:
            summary["init_from"] = {"run": earlier.name}
    return summary


def run_splits(run_dir: Path, csv_path: Path | None):
    """The run's own training and validation samples: (config, train, val, train folder, val folder)."""
    from training import data

    config = json.loads((run_dir / "config.json").read_text())
    labels = Path(csv_path or config["csv"])
    if not labels.is_file():
        raise ExportError(f"calibration needs the run's labels: {labels} not found (pass --csv, or --no-calibration)")
    samples = data.read_labels(labels)[: config.get("limit")]
    image_dir = data.default_image_dir(labels) if csv_path or not config.get("images") else Path(config["images"])
    if config.get("val_csv"):  # The run validated on a separate labelled set, as the RSNA release comes.
        val_labels = Path(config["val_csv"])
        if not val_labels.is_file():
            raise ExportError(f"calibration needs the run's validation labels: {val_labels} not found")
        train_s, val_s = samples, data.read_labels(val_labels)
        val_dir = Path(config["val_images"]) if config.get("val_images") else data.default_image_dir(val_labels)
    else:
        train_s, val_s = data.stratified_split(samples, config["val_fraction"], split_seed(config))
        val_dir = image_dir
    recorded = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
    if recorded and (recorded.get("train_count"), recorded.get("validation_count")) != (len(train_s), len(val_s)):
        raise ExportError(
            f"calibration: {labels} gives {len(train_s)} training and {len(val_s)} validation images, but the run "
            f"trained on {recorded.get('train_count')} and validated on {recorded.get('validation_count')}: "
            "not the run's labels, so validation residuals could come from training images"
        )
    if recorded.get("validation_fingerprint", data.fingerprint(val_s)) != data.fingerprint(val_s):
        raise ExportError(
            f"calibration: the split rebuilt from {labels} holds other validation images than the run recorded: "
            "validation residuals could come from training images"
        )
    return config, train_s, val_s, image_dir, val_dir


def run_inputs(samples, folder: Path, spec: PreprocessSpec, cache_dir: Path | None):
    """(images, sex, age) of samples, preprocessed through radiograph (cached)."""
    from training import data

    images = data.load_images(data.image_paths(samples, folder), spec, cache_dir)
    sex, age = data.arrays(samples)
    return images, sex, age


def predict_all(session, images, sex, outputs=(OUTPUT,), batch: int = 32) -> list[np.ndarray]:
    chunks = [
        session.run(list(outputs), {INPUT_IMAGE: np.asarray(images[i : i + batch]), INPUT_SEX: sex[i : i + batch]})
        for i in range(0, len(sex), batch)
    ]
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(outputs))]


def calibrate(
    session,
    spec: PreprocessSpec,
    splits: tuple,
    seed: int,
    cache_dir: Path | None,
    train_count: int,
    gate_percentile: float | None = None,
) -> dict:
    """Fit the interval on the validation split and the gate on training images.

    ``splits`` is ``(train, val, train folder, val folder)``: the samples the model trained and
    validated on. Predictions come from ``session``: the exported file itself, as the service runs it.
    """
    from export.calibration import GATE_PERCENTILE, FeatureGate, IntervalModel

    train_s, val_s, image_dir, val_dir = splits
    rng = np.random.default_rng(seed)
    train_s = [train_s[i] for i in sorted(rng.permutation(len(train_s))[:train_count])]

    def run(subset, folder):
        images, sex, age = run_inputs(subset, folder, spec, cache_dir)
        months, features = predict_all(session, images, sex, (OUTPUT, FEATURES))
        return months.reshape(-1), features, age

    val_pred, val_features, val_age = run(val_s, val_dir)
    _, train_features, _ = run(train_s, image_dir)
    try:
        interval = IntervalModel.fit(val_pred, val_age)
        percentile = GATE_PERCENTILE if gate_percentile is None else gate_percentile
        gate = FeatureGate.fit(train_features, val_features, percentile=percentile)
    except ValueError as exc:
        raise ExportError(f"calibration: {exc} (pass --no-calibration for a model without them)") from None
    return {
        "validation_mae_months": float(np.abs(val_pred - val_age).mean()),
        "interval": interval.to_dict() | {"validation_images": len(val_s)},
        "gate": gate.to_dict() | {"training_images": len(train_s), "validation_images": len(val_s)},
    }


def export_run(
    run_dir: Path,
    out: Path,
    parity_images: Sequence[Path],
    storage: str = "float16",
    model_name: str = "boneage-xception",
    model_version: str | None = None,
    timing_repeats: int = 5,
    calibration: bool = True,
    csv_path: Path | None = None,
    cache_dir: Path | None = None,
    gate_train_count: int = 3000,
    gate_percentile: float | None = None,
) -> dict:
    """Convert, check parity for each storage option, calibrate, write ``out`` with metadata; return a report."""
    import keras
    import onnx
    import tensorflow as tf
    import tf2onnx

    if len(parity_images) < 16:
        raise ExportError(f"parity needs at least 16 real radiographs, got {len(parity_images)}")
    saved, spec, config = load_run(run_dir)
    model = float32_twin(saved)
    images = np.stack([load_file(p, spec) for p in parity_images])
    sex = (np.arange(len(images)) % 2).astype(np.float32).reshape(-1, 1)
    reference = predict_keras(model, images, sex)

    report: dict = {"parity_images": len(images), "storage": {}}
    if model is not saved:  # Trained in mixed precision: how far float32 moves its answers.
        drift = float(np.abs(predict_keras(saved, images, sex) - reference).max())
        report["mixed_precision_drift_months"] = drift
    fp32 = to_onnx(with_features(model), spec.input_size)
    candidates = {"float32": (fp32, PARITY_FP32_MONTHS)}
    if storage == "float16":
        fp16 = onnx.ModelProto()
        fp16.CopyFrom(fp32)
        candidates["float16"] = (store_weights_fp16(fp16), PARITY_FP16_MONTHS)
    cache = cache_dir or (Path(config["cache_dir"]) if config.get("cache_dir") else None)
    if storage == "int8":
        _, train_s, _, image_dir, _ = run_splits(run_dir, csv_path)
        pick = np.random.default_rng(config["seed"] + 1).permutation(len(train_s))[:INT8_CALIBRATION_IMAGES]
        cal_images, cal_sex, _ = run_inputs([train_s[i] for i in sorted(pick)], image_dir, spec, cache)
        candidates["int8"] = (quantize_int8(fp32, np.asarray(cal_images), cal_sex), float("inf"))
    sessions = {}
    for name, (proto, bound) in candidates.items():
        sessions[name] = _session(proto)
        diff = float(np.abs(predict_onnx(sessions[name], images, sex) - reference).max())
        report["storage"][name] = {
            "size_mb": round(proto.ByteSize() / 1e6, 2),
            "max_abs_diff_months": diff,
            "bound_months": bound,
        }
        if not diff <= bound:
            raise ExportError(f"{name} export differs from Keras by {diff:.4f} months (> {bound}); not written")
    if storage == "int8":
        _, _, val_s, _, val_dir = run_splits(run_dir, csv_path)
        val_images, val_sex, val_age = run_inputs(val_s, val_dir, spec, cache)
        mae = {
            name: float(np.abs(predict_all(sessions[name], val_images, val_sex)[0].reshape(-1) - val_age).mean())
            for name in ("float32", "int8")
        }
        drift = mae["int8"] - mae["float32"]
        report["int8"] = {
            "validation_mae_float32": mae["float32"],
            "validation_mae_int8": mae["int8"],
            "drift_months": drift,
            "bound_months": INT8_MAX_MAE_DRIFT_MONTHS,
            "validation_images": len(val_s),
            "calibration_images": INT8_CALIBRATION_IMAGES,
            "quantised_ops": list(INT8_OPS),
        }
        report["storage"]["int8"]["bound_months"] = None  # judged by validation MAE, not single answers
        if drift > INT8_MAX_MAE_DRIFT_MONTHS:
            raise ExportError(
                f"int8 validation MAE {mae['int8']:.2f} exceeds float32's {mae['float32']:.2f} by {drift:.2f} months "
                f"(> {INT8_MAX_MAE_DRIFT_MONTHS}); not written"
            )
    chosen, _ = candidates[storage]

    one, sixteen = (images[:1], sex[:1]), (images[:16], sex[:16])
    session = sessions[storage]
    report["timing_ms"] = {
        "onnxruntime_batch1": _median_ms(lambda: predict_onnx(session, *one), timing_repeats),
        "onnxruntime_batch16": _median_ms(lambda: predict_onnx(session, *sixteen), timing_repeats),
        "keras_batch1": _median_ms(lambda: predict_keras(model, *one), timing_repeats),
        "keras_batch16": _median_ms(lambda: predict_keras(model, *sixteen), timing_repeats),
    }
    reliability = {}
    if calibration:
        _, train_s, val_s, image_dir, val_dir = run_splits(run_dir, csv_path)
        splits = (train_s, val_s, image_dir, val_dir)
        reliability = calibrate(session, spec, splits, config["seed"], cache, gate_train_count, gate_percentile)
        report["calibration"] = {
            "interval_bands": len(reliability["interval"]["lower_edges"]),
            "gate_threshold": reliability["gate"]["threshold"],
        }

    def read(name: str) -> dict:
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    metadata = {
        "format_version": "1",
        "model_name": model_name,
        "model_version": model_version or run_dir.name,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source_run": run_dir.name,
        "training_data": read("data.json"),
        "training_config": training_summary(run_dir),
        "validation_metrics": read("metrics.json"),
        **reliability,
        "versions": {
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
            "opset": OPSET,
        },
        "weights_storage": storage,
        **({"quantization": report["int8"]} if storage == "int8" else {}),
        "parity": report["storage"][storage]
        | {"images": len(images)}
        | {k: v for k, v in report.items() if k == "mixed_precision_drift_months"},
        "intended_use": "Decision support and research; not a medical device.",
    }
    report.update(
        write_model_file(chosen, out, metadata, spec, f"{model_name}: hand radiograph + sex → bone age in months")
    )
    return report


def write_model_file(proto, out: Path, metadata: dict, spec: PreprocessSpec, description: str) -> dict:
    """Write ``proto`` with its metadata and spec to ``out``, read it back with the service's loader."""
    import onnx

    onnx.helper.set_model_props(proto, encode_metadata(metadata) | {SPEC_KEY: spec.to_json()})
    proto.producer_name = "boneage-service export"
    proto.doc_string = description
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proto.SerializeToString())
    _, modelfile = open_session(out)  # Read back with the loader the service uses.
    return {"path": str(out), "file_size_mb": round(out.stat().st_size / 1e6, 2), "metadata": modelfile.metadata}
