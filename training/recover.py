"""Exported model file → a trainable Keras model, so training can go on from what shipped.

Why: Keras checkpoints live in run folders outside the repository, and they have not survived
a change of machine; the exported files in ``models/`` have. Without this, every new machine
starts training from random weights. With it, ``python -m training.train --init`` can start
from any model file this project exported, or from any member of an ensemble file.

The file is a Keras model converted by tf2onnx with each BatchNormalization folded into the
convolution before it (scaled kernels + a bias). The rebuilt model has ``training.model``'s
architecture; each folded convolution gets its kernel back and its BatchNormalization is set so
that, in inference, it adds the folded bias and nothing else. That alone would break training:
in training mode a BatchNormalization normalises by the batch's own statistics. So the moving
statistics are then measured on real training radiographs and the layer rescaled to match
(``recalibrate_batchnorm``), which leaves inference unchanged and makes a training-mode pass
agree with it. Weights stored as float16 come back float16-rounded: the rebuilt model matches
the file, which differs from the Keras model it was exported from by about 0.02 months.

An ensemble file holds its members' graphs side by side (``m0/``, ``m1/`` …), and for a member
whose own file is gone it is the only copy left: ``--member K`` cuts member K out
(``export.ensemble.member_graph``) and rebuilds that, checked against that part of the file as
ONNX Runtime computes it. Its int8-stored weights come back as the file computes
with them (rounded to 255 levels per output channel); training starts from those and is free to
move them, and ``recovered.json`` says so (``weights_storage``). Files with int8 *compute*
(activations quantised too) are refused: what they compute is not a float network.

Usage::

    python -m training.recover models/boneage-fast.onnx --out ~/runs/from-fast
    python -m training.recover models/boneage.onnx --member 0 --out ~/runs/from-xception224-v3
    python -m training.train --init ~/runs/from-fast/best.keras ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import onnx
from onnx import numpy_helper

from export.convert import ExportError
from export.ensemble import (
    dequantized_weights,
    ensemble_members,
    float32_weights,
    graph_session,
    member_graph,
    shared_split,
)
from export.modelfile import INPUT_IMAGE, INPUT_SEX, INT8_WEIGHTS, OUTPUT, ModelFile, ModelFileError, open_session
from training import data
from training.evaluate import predict_keras
from training.model import build_model

#: Largest |Keras − ONNX Runtime| accepted for the rebuilt model (months): float32 round-off only.
PARITY_MONTHS = 0.05
#: Training radiographs whose activations set the BatchNormalization statistics.
CALIBRATION_IMAGES = 512


class RecoverError(RuntimeError):
    """The file cannot be turned back into a Keras model; the message says why."""


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every float initializer as float32 (``model`` has been through ``float32_weights``)."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {k: v.astype(np.float32) for k, v in values.items() if v.dtype.kind == "f"}


def folded_layers(model: onnx.ModelProto) -> dict[str, list]:
    """The file's convolutions and dense layers, by kind, in graph order.

    ``stem``: the two 3×3 convolutions; ``shortcut``: the 1×1 strided residual convolutions;
    ``separable``: (depthwise kernel, pointwise kernel, bias); ``dense``: (output name, kernel, bias).
    """
    const = _constants(model)
    nodes = list(model.graph.node)
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: dict[str, list] = {"stem": [], "shortcut": [], "separable": [], "dense": []}
    pointwise_done: set[str] = set()
    for node in nodes:
        if node.op_type == "Conv":
            if node.name in pointwise_done:
                continue
            kernel = const[node.input[1]]
            bias = const[node.input[2]] if len(node.input) > 2 else np.zeros(kernel.shape[0], np.float32)
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if group > 1:  # depthwise: its only consumer is the pointwise half of the separable convolution
                (pointwise,) = consumers[node.output[0]]
                if pointwise.op_type != "Conv" or len(pointwise.input) < 3:
                    raise RecoverError(f"depthwise convolution {node.output[0]} is not followed by a pointwise one")
                pointwise_done.add(pointwise.name)
                out["separable"].append((kernel, const[pointwise.input[1]], const[pointwise.input[2]]))
            elif kernel.shape[2:] == (1, 1):
                out["shortcut"].append((kernel, bias))
            else:
                out["stem"].append((kernel, bias))
        elif node.op_type == "MatMul" and node.input[1] in const:
            (add,) = consumers[node.output[0]]
            out["dense"].append((node.output[0], const[node.input[1]], const[add.input[1]]))
    return out


def _rescaling(model: onnx.ModelProto) -> tuple[float, float]:
    """(scale, offset) of the last layer, normalised answer → months: the run's target SD and mean."""
    const = _constants(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    add = producers.get(OUTPUT)
    mul = next((producers.get(i) for i in add.input if i not in const), None) if add is not None else None
    if add is None or add.op_type != "Add" or mul is None or mul.op_type != "Mul":
        raise RecoverError("the file does not end in the rescaling to months that training.model builds")
    offset = next(const[i] for i in add.input if i in const)
    scale = next(const[i] for i in mul.input if i in const)
    return float(np.asarray(scale).item()), float(np.asarray(offset).item())


def network(path: Path, member: int | None = None) -> tuple[onnx.ModelProto, dict]:
    """The file's network, or an ensemble's member ``member``, as one float32 ONNX graph + its metadata
    (``preprocessing`` as a spec; ``reference``: the same network as the file computes it, int8-stored
    weights still behind their DequantizeLinear): what :func:`rebuild` turns into Keras, and what
    that is checked against."""
    try:
        _, info = open_session(path, providers=["CPUExecutionProvider"])  # checked as the service checks it
    except ModelFileError as exc:
        raise RecoverError(str(exc)) from None
    storage = info.metadata.get("weights_storage")
    if storage not in ("float32", "float16", INT8_WEIGHTS):
        raise RecoverError(
            f"{path}: weights stored as {storage!r}; only files that compute in float32 can be trained on "
            "(int8 compute quantises the activations too)"
        )
    model = float32_weights(onnx.load(str(path)))  # float16 storage: initializers + Cast → float32
    metadata = info.metadata | {"preprocessing": info.spec}
    members = ensemble_members(metadata)
    if not members and any(name.startswith("m0/") for node in model.graph.node for name in node.output):
        raise RecoverError(f"{path}: an ensemble file that does not record its members; recover their own files")
    if members and member is None:
        names = ", ".join(f"{k}: {m.get('model_version')}" for k, m in enumerate(members))
        raise RecoverError(f"{path}: an ensemble file; choose one of its members with --member ({names})")
    if member is not None:
        if not members:
            raise RecoverError(f"{path}: not an ensemble file; leave out --member")
        try:
            model, metadata = member_graph(model, metadata, member)
        except ExportError as exc:
            raise RecoverError(f"{path}: {exc}") from None
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    try:
        return dequantized_weights(model), metadata | {"reference": reference}
    except ExportError as exc:
        raise RecoverError(f"{path}: {exc}") from None


def rebuild(path: Path, member: int | None = None) -> tuple[keras.Model, dict]:
    """The file's network (or an ensemble's member ``member``) as a ``training.model`` Keras model
    (inference-exact) + its metadata, with ``reference`` as :func:`network` gives it."""
    model, metadata = network(path, member)
    spec = metadata["preprocessing"]
    layers = folded_layers(model)
    scale, offset = _rescaling(model)
    keras_model = build_model(spec.input_size, None, target_mean=offset, target_std=scale)

    convs = {"stem": [], "shortcut": [], "separable": []}
    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.SeparableConv2D):
            convs["separable"].append(layer)
        elif isinstance(layer, keras.layers.Conv2D):
            convs["stem" if layer.name.startswith("block1_") else "shortcut"].append(layer)
    batchnorm = {id(bn.input): bn for bn in keras_model.layers if isinstance(bn, keras.layers.BatchNormalization)}
    for kind, found in convs.items():
        if len(found) != len(layers[kind]):
            raise RecoverError(f"{path}: {len(layers[kind])} {kind} convolutions, the architecture has {len(found)}")
    for layer, (kernel, bias) in zip(
        convs["stem"] + convs["shortcut"], layers["stem"] + layers["shortcut"], strict=True
    ):
        layer.set_weights([kernel.transpose(2, 3, 1, 0)])
        _set_bias(batchnorm[id(layer.output)], bias)
    for layer, (depthwise, pointwise, bias) in zip(convs["separable"], layers["separable"], strict=True):
        layer.set_weights([depthwise.transpose(2, 3, 0, 1), pointwise.transpose(2, 3, 1, 0)])
        _set_bias(batchnorm[id(layer.output)], bias)
    dense = {name: (kernel, bias) for name, kernel, bias in layers["dense"]}
    for layer_name in ("sex_dense", "head_dense", "age_normalised"):
        matches = [v for k, v in dense.items() if f"/{layer_name}" in k]
        if len(matches) != 1:
            raise RecoverError(f"{path}: no single {layer_name} layer in the file")
        keras_model.get_layer(layer_name).set_weights(list(matches[0]))
    return keras_model, metadata


