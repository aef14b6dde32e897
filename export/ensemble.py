"""Exported model files → one ONNX file that averages their answers (a small ensemble).

    python -m export ensemble LARGER.onnx SMALLER.onnx --out models/boneage.onnx --storage int8-weights

Why inside one file: the service keeps one session, one preprocessing and its batching, and an
ensemble costs one model call per batch like any other model. The first member sets the input:
its preprocessing spec is the file's. A member trained at a smaller side reads that same input
resized inside the graph (:func:`resize_node`: what ``radiograph``'s own resize does, to 1e-5),
so members must share every preprocessing setting but the side. A member may be member K of an
ensemble file, written ``FILE#K`` (:func:`float32_graph`), so a model that lives on only inside an
ensemble can be paired with a new one.

Members must also come from the same training/validation split (same labels, split seed and fraction,
recorded in each file), so that the validation residuals that set the ensemble's interval, its
gate threshold and its int8 check come from images none of its members trained on (read from the
folder beside the labels, as training reads them by default). The interval
and the gate are then fitted again, on the ensemble's own answers and on its features (the
members' pooled features side by side).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.convert import (
    INT8_CALIBRATION_IMAGES,
    INT8_MAX_MAE_DRIFT_MONTHS,
    OPSET,
    PARITY_FP16_MONTHS,
    PARITY_FP32_MONTHS,
    ExportError,
    _median_ms,
    calibrate,
    predict_all,
    quantize_int8,
    run_inputs,
    split_seed,
    store_weights_fp16,
    store_weights_int8,
    write_model_file,
)
from export.modelfile import (
    FEATURES,
    FOLD_DEQUANTIZE,
    INPUT_IMAGE,
    INPUT_SEX,
    INT8_WEIGHTS,
    OUTPUT,
    SPEC_KEY,
    ModelFile,
    decode_metadata,
)
from export.modelfile import open_session as open_model_file
from radiograph import PreprocessSpec
from radiograph.preprocess import load_file, to_model_input

#: int8-stored weights round each convolution kernel to 255 levels per output channel: single
#: answers move by up to about half a month (float16 storage: hundredths), so the file is judged
#: by its validation MAE, like int8 compute, with this bound on single answers as well.
PARITY_INT8_WEIGHTS_MONTHS = 1.0

#: The members' answers are averaged with equal weights: with two or three members, weights
#: fitted on the validation split would be tuned on the very residuals that calibrate the interval.
COMBINATION = "mean"

#: ``FILE#K``: member ``K`` of the ensemble file ``FILE`` (``export ensemble``, ``training.compare``).
MEMBER_ENTRY = re.compile(r"(.+)#(\d+)")


def split_entry(entry: str | Path) -> tuple[Path, int | None]:
    """``FILE#K`` → (FILE, K); ``FILE`` → (FILE, None). A file whose own name ends in ``#K`` is itself."""
    member = MEMBER_ENTRY.fullmatch(str(entry))
    if member is None or Path(entry).is_file():
        return Path(entry), None
    return Path(member[1]), int(member[2])


