"""Shared test fixtures: real radiographs from tests/fixtures, and the full data set when present.

Tests marked ``data`` need ``$BONEAGE_DATA_DIR`` (default ``../shared/data``). They skip with
the reason when it is absent, except when ``BONEAGE_REQUIRE_DATA=1`` (set by ``.ci/run``),
where a missing data set fails the run instead of hiding tests. System tools (dcmtk, Chromium)
work the same way with ``BONEAGE_REQUIRE_TOOLS=1``.
"""

from __future__ import annotations

import fcntl
import gc
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from training.data import data_root

FIXTURES = Path(__file__).parent / "fixtures"
THUMBNAILS_CSV = FIXTURES / "rsna-100px" / "boneage-training-dataset.csv"
THUMBNAILS = FIXTURES / "rsna-100px" / "boneage-training-dataset"
HALFRES_PNG = FIXTURES / "images" / "rsna-halfres-3225.png"  # girl, bone age 36 months
HOSPITAL_JPEG = FIXTURES / "images" / "hospital-f3.9.jpg"
SMALL_DICOM = FIXTURES / "images" / "hand-dx-ge-14bit-quarter.dcm"  # female, PatientAge 007Y


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not (root / "rsna-halfres" / "labels.csv").is_file():
        if os.environ.get("BONEAGE_REQUIRE_DATA") == "1":
            pytest.fail(f"BONEAGE_REQUIRE_DATA=1 but the radiographs are not at {root}")
        pytest.skip(f"real data set not found at {root} (set BONEAGE_DATA_DIR to run these tests)")
    return root


def require_tool(name: str, package: str) -> str:
    """Path of a system tool (Debian package ``package``); skip with the reason when it is absent.

    ``.ci/run`` installs the tools and sets ``BONEAGE_REQUIRE_TOOLS=1``: there a missing tool fails.
    """
    found = shutil.which(name)
    if found is None:
        if os.environ.get("BONEAGE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"BONEAGE_REQUIRE_TOOLS=1 but {name} is not installed (apt-get install {package})")
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return found


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.data)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist, a test marked ``alone`` has the machine to itself.

    Every test holds a shared lock on one file for its whole run (fixture set-up included, so a
    trained fixture being built counts); an ``alone`` test takes it exclusively, so it starts once the
    other worker's current test is done, and that worker starts nothing until it has finished. Tests
    that measure throughput against a capacity they measured a moment before need this: a neighbour
    starting to train halfway through would halve the service's share of two cores.
    """
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # one process: nothing runs beside any test
        return (yield)
    with (Path(tempfile.gettempdir()) / f"boneage-tests-{run}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real one-epoch training run at 71 px on the 40 fixture thumbnails (shared by tests).

    Huber loss, as the bundled models were trained, and because Keras saves Huber without its delta:
    the resume test checks that the run's own loss comes back.
    """
    from training import train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    code = train.main(
        [
            "--csv",
            str(THUMBNAILS_CSV),
            "--run-dir",
            str(run),
            "--input-size",
            "71",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--val-fraction",
            "0.2",
            "--cache-dir",
            str(run.parent / "cache"),
            "--workers",
            "1",
            "--loss",
            "huber",
        ]
    )
    assert code == 0
    return run


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny run exported to ONNX (float16 storage) with its export report."""
    from export.convert import export_run

    out = tmp_path_factory.mktemp("models") / "tiny.onnx"
    report = export_run(
        tiny_run,
        out,
        sorted(THUMBNAILS.glob("*.png"))[:16],
        storage="float16",
        model_version="test-1",
        timing_repeats=1,
        calibration=False,  # 8 validation images are too few; tests/test_calibration.py calibrates for real.
    )
    return out, report


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name``, filled by ``build(folder)`` once per test run, whichever worker asks first.

    pytest-xdist gives each worker its own session, so a session fixture used by files that run on
    both workers would otherwise be built twice; this one is built by the first to ask while the
    other waits, in the run's shared temporary folder (the pattern pytest-xdist documents).
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this run's workers
    folder = root / name
    with (root / f"{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (folder / ".built").is_file():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(exist_ok=True)
                build(folder)
                (folder / ".built").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


@pytest.fixture(scope="session")
def calibrated_onnx(data_dir, tmp_path_factory) -> Path:
    """A real model file with its interval and gate, fitted by export on real radiographs.

    One epoch at 71 px on 400 radiographs of the 299 px set (120 held out): far from a good
    model, but the calibration is computed exactly as for the bundled one. test_ensemble and
    test_trust both use it: it is built once per run.
    """

    def build(folder: Path) -> None:
        from export.convert import export_run
        from training import train

        run = folder / "calibrated"
        labels = data_dir / "rsna-299px" / "boneage-training-dataset.csv"
        common = ["--input-size", "71", "--epochs", "1", "--batch-size", "16", "--workers", "2"]
        split = ["--limit", "400", "--val-fraction", "0.3", "--cache-dir", str(folder / "cache")]
        assert train.main(["--csv", str(labels), "--run-dir", str(run), *common, *split]) == 0
        parity = sorted((data_dir / "rsna-halfres" / "images").glob("*.png"))[:16]
        out = folder / "calibrated.onnx"
        export_run(run, out, parity, model_version="calibrated-test", timing_repeats=1, gate_train_count=250)

    return built_once(tmp_path_factory, "calibrated-model", build) / "calibrated.onnx"


BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "boneage.onnx"


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    assert BUNDLED_MODEL.is_file(), f"the bundled model is missing at {BUNDLED_MODEL}"
    return BUNDLED_MODEL


@pytest.fixture
def make_client(bundled_model):
    """Build the app with settings overrides and enter its lifespan (model loaded and warmed up)."""
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app

    clients = []

    def make(**overrides) -> TestClient:
        settings = Settings(**{"model_path": bundled_model, "max_batch_size": 4, **overrides})
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    clients.clear()
    gc.collect()  # each app holds an ONNX Runtime session: free it before the next test builds one


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def anyio_backend() -> str:
    """The service runs on asyncio (uvicorn's loop); with trio installed (Selenium brings it), anyio
    would otherwise run the async tests on both."""
    return "asyncio"
