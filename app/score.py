"""Score a whole archive in-process: one CSV row per image, errors included, resumable.

    python -m app.score /archive/hands --out results.csv            # a folder tree (PNG, JPEG, DICOM)
    python -m app.score cohort.csv --out results.csv                # a CSV: path[, sex][, chronological_age_months]
    python -m app.score /archive/hands --out results.csv --sex female   # sex for files that do not carry it

The same decode and preprocessing (``radiograph``), the same batcher (``app.batching``), model
(``app.inference``), quality gate, prediction interval and assessment as the service, without
HTTP. Rows are written as images finish, so a stopped run loses at most the images in flight;
run the same command again and it skips every path already in ``--out``. Nothing is dropped:
an image that cannot be read or rated gets a row with ``status`` ``error`` or ``refused`` and the
reason; a failure of the run itself (not of the image) is ``failed``, and a rerun retries it.

For more than one machine, :func:`score_records` is the unit of work: hand it to an existing
engine, e.g. ``dask.bag.from_sequence(records, npartitions=N).map_partitions(score_records,
model_path=...)`` (see README).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from app import assessment, quality
from app.batching import Batcher
from app.config import BUNDLED_MODEL
from app.inference import Model
from app.patient import patient_facts
from app.privacy import keep_patient_data_out_of_logs
from app.schemas import MAX_AGE_MONTHS, canonical_sex
from radiograph import ImageError, load_model_input
from radiograph.decode import DEFAULT_MAX_PIXELS, sniff_format

MALE_COLUMN = {"true": "male", "1": "male", "yes": "male", "false": "female", "0": "female", "no": "female"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
COLUMNS = [
    "path",
    "status",
    "bone_age_months",
    "bone_age_years",
    "interval_lower_months",
    "interval_upper_months",
    "interval_level",
    "sex",
    "sex_source",
    "chronological_age_months",
    "chronological_age_source",
    "z_score",
    "classification",
    "warnings",
    "error",
    "model_version",
]


def find_records(source: Path) -> list[dict]:
    """A folder tree or a CSV → records ``{"path", "sex", "chronological_age_months"}`` (strings or None).

    In a folder, files with an image suffix are taken, and suffix-less files that are DICOM (as
    PACS exports often are). In a CSV, ``path`` is relative to the CSV's folder; ``sex`` (or RSNA's
    ``male``) and ``chronological_age_months`` are optional columns.
    """
    if source.is_dir():
        paths = []
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            if path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and _is_dicom(path)):
                paths.append(path)
        return [{"path": str(p.resolve()), "sex": None, "chronological_age_months": None} for p in paths]
    records = []
    with source.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if "path" not in (reader.fieldnames or []):
            raise SystemExit(f"{source}: a CSV of images needs a 'path' column (found {reader.fieldnames})")
        for row in reader:
            row_sex = row.get("sex") or None
            if row_sex is None and row.get("male"):
                # RSNA's column; anything unrecognised is kept as is, and gets an error row, not a guess.
                row_sex = MALE_COLUMN.get(row["male"].strip().lower(), row["male"])
            path = Path(row["path"])
            records.append(
                {
                    "path": str((path if path.is_absolute() else source.parent / path).resolve()),
                    "sex": row_sex,
                    "chronological_age_months": row.get("chronological_age_months") or None,
                }
            )
    return records


def _is_dicom(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    try:
        return sniff_format(head) == "dicom"
    except ImageError:
        return False


def _die_with_parent() -> None:
    """Pool initializer: on Linux, a worker gets SIGTERM when the scoring process dies (even by
    SIGKILL), instead of lingering forever with its memory, as multiprocessing's workers otherwise do."""
    keep_patient_data_out_of_logs()
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _prepare(path: str, spec, max_pixels: int):
    """In a worker process: file → (tensor, decoded), or the reason it cannot be read."""
    try:
        return load_model_input(Path(path).read_bytes(), spec, max_pixels)
    except ImageError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"


def _row(record: dict, status: str, model: Model, **values) -> dict:
    return {"path": record["path"], "status": status, "model_version": model.file.version, **values}


