"""Training writes a usable run; export turns it into a self-describing, parity-checked ONNX file."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.__main__ import main as export_cli
from export.modelfile import SPEC_KEY, ModelFileError, open_session
from radiograph import PreprocessSpec
from radiograph.preprocess import load_file
from tests.conftest import HALFRES_PNG, SMALL_DICOM, THUMBNAILS, THUMBNAILS_CSV
from training import train


@pytest.fixture(autouse=True)
def release_keras_state():
    """Each test here trains or converts a Keras model; TensorFlow keeps their traced graphs in the
    process, and a serial run of the whole suite was once killed for memory (24 GB) in this module."""
    yield
    import gc

    import keras

    keras.backend.clear_session()
    gc.collect()


def test_one_epoch_at_71px_writes_checkpoints_history_plot_config_and_spec(tiny_run):
    for name in (
        "best.keras",
        "last.keras",
        "history.csv",
        "loss.png",
        "config.json",
        "preprocessing.json",
        "data.json",
        "metrics.json",
        "validation/scatter.png",
        "validation/bland_altman.png",
    ):
        assert (tiny_run / name).is_file(), name
    assert PreprocessSpec.load(tiny_run / "preprocessing.json").input_size == 71
    history = list(csv.DictReader((tiny_run / "history.csv").open()))
    assert len(history) == 1 and {"loss", "mae", "val_loss", "val_mae"} <= set(history[0])
    assert (tiny_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    counts = json.loads((tiny_run / "data.json").read_text())
    assert counts["train_count"] + counts["validation_count"] == 40 and counts["validation_count"] >= 4
    # data.json goes into the model file's metadata: the label file without local directories.
    assert counts["labels"] == "rsna-100px/boneage-training-dataset.csv"


def test_resume_continues_from_the_last_checkpoint_on_the_runs_own_loss(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(tiny_run, run)
    assert (
        train.main(
            [
                "--run-dir",
                str(run),
                "--resume",
                "--epochs",
                "2",
                "--workers",
                "1",
                "--cache-dir",
                str(tmp_path / "cache"),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert json.loads((run / "config.json").read_text())["epochs"] == 2  # what the run was asked for last
    # best.keras is replaced only if the resumed epoch beat the best before the stop.
    improved = float(rows[1]["val_loss"]) < float(rows[0]["val_loss"])
    assert ((run / "best.keras").read_bytes() != (tiny_run / "best.keras").read_bytes()) == improved
    # Keras saves Huber without its delta; the resume must train on the run's own loss, not delta 1.
    # Huber with delta d on errors of many months is ≈ d·(|e| − d/2): loss/MAE stays on one scale
    # across the resume (with delta 1 it would collapse to ≈ 1).
    assert json.loads((run / "config.json").read_text())["loss"] == "huber"
    ratios = [float(r["val_loss"]) / float(r["val_mae"]) for r in rows]
    assert ratios[1] == pytest.approx(ratios[0], rel=0.5), ratios


def test_a_used_run_folder_is_not_overwritten(tiny_run):
    with pytest.raises(SystemExit, match="not empty"):
        train.main(["--csv", str(THUMBNAILS_CSV), "--run-dir", str(tiny_run)])


def test_export_round_trips_with_parity_and_metadata(tiny_run, tiny_onnx):
    path, report = tiny_onnx
    assert report["storage"]["float32"]["max_abs_diff_months"] <= 0.05
    assert report["storage"]["float16"]["max_abs_diff_months"] <= 0.5
    assert report["storage"]["float16"]["size_mb"] < 0.55 * report["storage"]["float32"]["size_mb"]
    session, model = open_session(path)
    assert [i.name for i in session.get_inputs()] == ["image", "sex"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch dimension
    assert model.spec == PreprocessSpec.load(tiny_run / "preprocessing.json")
    assert model.metadata["training_data"] == json.loads((tiny_run / "data.json").read_text())
    assert model.metadata["validation_metrics"] == json.loads((tiny_run / "metrics.json").read_text())
    assert model.metadata["model_version"] == "test-1"
    assert set(model.metadata["versions"]) >= {"keras", "tensorflow", "tf2onnx"}
    batch = np.zeros((5, 71, 71, 3), np.float32)
    assert session.run(None, {"image": batch, "sex": np.ones((5, 1), np.float32)})[0].shape == (5, 1)


def test_float16_storage_runs_a_float32_graph_on_the_cpu(tiny_onnx, tmp_path):
    path, _ = tiny_onnx
    stored = onnx.load(path)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in stored.graph.initializer)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx")
    assert not any(n.op_type == "Cast" for n in optimized.graph.node)  # folded at load time
    assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in optimized.graph.initializer)


def test_a_truncated_model_file_is_refused(tiny_onnx, tmp_path):
    data = tiny_onnx[0].read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match=r"broken\.onnx: not a readable ONNX model"):
        open_session(broken)


def test_an_onnx_file_without_our_metadata_is_refused(tiny_onnx, tmp_path):
    foreign = onnx.load(tiny_onnx[0])
    del foreign.metadata_props[:]
    path = tmp_path / "foreign.onnx"
    onnx.save(foreign, path)
    with pytest.raises(ModelFileError, match=rf"foreign\.onnx: ONNX model has no '{SPEC_KEY}' metadata"):
        open_session(path)
    onnx.helper.set_model_props(foreign, {SPEC_KEY: '{"input_size": 3}'})
    onnx.save(foreign, path)
    with pytest.raises(ModelFileError, match="spec is invalid"):
        open_session(path)


def test_verify_prints_metadata_and_checks_the_output(tiny_onnx, tmp_path, capsys):
    assert export_cli(["verify", str(tiny_onnx[0]), "--image", str(SMALL_DICOM)]) == 0
    out = capsys.readouterr().out
    assert '"model_version": "test-1"' in out and "(female): bone age" in out
    assert export_cli(["verify", str(tiny_onnx[0]), "--image", str(HALFRES_PNG), "--sex", "male"]) == 0
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    assert export_cli(["verify", str(tmp_path / "junk.onnx")]) == 2
    assert "invalid model file" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("hello")
    assert export_cli(["verify", str(tiny_onnx[0]), "--image", str(tmp_path / "text.png")]) == 2


def test_evaluate_cli_reports_on_a_labelled_set(tiny_run, tmp_path, capsys):
    from training.evaluate import main as evaluate

    out = tmp_path / "eval"
    assert evaluate(["--model", str(tiny_run / "best.keras"), "--csv", str(THUMBNAILS_CSV), "--out", str(out)]) == 0
    assert "n=40  MAE=" in capsys.readouterr().out
    for name in ("metrics.json", "predictions.csv", "scatter.png", "bland_altman.png"):
        assert (out / name).is_file()


def test_xception_weights_load_from_a_local_file(tmp_path):
    """--weights PATH: how ImageNet weights are used where they cannot be downloaded at run time."""
    import keras

    from training.model import build_model

    source = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3), pooling="avg")
    path = tmp_path / "xception_notop.weights.h5"
    source.save_weights(path)
    model = build_model(71, weights=str(path))
    conv = model.get_layer("block1_conv1")
    np.testing.assert_array_equal(conv.get_weights()[0], source.get_layer("block1_conv1").get_weights()[0])


def test_large_caches_are_streamed_from_disk_with_the_same_tensors(monkeypatch, tmp_path):
    from training import data

    spec = PreprocessSpec(input_size=71)
    samples = data.read_labels(THUMBNAILS_CSV)[:10]
    images = data.load_images(data.image_paths(samples, THUMBNAILS_CSV.with_suffix("")), spec, tmp_path)
    assert isinstance(images, np.memmap)
    sex, age = data.arrays(samples)
    whole = next(iter(data.make_dataset(images, sex, age, 10, training=False)))
    monkeypatch.setattr(data, "IN_MEMORY_BYTES", 0)
    streamed = next(iter(data.make_dataset(images, sex, age, 10, training=False)))
    np.testing.assert_array_equal(whole[0]["image"].numpy(), streamed[0]["image"].numpy())
    np.testing.assert_array_equal(whole[1].numpy(), streamed[1].numpy())


def test_under_mixed_precision_the_head_and_its_months_stay_float32():
    """bfloat16 has 8 significant bits: a bfloat16 Rescaling would put every answer above 128 months on whole months."""
    import keras

    from training.model import build_model

    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = build_model(71)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"
    for name in ("sex_dense", "features", "head_dense", "age_normalised", "bone_age_months"):
        assert model.get_layer(name).compute_dtype == "float32", name
    months = model.predict({"image": np.zeros((1, 71, 71, 3)), "sex": np.ones((1, 1))}, verbose=0)
    assert months.dtype == np.float32


def test_export_converts_the_saved_model_not_one_rebuilt_from_code(tiny_run, tmp_path):
    """A saved model that differs from training/model.py's must be what the file computes."""
    import shutil

    import keras

    from export.convert import export_run

    run = tmp_path / "edited"
    shutil.copytree(tiny_run, run)
    saved = keras.models.load_model(run / "best.keras")
    shifted = keras.layers.Rescaling(1.0, offset=12.0, name="shift")(saved.output)
    keras.Model(saved.inputs, shifted).save(run / "best.keras")

    images = sorted(THUMBNAILS.glob("*.png"))[:16]
    export_run(run, tmp_path / "edited.onnx", images, "float32", timing_repeats=1, calibration=False)
    session, model = open_session(tmp_path / "edited.onnx")
    tensor = np.stack([load_file(p, model.spec) for p in images[:4]])
    sex = np.ones((4, 1), np.float32)
    expected = keras.models.load_model(run / "best.keras").predict({"image": tensor, "sex": sex}, verbose=0)
    got = session.run(["bone_age_months"], {"image": tensor, "sex": sex})[0]
    np.testing.assert_allclose(got, expected, atol=0.05)