def float32_weights(proto):
    """Undo :func:`store_weights_fp16`: float16 initializers + Cast → float32 initializers.

    Quantisation and graph surgery want plain float32 weights feeding their operators.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    halves = {i.name: i for i in graph.initializer if i.data_type == TensorProto.FLOAT16}
    unfolded, nodes = {}, []
    for node in graph.node:
        if node.op_type == "Cast" and len(node.input) == 1 and node.input[0] in halves:
            values = numpy_helper.to_array(halves[node.input[0]]).astype(np.float32)
            unfolded[node.input[0]] = numpy_helper.from_array(values, node.output[0])
        else:
            nodes.append(node)
    kept = [i for i in graph.initializer if i.name not in unfolded] + list(unfolded.values())
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def resize_node(source: str, target: str, side: int, name: str):
    """An NHWC image → ``side``×``side`` the way ``radiograph.preprocess.resize`` does it (Pillow's
    antialiased bilinear: half-pixel centres, samples outside the picture left out and the filter
    renormalised, which is ONNX's ``exclude_outside=1``). Returns the node and its sizes initializer."""
    from onnx import TensorProto, helper

    sizes = helper.make_tensor(name + "_sizes", TensorProto.INT64, [2], [side, side])
    node = helper.make_node(
        "Resize",
        [source, "", "", sizes.name],
        [target],
        mode="linear",
        antialias=1,
        exclude_outside=1,
        axes=[1, 2],
        coordinate_transformation_mode="half_pixel",
        name=name,
    )
    return node, sizes


def combine(members: Sequence, sides: Sequence[int], input_side: int):
    """Member ModelProtos (float32 weights) → one ModelProto: same inputs, mean answer, joined features.

    Every member's names get a prefix (``m0/``, ``m1/`` …); member ``i`` reads ``image`` resized to
    ``sides[i]`` when that differs from ``input_side``, and ``sex`` as it is.
    """
    import onnx
    from onnx import TensorProto, compose, helper

    nodes, initializers, value_info = [], [], []
    answers, features = [], []
    for i, (member, side) in enumerate(zip(members, sides, strict=True)):
        opset = {o.domain: o.version for o in member.opset_import}.get("")  # (other domains: check_model)
        if opset != OPSET:
            raise ExportError(f"member {i} uses opset {opset}; the ensemble is written in opset {OPSET}")
        prefixed = compose.add_prefix(member, f"m{i}/")
        graph = prefixed.graph
        names = {o.name for o in graph.output}
        if f"m{i}/{FEATURES}" not in names:
            raise ExportError(f"member {i} has no '{FEATURES}' output; re-export it with `python -m export convert`")
        if side == input_side:
            nodes.append(helper.make_node("Identity", [INPUT_IMAGE], [f"m{i}/{INPUT_IMAGE}"]))
        else:
            node, sizes = resize_node(INPUT_IMAGE, f"m{i}/{INPUT_IMAGE}", side, f"m{i}/resize_input")
            nodes.append(node)
            initializers.append(sizes)
        nodes.append(helper.make_node("Identity", [INPUT_SEX], [f"m{i}/{INPUT_SEX}"]))
        nodes.extend(graph.node)
        initializers.extend(graph.initializer)
        value_info.extend(graph.value_info)
        answers.append(f"m{i}/{OUTPUT}")
        features.append(f"m{i}/{FEATURES}")
    nodes.append(helper.make_node("Mean", answers, [OUTPUT], name="ensemble_mean"))
    nodes.append(helper.make_node("Concat", features, [FEATURES], axis=1, name="ensemble_features"))
    graph = helper.make_graph(
        nodes,
        "boneage_ensemble",
        [
            helper.make_tensor_value_info(INPUT_IMAGE, TensorProto.FLOAT, ["N", input_side, input_side, 3]),
            helper.make_tensor_value_info(INPUT_SEX, TensorProto.FLOAT, ["N", 1]),
        ],
        [
            helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", None]),
        ],
        initializer=initializers,
        value_info=value_info,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = members[0].ir_version
    onnx.checker.check_model(model)
    return model


def dequantized_weights(proto):
    """Undo :func:`~export.convert.store_weights_int8`: each DequantizeLinear of constant int8 weights
    → float32 weights, (q − zero) · scale per output channel, computed in float32: what ONNX Runtime
    itself folds at load (``session.disable_quant_qdq``). Changes ``proto`` in place."""
    from onnx import numpy_helper

    graph = proto.graph
    const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    folded, spent, nodes = [], set(), []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and all(name in const for name in node.input):
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if axis != 0 or any(a.name == "block_size" and a.i for a in node.attribute):
                raise ExportError(
                    f"{node.output[0]}: int8 weights with scales along axis {axis}, not per output channel"
                )
            q, scale = const[node.input[0]].astype(np.float32), const[node.input[1]].astype(np.float32)
            zero = const[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros_like(scale)
            shape = (-1,) + (1,) * (q.ndim - 1)
            values = ((q - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)
            folded.append(numpy_helper.from_array(values, node.output[0]))
            spent.update(node.input)  # the int8 tensors, scales and zero points
        else:
            nodes.append(node)
    kept = [i for i in graph.initializer if i.name not in spent]
    del graph.initializer[:]
    graph.initializer.extend(kept + folded)
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def ensemble_members(metadata: dict) -> list[dict]:
    """An ensemble file's members as its metadata records them (empty for a single-model file)."""
    return list((metadata.get("training_config") or {}).get("ensemble", {}).get("members", []))


def member_graph(proto, metadata: dict, index: int):
    """Member ``index`` of an ensemble (:func:`combine`'s output) as a single-model graph + its own metadata.

    The member's nodes are those writing ``m{index}/…`` names, apart from the Identity or Resize that
    feeds it the ensemble's input: it reads ``image`` at its own side and ``sex``, and answers
    ``bone_age_months`` and ``image_features``, as the file it was combined from did. Its weights are
    as the ensemble stores them (int8 ones behind their DequantizeLinear). ``metadata`` is the
    ensemble's, with ``preprocessing`` as a spec."""
    import onnx
    from onnx import TensorProto, helper

    members = ensemble_members(metadata)
    if not 0 <= index < len(members):
        raise ExportError(f"member {index}: the file has {len(members)} (0 to {len(members) - 1})")
    prefix = f"m{index}/"
    fed = {prefix + INPUT_IMAGE, prefix + INPUT_SEX}
    chosen = [
        n for n in proto.graph.node if all(o.startswith(prefix) for o in n.output) and not fed.intersection(n.output)
    ]

    def own(name: str) -> str:
        return name.removeprefix(prefix)

    used = {name for n in chosen for name in n.input}
    initializers, nodes = [], []
    for init in proto.graph.initializer:
        if init.name in used:
            copy = TensorProto()
            copy.CopyFrom(init)
            copy.name = own(init.name)
            initializers.append(copy)
    for n in chosen:
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.name = own(n.name)
        copy.input[:] = [own(i) for i in n.input]
        copy.output[:] = [own(o) for o in n.output]
        nodes.append(copy)
    side = int(members[index]["input_size"])
    graph = helper.make_graph(
        nodes,
        f"member_{index}",
        [
            helper.make_tensor_value_info(INPUT_IMAGE, TensorProto.FLOAT, ["N", side, side, 3]),
            helper.make_tensor_value_info(INPUT_SEX, TensorProto.FLOAT, ["N", 1]),
        ],
        [
            helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", None]),
        ],
        initializer=initializers,
    )
    member = helper.make_model(graph, opset_imports=list(proto.opset_import))
    member.ir_version = proto.ir_version
    onnx.checker.check_model(member)
    own_metadata = {
        "model_version": members[index].get("model_version"),
        "weights_storage": metadata.get("weights_storage"),
        "training_config": members[index].get("training_config") or {},
        "training_data": dict(metadata.get("training_data") or {}) | {"input_size": side},
        "preprocessing": PreprocessSpec.model_validate(metadata["preprocessing"].model_dump() | {"input_size": side}),
        # Where the member came from before this file, if it was itself taken from an ensemble.
        "ensemble_member": {"file_version": metadata.get("model_version"), "index": index}
        | ({"from": members[index]["from"]} if "from" in members[index] else {}),
        "versions": dict(enumerate((metadata.get("versions") or {}).get("members") or [])).get(index, {}),
    }
    return member, own_metadata


def graph_session(proto, fold_dequantize: bool = True):
    """An ONNX Runtime session on an in-memory graph, int8-stored weights folded once as the service
    folds a file's (``export.modelfile.open_session``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if fold_dequantize:
        options.add_session_config_entry(FOLD_DEQUANTIZE, "1")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def member_proto(path: Path, index: int):
    """:func:`member_graph` of the ensemble file at ``path``, its metadata read from the file itself
    (float16-stored weights widened; int8-stored ones still behind their DequantizeLinear)."""
    import onnx

    proto = float32_weights(onnx.load(str(path)))
    props = {p.key: p.value for p in proto.metadata_props}
    metadata = decode_metadata(props) | {"preprocessing": PreprocessSpec.from_json(props[SPEC_KEY])}
    return member_graph(proto, metadata, index)


def open_member(path: Path, index: int) -> tuple[object, ModelFile]:
    """``open_session`` for member ``index`` of an ensemble file: (session, ModelFile named ``FILE#K``)."""

    _, info = open_model_file(path)  # checked as the service checks it
    if not ensemble_members(info.metadata):
        raise ExportError(f"{path}: not an ensemble file, so it has no member {index}")
    graph, metadata = member_proto(path, index)
    member = ModelFile(path=Path(f"{path}#{index}"), spec=metadata["preprocessing"], metadata=metadata)
    return graph_session(graph, metadata["weights_storage"] == INT8_WEIGHTS), member


def open_entry(entry: str | Path) -> tuple[object, ModelFile]:
    """``FILE`` → (session, ModelFile) as the service opens it; ``FILE#K`` → ensemble member K's."""
    path, index = split_entry(entry)
    return open_model_file(path) if index is None else open_member(path, index)


def float32_graph(entry: str | Path):
    """``FILE`` or ``FILE#K`` → its graph with plain float32 weights, ready to be combined.

    float16-stored weights are widened (exact) and int8-stored ones dequantised as ONNX Runtime
    folds them at load, so the graph computes what the file computes. This lets a member that
    lives on only inside an ensemble (``models/boneage.onnx#0``) join a new ensemble: stored as
    int8 again, its weights round to the same levels."""
    import onnx

    path, index = split_entry(entry)
    proto = float32_weights(onnx.load(str(path))) if index is None else member_proto(path, index)[0]
    return dequantized_weights(proto)


def shared_split(files: Sequence[ModelFile], csv_path: Path | None):
    """The one training/validation split every member used → ``(seed, (train, val, folder, folder))``.

    Rebuilt from what each file records (labels under the data root, seed, fraction) and checked
    against the counts it records, so a member from another split is refused.
    """
    from training import data

    keys = []
    for f in files:
        config, recorded = f.metadata.get("training_config", {}), f.metadata.get("training_data", {})
        needed = ("labels", "train_count", "validation_count")
        if any(k not in recorded for k in needed) or "seed" not in config or "val_fraction" not in config:
            raise ExportError(f"{f.path}: its metadata does not record its labels, split counts, seed and fraction")
        if "stratified split" not in str(recorded.get("validation_source", "")):
            raise ExportError(f"{f.path}: validated on a separate labelled set; ensembles need a stratified split")
        counts = (recorded.get("train_count"), recorded.get("validation_count"), recorded.get("limit"))
        keys.append((recorded["labels"], split_seed(config), config["val_fraction"], counts))
    if len(set(keys)) != 1:
        raise ExportError(
            "members trained on different splits, so one's validation images may be another's training images: "
            + "; ".join(
                f"{f.path.name}: {k[0]}, split seed {k[1]}, fraction {k[2]}" for f, k in zip(files, keys, strict=True)
            )
        )
    labels_rel, seed, fraction, counts = keys[0]
    labels = Path(csv_path) if csv_path else data.data_root() / labels_rel
    if not labels.is_file():
        raise ExportError(f"the members' labels {labels} were not found (set BONEAGE_DATA_DIR or pass --csv)")
    train_s, val_s = data.stratified_split(data.read_labels(labels)[: counts[2]], fraction, seed)
    if (len(train_s), len(val_s)) != counts[:2]:
        raise ExportError(
            f"{labels} gives {len(train_s)} training and {len(val_s)} validation images, but the members "
            f"trained on {counts[0]} and validated on {counts[1]}: not their labels"
        )
    for f in files:  # Counts are the same for every split seed; the ids are not.
        recorded = f.metadata["training_data"].get("validation_fingerprint", data.fingerprint(val_s))
        if recorded != data.fingerprint(val_s):
            raise ExportError(f"{f.path.name}: validated on other images than the split its metadata describes")
    folder = data.default_image_dir(labels)
    return seed, (train_s, val_s, folder, folder)


def export_ensemble(
    member_paths: Sequence[Path],
    out: Path,
    parity_images: Sequence[Path],
    storage: str = "float16",
    model_name: str = "boneage-xception-ensemble",
    model_version: str | None = None,
    csv_path: Path | None = None,
    cache_dir: Path | None = None,
    gate_train_count: int = 3000,
    gate_percentile: float | None = None,
) -> dict:
    """Combine, check the graph against its members, calibrate, write ``out`` with metadata; return a report."""
    import onnx
    import onnxruntime as ort

    from training.evaluate import compute_metrics

    if len(member_paths) < 2:
        raise ExportError("an ensemble needs at least two model files")
    if any(Path(out).resolve() == split_entry(p)[0].resolve() for p in member_paths):
        raise ExportError(f"{out} is (or holds) one of the members: write the ensemble elsewhere, then copy it")
    if len(parity_images) < 16:
        raise ExportError(f"parity needs at least 16 real radiographs, got {len(parity_images)}")
    opened = [open_entry(p) for p in member_paths]
    files = [f for _, f in opened]
    spec: PreprocessSpec = files[0].spec
    for f in files:
        stored = f.metadata.get("weights_storage", "float16")
        if stored not in ("float16", "float32", INT8_WEIGHTS):
            kind = " (int8 compute)" if stored == "int8" else ""
            raise ExportError(
                f"{f.path.name}: its weights are stored as {stored}{kind}; "
                "combine the float16, float32 or int8-weights exports"
            )
    for f in files[1:]:
        if f.spec.model_copy(update={"input_size": spec.input_size}) != spec:
            raise ExportError(f"{f.path.name}: its preprocessing differs from {files[0].path.name}'s beyond the side")
        if f.spec.input_size > spec.input_size:
            raise ExportError(f"{f.path.name}: list the member with the largest input ({f.spec.input_size} px) first")
    seed, splits = shared_split(files, csv_path)
    sides = [f.spec.input_size for f in files]
    fp32 = combine([float32_graph(p) for p in member_paths], sides, spec.input_size)

    # Parity: the combined graph against its members run on their own inputs (the ensemble's input,
    # resized by radiograph's resize where the member is smaller): tests the wiring and the in-graph resize.
    images = np.stack([load_file(p, spec) for p in parity_images])
    sex = (np.arange(len(images)) % 2).astype(np.float32).reshape(-1, 1)

    def member_input(member: PreprocessSpec) -> np.ndarray:
        if member.input_size == spec.input_size:
            return images
        # The square picture in [0, 1] that the ensemble's input holds, through radiograph's last step.
        return np.stack([to_model_input(np.ascontiguousarray((x[:, :, 0] + 1) / 2), member) for x in images])

    expected = np.mean(
        [predict_all(s, member_input(f.spec), sex)[0].reshape(-1) for (s, _), f in zip(opened, files, strict=True)],
        axis=0,
    )
    candidates, bounds = {"float32": fp32}, {"float32": PARITY_FP32_MONTHS}
    if storage in ("float16", INT8_WEIGHTS):
        copy = onnx.ModelProto()
        copy.CopyFrom(fp32)
        candidates[storage] = store_weights_fp16(copy) if storage == "float16" else store_weights_int8(copy)
        bounds[storage] = PARITY_FP16_MONTHS if storage == "float16" else PARITY_INT8_WEIGHTS_MONTHS
    report: dict = {"parity_images": len(images), "storage": {}, "members": {}}
    sessions = {}
    for name, proto in candidates.items():
        sessions[name] = graph_session(proto)
        diff = float(np.abs(predict_all(sessions[name], images, sex)[0].reshape(-1) - expected).max())
        report["storage"][name] = {
            "size_mb": round(proto.ByteSize() / 1e6, 2),
            "max_abs_diff_months": diff,
            "bound_months": bounds[name],
        }
        if not diff <= bounds[name]:
            raise ExportError(f"{name} ensemble differs from its members by {diff:.4f} months; not written")

    train_s, val_s, image_dir, val_dir = splits
    val_images, val_sex, val_age = run_inputs(val_s, val_dir, spec, cache_dir)
    # Each member alone, on its own preprocessing: what combining gains.
    for (s, _), f in zip(opened, files, strict=True):
        own = val_images if f.spec == spec else run_inputs(val_s, val_dir, f.spec, cache_dir)[0]
        report["members"][f.path.name] = {
            "model_version": f.version,
            "input_size": f.spec.input_size,
            "validation_mae": float(np.abs(predict_all(s, own, val_sex)[0].reshape(-1) - val_age).mean()),
        }
    if storage == "int8":
        pick = np.random.default_rng(seed + 1).permutation(len(train_s))[:INT8_CALIBRATION_IMAGES]
        cal_images, cal_sex, _ = run_inputs([train_s[i] for i in sorted(pick)], image_dir, spec, cache_dir)
        candidates["int8"] = quantize_int8(fp32, np.asarray(cal_images), cal_sex)
        sessions["int8"] = graph_session(candidates["int8"], fold_dequantize=False)
        diff = float(np.abs(predict_all(sessions["int8"], images, sex)[0].reshape(-1) - expected).max())
        report["storage"]["int8"] = {
            "size_mb": round(candidates["int8"].ByteSize() / 1e6, 2),
            "max_abs_diff_months": diff,
            "bound_months": None,  # judged by validation MAE, not single answers
        }
    val_pred = {name: predict_all(sessions[name], val_images, val_sex)[0].reshape(-1) for name in sessions}
    report["validation_mae"] = {name: float(np.abs(p - val_age).mean()) for name, p in val_pred.items()}
    if storage in ("int8", INT8_WEIGHTS):
        drift = report["validation_mae"][storage] - report["validation_mae"]["float32"]
        report["int8"] = {
            "form": "weights and activations (static QDQ)" if storage == "int8" else "weights only, float32 compute",
            "validation_mae_float32": report["validation_mae"]["float32"],
            "validation_mae_int8": report["validation_mae"][storage],
            "drift_months": drift,
            "bound_months": INT8_MAX_MAE_DRIFT_MONTHS,
            "validation_images": len(val_s),
            **({"calibration_images": INT8_CALIBRATION_IMAGES} if storage == "int8" else {}),
        }
        if drift > INT8_MAX_MAE_DRIFT_MONTHS:
            raise ExportError(
                f"{storage} validation MAE exceeds float32's by {drift:.2f} months (> {INT8_MAX_MAE_DRIFT_MONTHS}); "
                "not written"
            )
    chosen, session = candidates[storage], sessions[storage]
    report["timing_ms"] = {
        "onnxruntime_batch1": _median_ms(lambda: predict_all(session, images[:1], sex[:1]), 5),
        "onnxruntime_batch16": _median_ms(lambda: predict_all(session, images[:16], sex[:16]), 5),
    }
    reliability = calibrate(session, spec, splits, seed, cache_dir, gate_train_count, gate_percentile)
    male = val_sex.reshape(-1) > 0.5
    metadata = {
        "format_version": "1",
        "model_name": model_name,
        "model_version": model_version or out.stem,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "source_run": "ensemble of " + " + ".join(f.version for f in files),
        "training_data": files[0].metadata.get("training_data", {}),
        "training_config": {
            "ensemble": {
                "combination": COMBINATION,
                "members": [
                    {"model_version": f.version, "input_size": f.spec.input_size}
                    | {"training_config": f.metadata.get("training_config", {})}
                    | ({"from": f.metadata["ensemble_member"]} if "ensemble_member" in f.metadata else {})
                    for f in files
                ],
            },
            "input_size": spec.input_size,
            "seed": seed,
            "val_fraction": files[0].metadata["training_config"]["val_fraction"],
        },
        "validation_metrics": compute_metrics(val_age, val_pred[storage], male),
        **reliability,
        "versions": {"onnx": onnx.__version__, "onnxruntime": ort.__version__, "opset": OPSET}
        | {"members": [f.metadata.get("versions", {}) for f in files]},
        "weights_storage": storage,
        **({"quantization": report["int8"]} if "int8" in report else {}),
        "parity": report["storage"][storage]
        | {"images": len(images), "against": "the member files, each on its own input side"},
        "intended_use": "Decision support and research; not a medical device.",
    }
    description = f"{model_name}: hand radiograph + sex → bone age in months (mean of {len(files)} models)"
    report.update(write_model_file(chosen, out, metadata, spec, description))
    return report