def _set_bias(bn: keras.layers.BatchNormalization, bias: np.ndarray) -> None:
    """Inference y = x + bias: unit scale, zero mean, variance 1 − ε (so √(var + ε) = 1)."""
    ones = np.ones_like(bias)
    bn.set_weights([ones, bias, np.zeros_like(bias), ones - bn.epsilon])


def recalibrate_batchnorm(model: keras.Model, images: np.ndarray, sex: np.ndarray, batch: int = 32) -> None:
    """Give every BatchNormalization the statistics of its input on ``images``, inference unchanged.

    Each layer computes a·x + b in inference (a = γ/√(var + ε), b = β − a·mean; after ``rebuild``,
    a = 1 and b is the folded bias). With the input's mean m and variance v measured per channel,
    γ = a·√(v + ε) and β = b + a·m keep a·x + b, and a training-mode pass, which uses the batch's
    own mean and variance, now computes about the same thing. Calling it again re-measures.
    """
    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.inputs, [layer.input for layer in layers])
    sums = [np.zeros(layer.input.shape[-1]) for layer in layers]
    squares = [np.zeros(layer.input.shape[-1]) for layer in layers]
    counts = [0] * len(layers)
    for i in range(0, len(images), batch):
        outputs = probe({"image": np.asarray(images[i : i + batch]), "sex": sex[i : i + batch]}, training=False)
        for k, x in enumerate(outputs):
            x = keras.ops.convert_to_numpy(x).astype(np.float64).reshape(-1, sums[k].shape[0])
            sums[k] += x.sum(0)
            squares[k] += (x**2).sum(0)
            counts[k] += x.shape[0]
    for k, layer in enumerate(layers):
        gamma, beta, moving_mean, moving_var = (w.astype(np.float64) for w in layer.get_weights())
        scale = gamma / np.sqrt(moving_var + layer.epsilon)
        shift = beta - scale * moving_mean
        mean = sums[k] / counts[k]
        var = np.maximum(squares[k] / counts[k] - mean**2, 0.0)
        new = [scale * np.sqrt(var + layer.epsilon), shift + scale * mean, mean, var]
        layer.set_weights([w.astype(np.float32) for w in new])