def test_progressive_resizing_with_the_new_recipe_and_the_file_tells_the_truth(tiny_run, tmp_path):
    """--init from a smaller run, Huber + AdamW + cosine; a resume cannot stretch a finished cosine schedule."""
    from export.convert import export_run

    run = tmp_path / "stage2"
    common = ["--workers", "1", "--cache-dir", str(tmp_path / "cache")]
    recipe = ["--loss", "huber", "--optimizer", "adamw", "--schedule", "cosine", "--warmup-epochs", "0.5"]
    first = ["--csv", str(THUMBNAILS_CSV), "--run-dir", str(run), "--input-size", "80", "--batch-size", "8"]
    weights = tmp_path / "xception_notop.weights.h5"  # a local file's path must not reach the model file
    init = ["--init", str(tiny_run / "best.keras"), "--val-fraction", "0.2", "--epochs", "2"]
    assert train.main([*first, *init, *recipe, *common, "--weights", str(weights)]) == 0
    with pytest.raises(SystemExit, match="cosine schedule was planned for 2 epochs"):
        train.main(["--run-dir", str(run), "--resume", "--epochs", "3", *common])

    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 2 and config["loss"] == "huber" and config["schedule"] == "cosine"
    assert len(list(csv.DictReader((run / "history.csv").open()))) == 2
    out = tmp_path / "stage2.onnx"
    images = sorted(THUMBNAILS.glob("*.png"))[:16]
    report = export_run(run, out, images, "float16", timing_repeats=1, calibration=False)
    summary = report["metadata"]["training_config"]
    assert summary["epochs_trained"] == 2 and summary["input_size"] == 80 and summary["optimizer"] == "adamw"
    assert summary["weights"] == "file:xception_notop.weights.h5"
    assert summary["init_from"]["run"] == "tiny" and summary["init_from"]["epochs_trained"] == 1
    assert str(tmp_path) not in json.dumps(report["metadata"])  # no path of the training machine


