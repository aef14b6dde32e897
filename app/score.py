"""Score a whole archive in-process: one CSV row per image, errors included, resumable.

    python -m app.score /archive/hands --out results.csv            # a folder tree (PNG, JPEG, DICOM)
    python -m app.score cohort.csv --out results.csv                # a CSV: path[, sex][, chronological_age_months]
    python -m app.score /archive/hands --out results.csv --sex female   # sex for files that do not carry it

The same decode and preprocessing (``radiograph``), the same batcher (``app.batching``), model
(``app.inference``), quality gate, prediction interval and assessment as the service, without
HTTP. Rows are written as images finish, so a stopped run loses at most the images in flight;
run the same command again and it skips every path already in ``--out``. Nothing is dropped:
an image that cannot be read or rated gets a row with ``status`` ``error`` or ``refused`` and the
reason.

For more than one machine, :func:`score_records` is the unit of work: hand it to an existing
engine, e.g. ``dask.bag.from_sequence(records, npartitions=N).map_partitions(score_records,
model_path=...)`` (see README).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from app import assessment, quality
from app.batching import Batcher
from app.config import BUNDLED_MODEL
from app.inference import Model
from app.schemas import canonical_sex
from radiograph import ImageError, load_model_input
from radiograph.decode import DEFAULT_MAX_PIXELS, sniff_format

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
        return [{"path": str(p), "sex": None, "chronological_age_months": None} for p in paths]
    records = []
    with source.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if "path" not in (reader.fieldnames or []):
            raise SystemExit(f"{source}: a CSV of images needs a 'path' column (found {reader.fieldnames})")
        for row in reader:
            row_sex = row.get("sex") or None
            if row_sex is None and row.get("male"):
                row_sex = "male" if row["male"].strip().lower() in ("true", "1", "yes") else "female"
            path = Path(row["path"])
            records.append(
                {
                    "path": str(path if path.is_absolute() else source.parent / path),
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
    sex, sex_source = (requested, "record") if requested else (decoded.sex, "dicom")
    if sex is None and default_sex is not None:
        sex, sex_source = default_sex, "default"
    if sex is None:
        return _row(record, "error", model, error="sex unknown: the image carries none; give it in the CSV or --sex")
    age, age_source = record.get("chronological_age_months"), "record"
    try:
        age = float(age) if age not in (None, "") else None
    except ValueError:
        return _row(record, "error", model, error=f"chronological_age_months is not a number: {age!r}")
    if age is None and decoded.age_months is not None:
        age, age_source = decoded.age_months, "dicom"
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
        "warnings": " ".join(decoded.notes) or None,
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


async def _score(
    records: Sequence[dict],
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
    window = asyncio.Semaphore(max(4 * batch_size, 2 * workers))  # bounded memory on any archive size
    with ProcessPoolExecutor(workers, initializer=_die_with_parent) as pool:

        async def one(record: dict) -> None:
            async with window:
                try:
                    row = await _score_one(record, model, batcher, pool, level, max_pixels, default_sex)
                except Exception as exc:  # nothing is silently lost: an unexpected failure is a row too
                    row = _row(record, "error", model, error=f"unexpected: {exc!r}")
            on_row(row)

        await asyncio.gather(*(one(r) for r in records))
    await batcher.stop()


def score_records(
    records: Iterable[dict],
    model_path: str | Path = BUNDLED_MODEL,
    batch_size: int = 16,
    workers: int | None = None,
    level: float = 0.9,
    on_row: Callable[[dict], None] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    default_sex: str | None = None,
) -> list[dict]:
    """Score records (see :func:`find_records`) → one row per record (any order); the unit of work
    for the CLI here and for a distributed engine's partitions."""
    records = list(records)
    rows: list[dict] = []

    def keep(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    model = Model(model_path, os.environ.get("BONEAGE_PROVIDERS", "auto"))
    workers = workers or os.cpu_count() or 1
    asyncio.run(_score(records, model, keep, batch_size, workers, level, max_pixels, default_sex))
    return rows


def finished_paths(out: Path) -> set[str]:
    """Paths already written to ``out`` (any status): a rerun skips them."""
    if not out.is_file():
        return set()
    with out.open(newline="") as fh:
        return {row["path"] for row in csv.DictReader(fh) if row.get("path")}


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

    records = find_records(args.source)
    done = finished_paths(args.out)
    todo = [r for r in records if r["path"] not in done]
    print(f"{len(records)} images; {len(done & {r['path'] for r in records})} already scored; {len(todo)} to go")
    new_file = not args.out.is_file() or args.out.stat().st_size == 0
    counts = {"ok": 0, "refused": 0, "error": 0}
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
    print(f"scored {len(todo)}: {counts['ok']} ok, {counts['refused']} refused, {counts['error']} errors → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