def training_mode_answers(model: keras.Model, images: np.ndarray, sex: np.ndarray) -> np.ndarray:
    """Answers with BatchNormalization on batch statistics (as in a training step), dropout off,
    model left as it was.

    A training-mode call also moves each layer's moving statistics towards the batch's; the weights
    are put back so that checking does not change what is saved."""
    weights = model.get_weights()
    dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
    rates = [layer.rate for layer in dropouts]
    for layer in dropouts:
        layer.rate = 0.0
    try:
        return keras.ops.convert_to_numpy(model({"image": np.asarray(images), "sex": sex}, training=True)).ravel()
    finally:
        model.set_weights(weights)
        for layer, rate in zip(dropouts, rates, strict=True):
            layer.rate = rate


def training_images(metadata: dict, csv_path: Path, count: int, cache_dir: Path | None):
    """(images, sex) of ``count`` radiographs from the file's own training split, through its preprocessing.

    The split is rebuilt and checked as ``export ensemble`` does for its members (counts, and the
    validation ids' fingerprint where recorded): statistics measured on validation images would
    leak them into the next run's starting point."""
    member = ModelFile(path=Path(str(metadata.get("model_version"))), spec=metadata["preprocessing"], metadata=metadata)
    try:
        seed, (train_s, _, folder, _) = shared_split([member], csv_path)
    except ExportError as exc:
        raise RecoverError(f"{csv_path} does not rebuild the file's training split: {exc}") from None
    pick = np.random.default_rng(seed).choice(len(train_s), size=min(count, len(train_s)), replace=False)
    chosen = [train_s[i] for i in sorted(pick)]
    images = data.load_images(data.image_paths(chosen, folder), metadata["preprocessing"], cache_dir)
    sex, _ = data.arrays(chosen)
    return images, sex