def test_a_mixed_precision_run_exports_to_a_float32_file(tmp_path):
    """bfloat16 convolutions are not ONNX Runtime CPU kernels: the file computes the saved model in float32."""
    from export.convert import export_run

    run = tmp_path / "mixed"
    args = ["--csv", str(THUMBNAILS_CSV), "--run-dir", str(run), "--input-size", "71", "--epochs", "1"]
    args += ["--batch-size", "8", "--val-fraction", "0.2", "--workers", "1", "--mixed-precision"]
    args += ["--cache-dir", str(tmp_path / "cache")]
    try:
        assert train.main(args) == 0
    finally:
        import keras

        keras.mixed_precision.set_global_policy("float32")
    images = sorted(THUMBNAILS.glob("*.png"))[:16]
    report = export_run(run, tmp_path / "mixed.onnx", images, "float16", timing_repeats=1, calibration=False)
    assert report["storage"]["float32"]["max_abs_diff_months"] <= 0.05
    assert 0 <= report["mixed_precision_drift_months"] < 2.0
    assert report["metadata"]["training_config"]["mixed_precision"] is True


def test_int8_export_quantises_the_convolutions_checks_its_validation_drift_and_serves(tiny_run, tmp_path, monkeypatch):
    from export import convert
    from export.modelfile import open_session

    images = sorted(THUMBNAILS.glob("*.png"))[:16]
    out = tmp_path / "int8.onnx"
    # A one-epoch model on 8 validation thumbnails: its drift is noise, so the bound is loosened here
    # and the refusal is checked with an impossible one below.
    monkeypatch.setattr(convert, "INT8_MAX_MAE_DRIFT_MONTHS", 50.0)
    report = convert.export_run(tiny_run, out, images, "int8", timing_repeats=1, calibration=False)
    session, modelfile = open_session(out)
    ops = {n.op_type for n in __import__("onnx").load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert modelfile.metadata["weights_storage"] == "int8"
    assert modelfile.metadata["quantization"]["validation_images"] == report["int8"]["validation_images"] > 0
    assert out.stat().st_size < report["storage"]["float32"]["size_mb"] * 1e6 / 2  # int8 weights
    tensor = np.stack([load_file(p, modelfile.spec) for p in images[:4]])
    months = session.run(["bone_age_months"], {"image": tensor, "sex": np.ones((4, 1), np.float32)})[0]
    assert np.isfinite(months).all()

    monkeypatch.setattr(convert, "INT8_MAX_MAE_DRIFT_MONTHS", -1.0)
    with pytest.raises(convert.ExportError, match="int8 validation MAE"):
        convert.export_run(tiny_run, tmp_path / "refused.onnx", images, "int8", timing_repeats=1, calibration=False)
    assert not (tmp_path / "refused.onnx").exists()
