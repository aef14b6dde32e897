"""The RSNA label layouts, clear errors for bad rows and missing images, and the split."""

from __future__ import annotations

import pytest

from tests.conftest import THUMBNAILS, THUMBNAILS_CSV
from training.data import DatasetError, Sample, fingerprint, image_paths, read_labels, stratified_split


def write(tmp_path, text: str):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_training_layout():
    samples = read_labels(THUMBNAILS_CSV)
    assert len(samples) == 40
    assert all(isinstance(s.male, bool) and 0 <= s.boneage_months <= 228 for s in samples)
    assert len(image_paths(samples, THUMBNAILS)) == 40


def test_validation_layout(tmp_path):
    path = write(tmp_path, "Image ID,male,Bone Age (months)\n1386,False,30\n1392,True,162\n")
    assert read_labels(path) == [Sample("1386", 30.0, False), Sample("1392", 162.0, True)]


def test_test_layout_with_m_f_and_fractional_ages(tmp_path):
    path = write(tmp_path, "Case ID,Sex,Ground truth bone age (months)\n4360,M,168.93\n4361,F,169.65\n")
    assert read_labels(path) == [Sample("4360", 168.93, True), Sample("4361", 169.65, False)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,boneage,male\n1,12,False\n2,abc,True\n", "row 3: bone age 'abc'"),
        ("id,boneage,male\n1,12,maybe\n", "row 2: sex 'maybe'"),
        ("id,boneage,male\n1,-5,True\n", "row 2: bone age -5.0"),
        ("id,boneage,male\n,12,True\n", "row 2: empty 'id'"),
        ("name,age\nx,1\n", "unknown columns"),
        ("id,boneage,male\n", "no rows"),
    ],
)
def test_bad_rows_are_named(tmp_path, text, message):
    with pytest.raises(DatasetError, match=message):
        read_labels(write(tmp_path, text))


def test_missing_images_are_named(tmp_path):
    samples = [Sample("1", 12, True), Sample("missing-99", 30, False)]
    (tmp_path / "1.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match=r"1 image.*missing-99\.png"):
        image_paths(samples, tmp_path)


def test_split_is_deterministic_disjoint_and_stratified():
    samples = [Sample(str(i), float(i % 200), i % 3 == 0) for i in range(1000)]
    train, val = stratified_split(samples, 0.2, seed=7)
    again_train, again_val = stratified_split(list(reversed(samples)), 0.2, seed=7)
    assert (train, val) == (again_train, again_val)
    assert {s.image_id for s in train}.isdisjoint({s.image_id for s in val})
    assert len(train) + len(val) == 1000 and 190 <= len(val) <= 210
    share_male = sum(s.male for s in val) / len(val)
    assert share_male == pytest.approx(sum(s.male for s in samples) / 1000, abs=0.02)
    young = sum(s.boneage_months < 48 for s in val) / len(val)
    assert young == pytest.approx(0.24, abs=0.03)


def test_only_the_fingerprint_tells_two_split_seeds_apart():
    """Why model files record their validation fingerprint: every seed gives the same counts."""
    samples = [Sample(str(i), float(i % 200), i % 3 == 0) for i in range(1000)]
    (train_a, val_a), (train_b, val_b) = stratified_split(samples, 0.15, seed=42), stratified_split(samples, 0.15, 7)
    assert (len(train_a), len(val_a)) == (len(train_b), len(val_b))
    assert fingerprint(val_a) != fingerprint(val_b)
    assert fingerprint(val_a) == fingerprint(list(reversed(val_a))) and len(fingerprint(val_a)) == 16


def test_images_are_found_as_png_or_jpeg(tmp_path):
    samples = [Sample("1", 30.0, False), Sample("2", 40.0, True)]
    (tmp_path / "1.png").write_bytes(b"x")
    (tmp_path / "2.jpg").write_bytes(b"x")
    assert [p.name for p in image_paths(samples, tmp_path)] == ["1.png", "2.jpg"]


def test_training_reads_the_299px_set_as_it_comes(data_dir):
    from training.train import parse_args

    args = parse_args(["--run-dir", "unused"])
    assert args.csv == data_dir / "rsna-299px" / "boneage-training-dataset.csv"
    samples = read_labels(args.csv)
    assert len(samples) == 11355
    paths = image_paths(samples[:50], args.csv.with_suffix(""))
    assert {p.suffix for p in paths} == {".jpg"}