async def _score_one(
    record: dict, model: Model, batcher: Batcher, pool, level: float, max_pixels: int, default_sex: str | None
) -> dict:
    loop = asyncio.get_running_loop()
    prepared = await loop.run_in_executor(pool, _prepare, record["path"], model.spec, max_pixels)
    if isinstance(prepared, str):
        return _row(record, "error", model, error=prepared)
    tensor, decoded = prepared
    requested = canonical_sex(record.get("sex"))
    if requested not in (None, "male", "female"):
        return _row(record, "error", model, error=f"sex must be male or female, not {record['sex']!r}")
    if not requested and not decoded.sex and default_sex is None:
        return _row(record, "error", model, error="sex unknown: the image carries none; give it in the CSV or --sex")
    age = record.get("chronological_age_months")
    try:
        age = float(age) if age not in (None, "") else None
    except ValueError:
        return _row(record, "error", model, error=f"chronological_age_months is not a number: {age!r}")
    if age is not None and not 0 < age <= MAX_AGE_MONTHS:
        return _row(record, "error", model, error=f"chronological_age_months must be in (0, 300], not {age:g}")
    patient = patient_facts(decoded, requested, age, given_by="record")
    sex, sex_source, age, age_source, notes = (
        patient.sex,
        patient.sex_source,
        patient.age_months,
        patient.age_source,
        patient.notes,
    )
    if sex is None:
        sex, sex_source = default_sex, "default"
    findings = quality.file_findings(decoded)
    prediction = None
    if not findings:
        prediction = await batcher.submit(tensor, 1.0 if sex == "male" else 0.0)
        findings = quality.feature_findings(prediction.distance, model.file.gate)
    facts = {
        "sex": sex,
        "sex_source": sex_source,
        "chronological_age_months": None if age is None else round(age, 2),
        "chronological_age_source": None if age is None else age_source,
    }
    if findings:
        return _row(record, "refused", model, error=" ".join(findings), **facts)
    months = prediction.months
    interval = model.file.interval.interval(months, level) if model.file.interval is not None else None
    values = {
        "bone_age_months": round(months, 1),
        "bone_age_years": round(months / 12, 1),
        **facts,
        "warnings": " ".join(notes) or None,
    }
    if interval is not None:
        values.update(
            interval_lower_months=round(interval[0], 1),
            interval_upper_months=round(interval[1], 1),
            interval_level=level,
        )
    if age is not None:
        verdict = assessment.assess(months, age, sex, interval, level)
        values.update(
            z_score=None if verdict.z_score is None else round(verdict.z_score, 2),
            classification=verdict.classification,
        )
    return _row(record, "ok", model, **values)