def recover(
    path: Path,
    out_dir: Path,
    csv_path: Path,
    count: int = CALIBRATION_IMAGES,
    cache_dir: Path | None = None,
    member: int | None = None,
) -> dict:
    """Rebuild, check against ONNX Runtime, recalibrate, check again, save ``out_dir/best.keras``."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RecoverError(f"{out_dir} is not empty: choose a new folder (a run folder's best.keras would be replaced)")
    model, metadata = rebuild(path, member)
    images, sex = training_images(metadata, csv_path, count, cache_dir)
    if member is None:
        session, _ = open_session(path, providers=["CPUExecutionProvider"])
    else:  # the member as the file computes it: its part of the graph, int8 weights folded as at load
        session = graph_session(metadata["reference"], metadata["weights_storage"] == INT8_WEIGHTS)
    # A random batch: the training split is ordered by sex and age band, and a batch of one band has
    # batch statistics far from the population's (training shuffles; so does this check).
    check = np.sort(np.random.default_rng(0).permutation(len(sex))[:32])
    reference = session.run([OUTPUT], {INPUT_IMAGE: np.asarray(images[check]), INPUT_SEX: sex[check]})[0].ravel()
    rebuilt = predict_keras(model, images[check], sex[check]).ravel()
    recalibrate_batchnorm(model, images, sex)
    recalibrated = predict_keras(model, images[check], sex[check]).ravel()
    training_mode = training_mode_answers(model, images[check], sex[check])
    report = {
        "source": path.name if member is None else f"{path.name}, member {member}",
        "model_version": metadata.get("model_version"),
        "source_run": metadata.get("source_run"),
        "weights_storage": metadata.get("weights_storage"),
        "calibration_images": len(sex),
        "max_abs_diff_months": float(np.abs(rebuilt - reference).max()),
        "max_abs_diff_after_recalibration_months": float(np.abs(recalibrated - reference).max()),
        # Dropout off: the gap between batch statistics of 32 radiographs and the measured ones.
        "training_mode_mae_vs_inference_months": float(np.abs(training_mode - reference).mean()),
        "training_config": metadata.get("training_config"),
    }
    if member is not None:
        report["ensemble_member"] = metadata["ensemble_member"]
    if max(report["max_abs_diff_months"], report["max_abs_diff_after_recalibration_months"]) > PARITY_MONTHS:
        raise RecoverError(f"{path}: the rebuilt Keras model differs from the file: {json.dumps(report)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / "best.keras")
    metadata["preprocessing"].save(out_dir / "preprocessing.json")
    (out_dir / "recovered.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.recover", description=__doc__.split("\n\n")[0])
    p.add_argument("model_file", type=Path, help="an exported model file (float32, float16 or int8-stored weights)")
    p.add_argument("--member", type=int, help="an ensemble file's member to rebuild (0 = the first, the largest input)")
    p.add_argument("--out", type=Path, required=True, help="folder for best.keras (use as --init)")
    p.add_argument("--csv", type=Path, default=data.data_root() / "rsna-299px" / "boneage-training-dataset.csv")
    p.add_argument("--images", type=int, default=CALIBRATION_IMAGES, help="training radiographs for the statistics")
    p.add_argument("--cache-dir", type=Path)
    args = p.parse_args(argv)
    try:
        report = recover(args.model_file, args.out, args.csv, args.images, args.cache_dir, args.member)
    except RecoverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in report.items() if k != "training_config"}, indent=2))
    print(f"python -m training.train --init {args.out / 'best.keras'} ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
