"""Scoring a whole archive: every image gets a row, a stopped run resumes, a distributed engine runs it."""

from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.score import COLUMNS, find_records, score_records
from tests.conftest import HALFRES_PNG, HOSPITAL_JPEG, SMALL_DICOM, THUMBNAILS
from tests.test_api import post


def run_score(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.score", *map(str, args), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def scoring_processes(source) -> list[int]:
    """PIDs of processes still running ``app.score`` on ``source`` (read from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"app.score" in args and str(source).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


def read_rows(path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def archive(tmp_path):
    """A folder tree as PACS exports look: nested folders, a suffix-less DICOM, a broken file, a note."""
    root = tmp_path / "archive"
    (root / "2019" / "ward-a").mkdir(parents=True)
    shutil.copy(HALFRES_PNG, root / "2019" / HALFRES_PNG.name)
    shutil.copy(HOSPITAL_JPEG, root / "2019" / "ward-a" / HOSPITAL_JPEG.name)
    shutil.copy(SMALL_DICOM, root / "2019" / "ward-a" / "IM000001")  # no suffix, as PACS export them
    (root / "2019" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "README.txt").write_text("not an image, not taken")
    return root


def test_a_folder_tree_gets_one_row_per_image_with_errors_and_reasons(archive, tmp_path):
    out = tmp_path / "results.csv"
    done = run_score(archive, "--out", out)
    assert done.returncode == 0, done.stderr
    rows = {r["path"].removeprefix(str(archive) + "/"): r for r in read_rows(out)}
    assert set(rows) == {"2019/rsna-halfres-3225.png", "2019/ward-a/hospital-f3.9.jpg", "2019/ward-a/IM000001",
                         "2019/broken.png"}  # fmt: skip
    dicom = rows["2019/ward-a/IM000001"]
    assert (dicom["status"], dicom["sex"], dicom["sex_source"], dicom["chronological_age_source"]) == (
        "ok",
        "female",
        "dicom",
        "dicom",
    )
    assert dicom["classification"] in ("delayed", "normal", "advanced", "indeterminate")
    assert rows["2019/broken.png"]["status"] == "error" and rows["2019/broken.png"]["error"]
    # A PNG carries no sex: without --sex it is an error row that says so, not a guess and not a gap.
    assert rows["2019/rsna-halfres-3225.png"]["status"] == "error"
    assert "sex unknown" in rows["2019/rsna-halfres-3225.png"]["error"]


def test_the_same_image_scores_the_same_as_through_the_service(client, tmp_path):
    listing = tmp_path / "cohort.csv"
    listing.write_text(f"path,sex,chronological_age_months\n{HALFRES_PNG},female,40\n")
    out = tmp_path / "results.csv"
    assert run_score(listing, "--out", out).returncode == 0
    [row] = read_rows(out)
    api = post(client, HALFRES_PNG, sex="female", age=40).json()
    assert float(row["bone_age_months"]) == api["bone_age_months"]
    assert row["classification"] == api["assessment"]["classification"]
    assert (row["sex_source"], row["chronological_age_source"]) == ("record", "record")


def test_a_stopped_run_resumes_without_redoing_or_losing_an_image(tmp_path):
    listing = tmp_path / "cohort.csv"
    images = sorted(THUMBNAILS.glob("*.png"))
    with listing.open("w") as fh:
        fh.write("path,male\n")
        for i in range(8):  # enough work that the first run can be stopped half way
            for p in images:
                fh.write(f"{tmp_path / f'copy{i}' / p.name},{'True' if i % 2 else 'False'}\n")
    for i in range(8):
        shutil.copytree(THUMBNAILS, tmp_path / f"copy{i}")
    out = tmp_path / "results.csv"
    total = 8 * len(images)

    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.score",
            str(listing),
            "--out",
            str(out),
            "--no-progress",
            "--workers",
            "1",
            "--batch-size",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.is_file() or len(out.read_text().splitlines()) < 20):
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the hardest stop: no clean-up at all
    first.wait()
    # Its decode workers go with it instead of lingering with their memory.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and scoring_processes(listing):
        time.sleep(0.1)
    assert not scoring_processes(listing)
    partial = len(read_rows(out))
    assert 0 < partial < total

    second = run_score(listing, "--out", out)
    assert second.returncode == 0, second.stderr
    assert f"{partial} already scored; {total - partial} to go" in second.stdout
    paths = [r["path"] for r in read_rows(out)]
    assert len(paths) == len(set(paths)) == total
    assert all(r["status"] in ("ok", "refused") for r in read_rows(out))  # refused: the quality gate's call


def test_a_distributed_engine_runs_the_same_function_on_partitions(archive, tmp_path):
    bag = pytest.importorskip("dask.bag")
    records = [r for r in find_records(archive) if r["path"].endswith(("IM000001", ".jpg"))]
    records[1:] = [{**r, "sex": "female"} for r in records[1:]]
    local = {r["path"]: r for r in score_records(records)}
    rows = bag.from_sequence(records, npartitions=2).map_partitions(score_records).compute(scheduler="processes")
    assert len(rows) == len(records)
    for row in rows:
        assert row["status"] == local[row["path"]]["status"] == "ok", row
        assert row["bone_age_months"] == local[row["path"]]["bone_age_months"]


def _score_in_daemon(records, queue) -> None:
    queue.put(score_records(records))


def test_inside_a_daemon_worker_as_distributed_engines_run_it_decoding_falls_back_to_threads(archive):
    """Dask's distributed workers and Ray's are daemon processes, which may not start a process pool."""
    import multiprocessing

    records = [r for r in find_records(archive) if r["path"].endswith("IM000001")]
    queue = multiprocessing.get_context("fork").Queue()
    process = multiprocessing.get_context("fork").Process(target=_score_in_daemon, args=(records, queue), daemon=True)
    process.start()
    rows = queue.get(timeout=120)
    process.join(timeout=30)
    assert [r["status"] for r in rows] == ["ok"], rows


def test_bad_records_get_error_rows_and_failed_rows_are_retried_by_the_next_run(tmp_path):
    listing = tmp_path / "cohort.csv"
    listing.write_text(
        "path,male,chronological_age_months\n"
        f"{HALFRES_PNG},unknown,40\n"  # not a sex: an error row, not a guess
        f"{HOSPITAL_JPEG},True,400\n"  # an impossible age
        f"{SMALL_DICOM},False,\n"
    )
    out = tmp_path / "results.csv"
    # A previous run that failed on the DICOM through no fault of the image (e.g. its batcher stopped).
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS)
        writer.writeheader()
        writer.writerow({"path": str(SMALL_DICOM.resolve()), "status": "failed", "error": "BatchFailed: stopped"})
    done = run_score(listing, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "0 already scored; 3 to go" in done.stdout
    rows = {Path(r["path"]).name: r for r in read_rows(out)}
    assert len(read_rows(out)) == 3  # the failed row was replaced, not duplicated
    assert rows[HALFRES_PNG.name]["status"] == "error" and "sex" in rows[HALFRES_PNG.name]["error"]
    assert rows[HOSPITAL_JPEG.name]["status"] == "error" and "(0, 300]" in rows[HOSPITAL_JPEG.name]["error"]
    assert rows[SMALL_DICOM.name]["status"] == "ok"
