"""A shipped model file can be trained on again: `python -m training.recover` rebuilds its Keras model."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from export.modelfile import INPUT_IMAGE, INPUT_SEX, OUTPUT, open_session
from radiograph.preprocess import load_file, resize
from tests.conftest import HALFRES_PNG, THUMBNAILS_CSV
from training import recover, train

FAST = Path(__file__).parents[1] / "models" / "boneage-fast.onnx"
ENSEMBLE = Path(__file__).parents[1] / "models" / "boneage.onnx"


@pytest.fixture(autouse=True)
def release_keras_state():
    """Each test builds a full Xception: free TensorFlow's graphs before the next (see test_train_export)."""
    yield
    import gc

    keras.backend.clear_session()
    gc.collect()


def _training_mode_gap(model, images, sex) -> float:
    """Mean |training-mode − inference| answer over the images as one batch (dropout off)."""
    trained = recover.training_mode_answers(model, images, sex)
    inference = model({"image": np.asarray(images), "sex": sex}, training=False)
    return float(np.abs(trained - keras.ops.convert_to_numpy(inference).ravel()).mean())


def test_the_fast_model_file_comes_back_as_a_keras_model_that_answers_as_the_file_does(data_dir, tmp_path):
    csv_path = data_dir / "rsna-299px" / "boneage-training-dataset.csv"
    report = recover.recover(FAST, tmp_path / "rec", csv_path, count=64, cache_dir=tmp_path / "cache")
    assert report["model_version"] == "xception128-v6" and report["calibration_images"] == 64
    assert report["max_abs_diff_months"] < recover.PARITY_MONTHS
    assert json.loads((tmp_path / "rec" / "recovered.json").read_text())["training_config"]["input_size"] == 128

    # A radiograph it was not calibrated on, at another resolution, through the shared preprocessing.
    model = keras.models.load_model(tmp_path / "rec" / "best.keras", compile=False)
    session, info = open_session(FAST, providers=["CPUExecutionProvider"])
    image = load_file(HALFRES_PNG, info.spec)[None]
    sex = np.array([[1.0]], np.float32)
    expected = session.run([OUTPUT], {INPUT_IMAGE: image, INPUT_SEX: sex})[0].item()
    answer = float(keras.ops.convert_to_numpy(model({"image": image, "sex": sex}, training=False)).item())
    assert abs(answer - expected) < recover.PARITY_MONTHS


def test_batch_statistics_are_recalibrated_so_training_starts_where_the_file_is(data_dir, tmp_path):
    """Folded BatchNormalization set to 'add the bias' is exact in inference but wrong in training mode,
    where each layer normalises by its batch: recalibration closes that gap without moving inference."""
    model, metadata = recover.rebuild(FAST)
    csv_path = data_dir / "rsna-299px" / "boneage-training-dataset.csv"
    images, sex = recover.training_images(metadata, csv_path, count=128, cache_dir=tmp_path / "cache")
    order = np.random.default_rng(1).permutation(len(sex))
    calibration, held_out = np.sort(order[:96]), np.sort(order[96:])  # measured on images it was not fitted on
    before = _training_mode_gap(model, images[held_out], sex[held_out])
    inference = keras.ops.convert_to_numpy(model({"image": np.asarray(images[:8]), "sex": sex[:8]})).ravel()
    recover.recalibrate_batchnorm(model, images[calibration], sex[calibration])
    weights = model.get_weights()
    after = _training_mode_gap(model, images[held_out], sex[held_out])
    assert all(
        np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True)
    )  # checking moves nothing
    moved = keras.ops.convert_to_numpy(model({"image": np.asarray(images[:8]), "sex": sex[:8]})).ravel()
    assert before > 20, before  # months: training would start from a broken model
    assert after < min(8, before / 5), (before, after)  # what is left: 32 radiographs' own statistics
    np.testing.assert_allclose(moved, inference, atol=recover.PARITY_MONTHS)

    recover.recalibrate_batchnorm(model, images[calibration], sex[calibration])  # again: nothing changes
    again = keras.ops.convert_to_numpy(model({"image": np.asarray(images[:8]), "sex": sex[:8]})).ravel()
    np.testing.assert_allclose(again, inference, atol=recover.PARITY_MONTHS)


def test_a_split_that_differs_from_the_recorded_one_is_refused(data_dir):
    """Statistics measured on validation images would leak them into the next run's start."""
    _, metadata = recover.rebuild(FAST)
    metadata["training_data"] = metadata["training_data"] | {"validation_fingerprint": "0" * 16}
    with pytest.raises(recover.RecoverError, match="split"):
        recover.training_images(metadata, data_dir / "rsna-299px" / "boneage-training-dataset.csv", 8, None)


