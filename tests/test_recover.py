"""A shipped model file can be trained on again: `python -m training.recover` rebuilds its Keras model."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from export.modelfile import INPUT_IMAGE, INPUT_SEX, OUTPUT, open_session
from radiograph.preprocess import load_file
from tests.conftest import HALFRES_PNG, THUMBNAILS, THUMBNAILS_CSV
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
    """Mean |training-mode − inference| answer on a shuffled batch (dropout off: only BatchNormalization differs)."""
    pick = np.sort(np.random.default_rng(1).permutation(len(sex))[:32])
    dropout = model.get_layer("head_dropout")
    rate, dropout.rate = dropout.rate, 0.0
    try:
        trained = recover.training_mode_answers(model, images[pick], sex[pick])
    finally:
        dropout.rate = rate
    inference = model({"image": np.asarray(images[pick]), "sex": sex[pick]}, training=False)
    return float(np.abs(trained - keras.ops.convert_to_numpy(inference).ravel()).mean())


def test_the_fast_model_file_comes_back_as_a_keras_model_that_answers_as_the_file_does(data_dir, tmp_path):
    csv_path = data_dir / "rsna-299px" / "boneage-training-dataset.csv"
    report = recover.recover(FAST, tmp_path / "rec", csv_path, count=64, cache_dir=tmp_path / "cache")
    assert report["model_version"] == "xception128-v2" and report["calibration_images"] == 64
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
    images, sex = recover.training_images(metadata, csv_path, 128, tmp_path / "cache")
    before = _training_mode_gap(model, images, sex)
    inference = keras.ops.convert_to_numpy(model({"image": np.asarray(images[:8]), "sex": sex[:8]})).ravel()
    recover.recalibrate_batchnorm(model, images, sex)
    after = _training_mode_gap(model, images, sex)
    moved = keras.ops.convert_to_numpy(model({"image": np.asarray(images[:8]), "sex": sex[:8]})).ravel()
    assert before > 20, before  # months: training would start from a broken model
    assert after < min(12, before / 3), (before, after)  # what is left: the noise of 32 radiographs' statistics
    np.testing.assert_allclose(moved, inference, atol=recover.PARITY_MONTHS)


def test_an_ensemble_file_is_refused_with_what_to_do_instead():
    with pytest.raises(recover.RecoverError, match="member"):
        recover.rebuild(ENSEMBLE)


def test_training_goes_on_from_a_recovered_file_and_the_new_file_says_where_it_came_from(tiny_onnx, tmp_path):
    from export.convert import export_run

    source, _ = tiny_onnx
    rec = tmp_path / "from-tiny"
    recover.recover(source, rec, THUMBNAILS_CSV, count=16, cache_dir=tmp_path / "cache")
    run = tmp_path / "run"
    args = ["--csv", str(THUMBNAILS_CSV), "--run-dir", str(run), "--input-size", "71", "--epochs", "1"]
    args += ["--batch-size", "8", "--val-fraction", "0.2", "--workers", "1", "--steps-per-epoch", "2"]
    args += ["--init", str(rec / "best.keras"), "--cache-dir", str(tmp_path / "cache")]
    assert train.main(args) == 0
    report = export_run(
        run,
        tmp_path / "next.onnx",
        sorted(THUMBNAILS.glob("*.png"))[:16],
        "float16",
        timing_repeats=1,
        calibration=False,
    )
    init = report["metadata"]["training_config"]["init_from"]
    assert init["recovered_from"] == "test-1" and init["run"] == "from-tiny" and init["epochs_trained"] == 1
    assert str(tmp_path) not in json.dumps(report["metadata"])