class _Pool:
    """The decode pool, replaced when a worker dies (a decoder crash, an out-of-memory kill)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = self._new()

    def _new(self):
        if multiprocessing.current_process().daemon:
            # Inside a distributed engine's daemon worker (Dask, Ray), which may not start processes:
            # decode in threads; the engine spreads the work across processes and machines.
            return ThreadPoolExecutor(self.workers)
        return ProcessPoolExecutor(self.workers, initializer=_die_with_parent)

    def replace(self, broken) -> None:
        if self.executor is broken:
            broken.shutdown(wait=False, cancel_futures=True)
            self.executor = self._new()


async def _score(
    records: Iterable[dict],
    model: Model,
    on_row: Callable[[dict], None],
    batch_size: int,
    workers: int,
    level: float,
    max_pixels: int,
    default_sex: str | None,
) -> None:
    batcher = Batcher(model.predict, max_batch_size=batch_size, max_wait_s=0.002)
    batcher.start()
    pool = _Pool(workers)
    todo = iter(records)  # pulled one at a time: memory stays bounded on any archive size

    async def score(record: dict) -> dict:
        executor = pool.executor
        try:
            return await _score_one(record, model, batcher, executor, level, max_pixels, default_sex)
        except BrokenProcessPool:
            pool.replace(executor)
        # Every file in flight sees the broken pool; alone in a process of its own, only the culprit fails.
        with ProcessPoolExecutor(1, initializer=_die_with_parent) as alone:
            try:
                return await _score_one(record, model, batcher, alone, level, max_pixels, default_sex)
            except BrokenProcessPool:
                return _row(record, "error", model, error="the decoder crashed on this file")

    async def worker() -> None:
        for record in todo:
            try:
                row = await score(record)
            except Exception as exc:
                # Not the image's fault (e.g. the batcher stopped): written as 'failed', which a rerun
                # retries, rather than as a final 'error'. Nothing is silently lost either way.
                row = _row(record, "failed", model, error=f"{type(exc).__name__}: {exc}")
            on_row(row)

    try:
        await asyncio.gather(*(worker() for _ in range(max(4 * batch_size, 2 * workers))))
    finally:
        await batcher.stop()
        pool.executor.shutdown(wait=True, cancel_futures=True)


def score_records(
    records: Iterable[dict],
    model_path: str | Path | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    level: float = 0.9,
    on_row: Callable[[dict], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    default_sex: str | None = None,
) -> list[dict]:
    """Score records (see :func:`find_records`) → one row per record (any order); the unit of work
    for the CLI here and for a distributed engine's partitions."""
    rows: list[dict] = []

    def keep(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    model = Model(
        model_path or os.environ.get("BONEAGE_MODEL_PATH", BUNDLED_MODEL), os.environ.get("BONEAGE_PROVIDERS", "auto")
    )
    workers = workers or os.cpu_count() or 1
    asyncio.run(_score(records, model, keep, batch_size, workers, level, max_pixels, default_sex))
    return rows


FINAL = ("ok", "refused", "error")


def finished_paths(out: Path) -> set[str]:
    """Paths already scored in ``out`` (ok, refused or error): a rerun skips them. Rows marked
    'failed' (the run's fault, not the image's) are removed from the file, so a rerun scores them again."""
    if not out.is_file():
        return set()
    with out.open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    if fields and fields != COLUMNS:
        raise SystemExit(f"{out} has other columns than app.score writes: not a results file of this tool")
    final = [r for r in rows if r.get("status") in FINAL]
    if len(final) != len(rows) and fields:
        tmp = out.with_suffix(out.suffix + ".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fields)
            writer.writeheader()
            writer.writerows(final)
        tmp.replace(out)
    return {r["path"] for r in final}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="a folder tree of images, or a CSV with a 'path' column")
    parser.add_argument("--out", type=Path, required=True, help="results CSV (appended to; a rerun resumes)")
    parser.add_argument("--model", type=Path, default=Path(os.environ.get("BONEAGE_MODEL_PATH", BUNDLED_MODEL)))
    parser.add_argument(
        "--sex", choices=["male", "female"], help="for images whose record and file carry none (sex_source 'default')"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decode/preprocess processes")
    parser.add_argument("--interval-level", type=float, default=0.9)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.source.exists():
        raise SystemExit(f"{args.source}: no such folder or CSV")

    from tqdm import tqdm

    keep_patient_data_out_of_logs()

    records = find_records(args.source)
    done = finished_paths(args.out)
    todo = [r for r in records if r["path"] not in done]
    print(f"{len(records)} images; {len(done & {r['path'] for r in records})} already scored; {len(todo)} to go")
    new_file = not args.out.is_file() or args.out.stat().st_size == 0
    counts = {"ok": 0, "refused": 0, "error": 0, "failed": 0}
    with args.out.open("a", newline="") as fh, tqdm(total=len(todo), disable=args.no_progress, unit="img") as bar:
        writer = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
        if new_file:
            writer.writeheader()

        def write(row: dict) -> None:
            writer.writerow(row)
            fh.flush()  # a stop loses only the images in flight
            counts[row["status"]] += 1
            bar.update()

        score_records(todo, args.model, args.batch_size, args.workers, args.interval_level, write, default_sex=args.sex)
    print(
        f"scored {len(todo)}: {counts['ok']} ok, {counts['refused']} refused, {counts['error']} errors, "
        f"{counts['failed']} failed (rerun to retry) → {args.out}"
    )
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