def test_an_ensemble_file_is_refused_with_what_to_do_instead():
    with pytest.raises(recover.RecoverError, match="member"):
        recover.rebuild(ENSEMBLE)


def test_training_goes_on_from_a_recovered_file_and_says_where_it_came_from(tiny_onnx, tmp_path):
    """What `export convert` writes into the next file's training_config (training_summary; that export
    carries it is test_train_export's progressive-resizing test, so no second conversion here)."""
    from export.convert import training_summary

    source, _ = tiny_onnx
    rec = tmp_path / "from-tiny"
    recover.recover(source, rec, THUMBNAILS_CSV, count=16, cache_dir=tmp_path / "cache")
    run = tmp_path / "run"
    args = ["--csv", str(THUMBNAILS_CSV), "--run-dir", str(run), "--input-size", "71", "--epochs", "1"]
    args += ["--batch-size", "8", "--val-fraction", "0.2", "--workers", "1", "--steps-per-epoch", "2"]
    args += ["--init", str(rec / "best.keras"), "--cache-dir", str(tmp_path / "cache")]
    assert train.main(args) == 0
    summary = training_summary(run)
    assert summary["epochs_trained"] == 1
    init = summary["init_from"]
    assert init["recovered_from"]["model_version"] == "test-1" and init["recovered_from"]["folder"] == "from-tiny"
    assert init["recovered_from"]["batchnorm_statistics_from"] == "16 training radiographs"
    assert init["run"] == "tiny" and init["input_size"] == 71  # the run that made the file, and its recipe
    assert str(tmp_path) not in json.dumps(summary)


def test_an_ensemble_member_whose_own_file_is_gone_comes_back_from_the_ensemble(data_dir, tmp_path):
    """The bundled file's 224 px member lives on only inside it, with int8-stored weights: cut out and
    rebuilt, it answers as its part of the file does, so training can go on from the best model there is."""
    from export.ensemble import graph_session

    csv_path = data_dir / "rsna-299px" / "boneage-training-dataset.csv"
    report = recover.recover(ENSEMBLE, tmp_path / "rec", csv_path, count=32, cache_dir=tmp_path / "cache", member=0)
    assert report["model_version"] == "xception224-v3" and report["weights_storage"] == "int8-weights"
    # v1.4 took this member from v1.3, which took it from v1.2 (``export ensemble FILE#K``): every
    # step is on record.
    v12 = {"file_version": "xception-ensemble-v1.2", "index": 0}
    v13 = {"file_version": "xception-ensemble-v1.3", "index": 0, "from": v12}
    assert report["ensemble_member"] == {"file_version": "xception-ensemble-v1.4", "index": 0, "from": v13}
    assert report["max_abs_diff_months"] < recover.PARITY_MONTHS

    # The rebuilt member and the other member, averaged, give the ensemble's answer.
    larger = keras.models.load_model(tmp_path / "rec" / "best.keras", compile=False)
    _, small = recover.rebuild(ENSEMBLE, member=1)
    assert small["model_version"] == "xception128-v5" and small["preprocessing"].input_size == 128
    # What the rebuilt model is checked against is the file's own arithmetic, not this code's dequantising.
    assert any(node.op_type == "DequantizeLinear" for node in small["reference"].graph.node)
    small_session = graph_session(small["reference"], small["weights_storage"] == "int8-weights")
    session, info = open_session(ENSEMBLE, providers=["CPUExecutionProvider"])
    image = load_file(HALFRES_PNG, info.spec)[None]
    shrunk = np.stack([resize(image[0, :, :, c], 128) for c in range(3)], axis=-1)[None]
    sex = np.array([[0.0]], np.float32)
    expected = session.run([OUTPUT], {INPUT_IMAGE: image, INPUT_SEX: sex})[0].item()
    first = float(keras.ops.convert_to_numpy(larger({"image": image, "sex": sex}, training=False)).item())
    second = small_session.run([OUTPUT], {INPUT_IMAGE: shrunk, INPUT_SEX: sex})[0].item()
    assert abs((first + second) / 2 - expected) < recover.PARITY_MONTHS

    with pytest.raises(recover.RecoverError, match="member 2: the file has 2"):
        recover.rebuild(ENSEMBLE, member=2)
    with pytest.raises(recover.RecoverError, match="not an ensemble"):
        recover.rebuild(FAST, member=0)
    with pytest.raises(recover.RecoverError, match="not found"):
        recover.rebuild(tmp_path / "missing.onnx", member=0)
