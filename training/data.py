"""RSNA bone-age data as it comes: label CSVs, image folders, split, cache and tf.data pipeline.

Images are turned into model inputs only through :mod:`radiograph` (the same code the
service runs). That happens once per image, in parallel worker processes, and the
resulting tensors are cached on disk keyed by the preprocessing spec, so epochs after
the first (and later runs) never decode again and both cores go to training.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radiograph import PreprocessSpec
from radiograph.preprocess import load_file


def data_root() -> Path:
    """Where the real radiographs live: ``$BONEAGE_DATA_DIR``, else ``../shared/data`` beside the repo."""
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("BONEAGE_DATA_DIR", default))


class DatasetError(ValueError):
    """A label file or image folder that cannot be used, with the row or file named."""


@dataclass(frozen=True)
class Sample:
    image_id: str
    boneage_months: float
    male: bool


def fingerprint(samples: Sequence[Sample]) -> str:
    """A short hash of the image ids: which images a split holds. Train/validation counts are the
    same for every split seed, so only the ids tell a model file's validation images apart."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(s.image_id for s in samples)).encode()).hexdigest()[:16]


# The three RSNA label layouts: (id column, sex column, age column).
SCHEMAS: dict[str, tuple[str, str, str]] = {
    "training": ("id", "male", "boneage"),
    "validation": ("Image ID", "male", "Bone Age (months)"),
    "test": ("Case ID", "Sex", "Ground truth bone age (months)"),
}

_TRUE = {"true", "t", "1", "m", "male", "yes"}
_FALSE = {"false", "f", "0", "female", "no"}


def _parse_male(value: str, where: str) -> bool:
    key = value.strip().lower()
    if key in _TRUE:
        return True
    if key in _FALSE:
        return False
    raise DatasetError(f"{where}: sex {value!r} is not one of True/False/M/F")


