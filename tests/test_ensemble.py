"""An ensemble is one model file: it averages its members, carries its own interval and gate, and serves.

Members are real (one-epoch) models trained on the same 400 radiographs of the 299 px set and the
same split, at two input sides, so the smaller one reads the larger one's input resized in the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from export import ensemble
from export.convert import ExportError
from export.modelfile import FEATURES, open_session
from radiograph.preprocess import load_file, resize, to_model_input
from tests.conftest import HALFRES_PNG


@pytest.fixture(scope="module")
def larger_member(data_dir, tmp_path_factory) -> Path:
    """An 80 px model on the calibrated fixture's radiographs and split (71 px), initialised independently
    (its own --seed, the fixture's --split-seed), as a second lineage is trained; the ensemble calibrates itself."""
    from export.convert import export_run
    from training import train

    run = tmp_path_factory.mktemp("runs") / "member80"
    labels = data_dir / "rsna-299px" / "boneage-training-dataset.csv"
    args = ["--csv", str(labels), "--run-dir", str(run), "--input-size", "80", "--epochs", "1", "--batch-size", "16"]
    args += ["--workers", "2", "--limit", "400", "--val-fraction", "0.3", "--cache-dir", str(run.parent / "cache")]
    assert train.main([*args, "--seed", "7", "--split-seed", "42"]) == 0
    out = run.parent / "member80.onnx"
    parity = sorted((data_dir / "rsna-halfres" / "images").glob("*.png"))[:16]
    export_run(run, out, parity, model_version="member-80", timing_repeats=1, calibration=False)
    return out


@pytest.fixture(scope="module")
def parity(data_dir) -> list[Path]:
    return sorted((data_dir / "rsna-halfres" / "images").glob("*.png"))[:16]


@pytest.fixture(scope="module")
def combined(larger_member, calibrated_onnx, parity, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("models") / "ensemble.onnx"
    report = ensemble.export_ensemble(
        [larger_member, calibrated_onnx], out, parity, "int8-weights", model_version="ens-test", gate_train_count=150
    )
    return out, report


def test_the_in_graph_resize_is_radiographs_resize():
    """The smaller member must see what its own preprocessing would give it, edges included."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node, sizes = ensemble.resize_node("x", "y", 128, "resize")
    image = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 224, 224, 1])
    graph = helper.make_graph([node], "g", [image], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    graph.initializer.append(sizes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    x = np.random.default_rng(0).random((1, 224, 224, 1)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.abs(y[0, :, :, 0] - resize(x[0, :, :, 0], 128)).max() < 1e-4


def test_the_ensemble_answers_the_mean_of_its_members(larger_member, calibrated_onnx, parity):
    """The graph's wiring, built with float32 weights, against the two member files run by hand."""
    import onnxruntime as ort

    big_session, big = open_session(larger_member)
    small_session, small = open_session(calibrated_onnx)
    members = [ensemble.float32_weights(onnx.load(str(p))) for p in (larger_member, calibrated_onnx)]
    graph = ensemble.combine(members, [80, 71], 80)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.stack([load_file(p, big.spec) for p in parity[:6]])
    # The small member's input: the large one's, resized by radiograph's own resize.
    x_small = np.stack([to_model_input(np.ascontiguousarray((t[:, :, 0] + 1) / 2), small.spec) for t in x])
    sex = np.array([[0.0], [1.0]] * 3, np.float32)
    months = session.run(["bone_age_months"], {"image": x, "sex": sex})[0].reshape(-1)
    a = big_session.run(["bone_age_months"], {"image": x, "sex": sex})[0].reshape(-1)
    b = small_session.run(["bone_age_months"], {"image": x_small.astype(np.float32), "sex": sex})[0].reshape(-1)
    # Both members feed the mean (one-epoch members on the same images can answer almost alike, so
    # the numbers alone could not tell a one-member wiring apart).
    mean = next(n for n in graph.graph.node if n.op_type == "Mean")
    assert list(mean.input) == ["m0/bone_age_months", "m1/bone_age_months"]
    assert np.abs(months - (a + b) / 2).max() < 0.1


def test_the_ensemble_carries_its_own_interval_gate_and_truthful_metadata(combined, larger_member, tmp_path):
    out, report = combined
    session, model = open_session(out)
    assert model.interval is not None and model.gate is not None
    assert FEATURES in {o.name for o in session.get_outputs()}
    assert model.gate.mean.size == 2 * 2048  # both members' pooled features, side by side
    meta = model.metadata
    members = meta["training_config"]["ensemble"]["members"]
    assert [m["input_size"] for m in members] == [80, 71]
    assert [m["model_version"] for m in members] == ["member-80", "calibrated-test"]
    held_out = meta["training_data"]["validation_count"]  # the members' own validation split
    assert meta["validation_metrics"]["n"] == meta["interval"]["validation_images"] == held_out > 100
    assert meta["validation_metrics"]["mae"] == pytest.approx(report["validation_mae"]["int8-weights"])
    assert meta["weights_storage"] == "int8-weights" and meta["quantization"]["validation_images"] == held_out
    assert str(tmp_path.parent) not in json.dumps(meta) and str(larger_member.parent) not in json.dumps(meta)


def test_the_service_serves_an_ensemble_with_its_interval(make_client, combined):
    out, _ = combined
    client = make_client(model_path=out, out_of_distribution="warn")
    files = {"image": ("hand.png", HALFRES_PNG.read_bytes())}
    response = client.post("/v1/bone-age", files=files, data={"sex": "female", "chronological_age_months": "40"})
    assert response.status_code == 200, response.text
    body = response.json()
    interval = body["bone_age_interval_months"]
    assert interval["lower"] <= body["bone_age_months"] <= interval["upper"]
    assert client.get("/v1/model").json()["version"] == "ens-test"


def test_int8_stored_weights_take_a_quarter_of_float32_and_are_folded_once_at_load(combined, larger_member):
    out, report = combined
    graph = onnx.load(str(out)).graph
    dequantised = {n.output[0][:3] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert {"m0/", "m1/"} <= dequantised  # both members' convolutions
    assert out.stat().st_size < report["storage"]["float32"]["size_mb"] * 1e6 * 0.3
    session, _ = open_session(out)
    # The shared loader tells ONNX Runtime to dequantise at load, not on every call.
    assert session.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"


def test_a_member_that_lives_on_only_inside_an_ensemble_joins_a_new_one(combined, calibrated_onnx, parity, tmp_path):
    """``FILE#K`` as a member: its int8-stored weights are dequantised as ONNX Runtime folds them and
    stored again to the same levels, so re-combining an ensemble's own members gives the same file."""
    from onnx import numpy_helper

    first, _ = combined
    with pytest.raises(ExportError, match=r"\(or holds\) one of the members"):
        ensemble.export_ensemble([f"{first}#0", calibrated_onnx], first, parity, "int8-weights")
    out = tmp_path / "again.onnx"
    report = ensemble.export_ensemble(
        [f"{first}#0", calibrated_onnx], out, parity, "int8-weights", model_version="again", gate_train_count=150
    )
    assert report["members"]["ensemble.onnx#0"]["model_version"] == "member-80"
    # Combined from plain float32 weights (the int8 ones dequantised), then stored as int8 again.
    assert not any(n.op_type == "DequantizeLinear" for n in ensemble.float32_graph(f"{first}#0").graph.node)
    assert report["storage"]["float32"]["size_mb"] > 3 * report["storage"]["int8-weights"]["size_mb"]

    def member0_int8(path: Path) -> dict[str, np.ndarray]:
        graph = onnx.load(str(path)).graph
        quantised = {
            n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0].startswith("m0/")
        }
        return {i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name in quantised}

    before, after = member0_int8(first), member0_int8(out)
    assert len(before) > 30 and before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    members = open_session(out)[1].metadata["training_config"]["ensemble"]["members"]
    assert members[0]["model_version"] == "member-80" and members[0]["from"] == {"file_version": "ens-test", "index": 0}
    (s1, m1), (s2, _) = open_session(first), open_session(out)
    x = np.stack([load_file(p, m1.spec) for p in parity[:6]])
    sex = np.array([[0.0], [1.0]] * 3, np.float32)
    a, b = (s.run(["bone_age_months"], {"image": x, "sex": sex})[0] for s in (s1, s2))
    assert np.abs(a - b).max() < 0.01


def test_a_member_of_a_float16_stored_ensemble_comes_out_with_float32_weights(combined, parity, tmp_path):
    """``FILE#K`` of an ensemble stored as float16: the Casts are folded into float32 weights, and the
    member answers as it does inside the int8-stored file, but for the storage's rounding."""
    from export.convert import PARITY_FP16_MONTHS, store_weights_fp16
    from export.modelfile import PREFIX

    first, _ = combined
    model = store_weights_fp16(ensemble.dequantized_weights(onnx.load(str(first))))
    for prop in model.metadata_props:
        if prop.key == PREFIX + "weights_storage":
            prop.value = json.dumps("float16")
    onnx.save(model, tmp_path / "halves.onnx")
    graph = ensemble.float32_graph(f"{tmp_path / 'halves.onnx'}#1")
    weights = {i.name for i in graph.graph.initializer}
    assert not any(
        n.op_type == "DequantizeLinear" or (n.op_type == "Cast" and n.input[0] in weights) for n in graph.graph.node
    )
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
    (int8_session, member), (half_session, _) = (ensemble.open_member(p, 1) for p in (first, tmp_path / "halves.onnx"))
    x = np.stack([load_file(p, member.spec) for p in parity[:4]])
    sex = np.array([[0.0], [1.0]] * 2, np.float32)
    a, b = (s.run(["bone_age_months"], {"image": x, "sex": sex})[0] for s in (int8_session, half_session))
    assert np.abs(a - b).max() < PARITY_FP16_MONTHS


def test_an_ensemble_whose_int8_weights_drift_too_far_is_not_written(
    larger_member, calibrated_onnx, parity, tmp_path, monkeypatch
):
    monkeypatch.setattr(ensemble, "INT8_MAX_MAE_DRIFT_MONTHS", -1000.0)  # any drift is too much
    with pytest.raises(ExportError, match="validation MAE exceeds"):
        ensemble.export_ensemble([larger_member, calibrated_onnx], tmp_path / "no.onnx", parity, "int8-weights")
    assert not (tmp_path / "no.onnx").exists()


def test_members_from_another_split_or_in_the_wrong_order_are_refused(larger_member, calibrated_onnx, parity, tmp_path):
    fast = Path(__file__).resolve().parents[1] / "models" / "boneage-fast.onnx"  # trained on the full split
    with pytest.raises(ExportError, match="different splits"):
        ensemble.export_ensemble([fast, larger_member], tmp_path / "a.onnx", parity)
    with pytest.raises(ExportError, match="largest input"):
        ensemble.export_ensemble([calibrated_onnx, larger_member], tmp_path / "b.onnx", parity)
    with pytest.raises(ExportError, match="at least two"):
        ensemble.export_ensemble([larger_member], tmp_path / "c.onnx", parity)
    with pytest.raises(ExportError, match="one of the members"):
        ensemble.export_ensemble([larger_member, calibrated_onnx], calibrated_onnx, parity)
    assert not any(tmp_path.iterdir())


def test_a_member_that_validated_on_other_images_is_refused(larger_member, calibrated_onnx, parity, tmp_path):
    """Every split seed gives the same counts; the recorded validation ids tell splits apart. (The
    fixtures themselves pass: the 80 px member, trained with --seed 7 --split-seed 42, validated on
    the calibrated model's images.)"""
    model = onnx.load(larger_member)
    for prop in model.metadata_props:
        if prop.key == "boneage.training_data":
            prop.value = json.dumps(json.loads(prop.value) | {"validation_fingerprint": "0" * 16})
    onnx.save(model, tmp_path / "other.onnx")
    with pytest.raises(ExportError, match="other images"):
        ensemble.export_ensemble([tmp_path / "other.onnx", calibrated_onnx], tmp_path / "a.onnx", parity)


def test_compare_sets_files_and_their_pairs_against_a_baseline_on_the_shared_split(
    larger_member, calibrated_onnx, combined, capsys
):
    """What to bundle is chosen by validation: each file alone, each pair averaged, and the gain over a
    baseline with a paired-bootstrap interval, all on the one split the files share."""
    from training import compare

    answers, age = compare.validation_answers([larger_member, calibrated_onnx])
    held_out = open_session(larger_member)[1].metadata["training_data"]["validation_count"]
    assert list(answers) == ["member-80", "calibrated-test"] and len(age) == held_out
    rows = {r.name: r for r in compare.compare(compare.candidates(answers), age, "member-80")}
    pair = rows["member-80 + calibrated-test"]
    mean = (answers["member-80"] + answers["calibrated-test"]) / 2
    assert pair.mae == pytest.approx(np.abs(mean - age).mean())
    base = rows["member-80"]
    assert (base.gain, base.low, base.high) == (0.0, 0.0, 0.0)
    for row in rows.values():
        assert row.gain == pytest.approx(base.mae - row.mae)
        assert row.low <= row.gain <= row.high

    assert compare.main([str(larger_member), str(calibrated_onnx), "--baseline", "1+2"]) == 0
    printed = capsys.readouterr().out
    assert "| member-80 + calibrated-test (baseline) |" in printed and f"{held_out} radiographs" in printed
    assert compare.main([str(larger_member), str(calibrated_onnx), "--baseline", "3"]) == 2
    assert "numbered 1 to 2" in capsys.readouterr().err
    fast = Path(__file__).resolve().parents[1] / "models" / "boneage-fast.onnx"
    assert compare.main([str(fast), str(larger_member)]) == 2
    assert "different splits" in capsys.readouterr().err

    # FILE#K: an ensemble's member alone, its int8-stored weights as the file computes with them.
    member, _ = compare.validation_answers([Path(f"{combined[0]}#1"), calibrated_onnx])
    assert list(member) == ["calibrated-test", "calibrated-test (2)"]
    rounding = np.abs(member["calibrated-test"] - member["calibrated-test (2)"])
    assert 0 < rounding.max() < ensemble.PARITY_INT8_WEIGHTS_MONTHS
    assert compare.main([f"{combined[0]}#2"]) == 2 and "member 2: the file has 2" in capsys.readouterr().err


def test_compare_pairs_each_image_with_itself_and_reads_the_baseline_as_listed():
    """A candidate 2 months closer on every image gains exactly 2 (a paired bootstrap has no spread
    then; an unpaired one would); "3+2" is "2+3"; a file cannot be its own pair."""
    from training import compare

    errors = np.random.default_rng(0).uniform(3, 30, 500) * np.random.default_rng(1).choice([-1, 1], 500)
    gain, low, high = compare.paired_gain(errors, errors - 2 * np.sign(errors))
    assert gain == pytest.approx(2) and low == pytest.approx(2) and high == pytest.approx(2)
    names = ["a", "b", "c"]
    assert compare.baseline_name("3+2", names) == compare.baseline_name("2+3", names) == "b + c"
    for wrong in ("2+2", "4", "1+2+3", "b"):
        with pytest.raises(ValueError, match="--baseline"):
            compare.baseline_name(wrong, names)