def read_labels(csv_path: str | Path) -> list[Sample]:
    """Read any of the RSNA label CSVs (training, validation or test layout)."""
    path = Path(csv_path)
    if not path.is_file():
        raise DatasetError(f"{path}: label file not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        schema = next((s for s in SCHEMAS.values() if set(s) <= set(header)), None)
        if schema is None:
            expected = " | ".join(",".join(s) for s in SCHEMAS.values())
            raise DatasetError(f"{path}: unknown columns {header}; expected one of: {expected}")
        id_col, sex_col, age_col = schema
        samples = []
        for line, row in enumerate(reader, start=2):
            where = f"{path.name} row {line}"
            image_id = (row.get(id_col) or "").strip()
            if not image_id:
                raise DatasetError(f"{where}: empty {id_col!r}")
            try:
                age = float(row.get(age_col) or "")
            except ValueError:
                raise DatasetError(f"{where}: bone age {row.get(age_col)!r} is not a number") from None
            if not np.isfinite(age) or not 0 <= age <= 300:
                raise DatasetError(f"{where}: bone age {age} months is out of range 0–300")
            samples.append(Sample(image_id, age, _parse_male(row.get(sex_col) or "", where)))
    if not samples:
        raise DatasetError(f"{path}: no rows")
    return samples


#: Image file types a label's id may point to, in the order tried: the RSNA release ships PNG,
#: the 299 px training set here JPEG.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_paths(samples: Sequence[Sample], image_dir: str | Path) -> list[Path]:
    """Map samples to ``<image_dir>/<id>.png`` (or ``.jpg``); fail naming the missing ones."""
    folder = Path(image_dir)
    present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def find(image_id: str) -> Path:
        name = next((image_id + s for s in IMAGE_SUFFIXES if image_id + s in present), image_id + ".png")
        return folder / name

    paths = [find(s.image_id) for s in samples]
    missing = [p.name for p in paths if p.name not in present]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise DatasetError(f"{folder}: {len(missing)} image(s) missing: {shown}")
    return paths


def default_image_dir(csv_path: str | Path) -> Path:
    """Where the RSNA release keeps a CSV's images: a sibling folder named like the CSV, else ``images``."""
    path = Path(csv_path)
    for candidate in (path.with_suffix(""), path.parent / "images"):
        if candidate.is_dir():
            return candidate
    return path.parent


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int = 42, band_months: int = 24
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/validation split stratified by sex and age band."""
    if not 0 < val_fraction < 1:
        raise DatasetError(f"validation fraction must be in (0, 1), got {val_fraction}")
    strata: dict[tuple[bool, int], list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.image_id):
        strata.setdefault((s.male, int(s.boneage_months // band_months)), []).append(s)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for key in sorted(strata):
        group = strata[key]
        order = rng.permutation(len(group))
        n_val = round(len(group) * val_fraction)
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return train, val


def _cache_key(paths: Sequence[Path], spec: PreprocessSpec) -> str:
    digest = hashlib.sha256(spec.to_json().encode())
    for p in paths:
        stat = p.stat()
        digest.update(f"{p.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _load_one(args: tuple[str, str]) -> np.ndarray:
    path, spec_json = args
    return load_file(path, PreprocessSpec.from_json(spec_json))


def load_images(
    paths: Sequence[Path], spec: PreprocessSpec, cache_dir: Path | None = None, workers: int | None = None
) -> np.ndarray:
    """Decode + preprocess every image (in parallel, cached on disk) → ``(N, S, S, 3) float32``."""
    cache_file = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache_file = cache_dir / f"inputs-{_cache_key(paths, spec)}.npy"
        if cache_file.is_file():
            return np.load(cache_file, mmap_mode="r")  # Large caches stay on disk, paged in per batch.
    workers = workers or os.cpu_count() or 1
    jobs = [(str(p), spec.to_json()) for p in paths]
    if workers > 1 and len(jobs) > 64:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_load_one, jobs, chunksize=64))
    else:
        arrays = [_load_one(j) for j in jobs]
    images = np.stack(arrays).astype(np.float32, copy=False)
    if cache_file is not None:
        tmp = cache_file.with_suffix(".tmp.npy")
        np.save(tmp, images)
        tmp.replace(cache_file)
        return np.load(cache_file, mmap_mode="r")
    return images


def arrays(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """(sex as ``(N, 1) float32`` with male = 1, bone age as ``(N,) float32`` months)."""
    sex = np.array([[1.0 if s.male else 0.0] for s in samples], dtype=np.float32)
    age = np.array([s.boneage_months for s in samples], dtype=np.float32)
    return sex, age


def augmentation(seed: int = 42):
    """Radiograph-safe augmentation: small rotations, shifts, zoom, brightness and contrast.

    No flips: the RSNA set is left hands and bone age is read from a left hand.
    Inputs are in [-1, 1] (after preprocessing), so brightness works on that range.
    """
    import keras

    return keras.Sequential(
        [
            keras.layers.RandomRotation(10 / 360, fill_mode="constant", fill_value=-1.0, seed=seed),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", fill_value=-1.0, seed=seed),
            keras.layers.RandomZoom((-0.1, 0.1), fill_mode="constant", fill_value=-1.0, seed=seed),
            keras.layers.RandomBrightness(0.1, value_range=(-1.0, 1.0), seed=seed),
            keras.layers.RandomContrast(0.1, value_range=(-1.0, 1.0), seed=seed),
        ],
        name="augmentation",
    )


#: Tensors up to this size are handed to TensorFlow whole; larger caches (299 px on the full
#: release is ~13.5 GB) are gathered batch by batch from the memory-mapped cache instead.
IN_MEMORY_BYTES = 2 * 1024**3


def make_dataset(
    images: np.ndarray,
    sex: np.ndarray,
    age: np.ndarray,
    batch_size: int,
    training: bool,
    seed: int = 42,
):
    """tf.data pipeline over the cached tensors: shuffle indices, gather, augment, prefetch."""
    import tensorflow as tf

    ds = tf.data.Dataset.range(len(images))
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if images.nbytes <= IN_MEMORY_BYTES:
        x_img, x_sex, y = tf.constant(np.asarray(images)), tf.constant(sex), tf.constant(age)
        ds = ds.map(
            lambda idx: ({"image": tf.gather(x_img, idx), "sex": tf.gather(x_sex, idx)}, tf.gather(y, idx)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    else:
        shape = images.shape[1:]

        def gather(idx):
            order = np.sort(idx)  # Sorted reads are kinder to a memory-mapped file.
            return np.ascontiguousarray(images[order]), sex[order], age[order]

        def load(idx):
            x, s, t = tf.numpy_function(gather, [idx], [tf.float32, tf.float32, tf.float32])
            x.set_shape((None, *shape))
            s.set_shape((None, 1))
            t.set_shape((None,))
            return {"image": x, "sex": s}, t

        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if training:
        augment = augmentation(seed)
        ds = ds.map(
            lambda x, t: ({"image": augment(x["image"], training=True), "sex": x["sex"]}, t),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return ds.prefetch(tf.data.AUTOTUNE)
