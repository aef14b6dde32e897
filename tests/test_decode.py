"""Decoding: every real format reads, every bad file fails with a typed, plain error."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless

from radiograph import (
    EmptyImage,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
    UnsupportedFormat,
    UnsupportedTransferSyntax,
    decode,
    decode_file,
)
from radiograph.decode import parse_dicom_age
from tests.conftest import HALFRES_PNG, HOSPITAL_JPEG, SMALL_DICOM, THUMBNAILS


def png_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def grey() -> Image.Image:
    """A real 8-bit radiograph (half-resolution RSNA image)."""
    return Image.open(HALFRES_PNG)


@pytest.fixture
def small_dicom() -> pydicom.Dataset:
    return pydicom.dcmread(SMALL_DICOM)


# Real files -----------------------------------------------------------------------------


def test_an_8bit_grey_png_decodes_to_its_own_grey_levels():
    decoded = decode_file(HALFRES_PNG)
    assert decoded.format == "png"
    assert decoded.pixels.dtype == np.uint8  # no float copy: preprocessing maps levels through a table
    np.testing.assert_array_equal(decoded.pixels, np.asarray(Image.open(HALFRES_PNG)))


def test_a_hospital_rgb_jpeg_decodes_to_grey():
    decoded = decode_file(HOSPITAL_JPEG)
    assert decoded.format == "jpeg"
    assert decoded.pixels.ndim == 2
    assert decoded.sex is None and decoded.age_months is None


def test_the_real_dicom_gives_pixels_sex_and_age():
    decoded = decode_file(SMALL_DICOM)
    assert decoded.format == "dicom"
    assert decoded.pixels.shape == (382, 287)
    assert decoded.sex == "female"
    assert decoded.age_months == 84.0  # PatientAge 007Y
    assert decoded.pixels.max() > decoded.pixels.min()


def test_full_size_real_dicom_and_every_unlabelled_image_decode(data_dir):
    full = decode_file(data_dir / "dicom" / "hand-dx-ge-14bit.dcm")
    assert full.pixels.shape == (1531, 1149) and full.sex == "female" and full.age_months == 84.0
    files = sorted((data_dir / "unlabelled").rglob("*.*")) + sorted((data_dir / "rsna-fullres").rglob("*.png"))
    assert len(files) >= 40
    for path in files:
        assert decode_file(path).pixels.size > 0, path


# Valid but unusual encodings ------------------------------------------------------------


def test_a_16bit_png_keeps_its_precision(grey):
    wide = (np.asarray(grey, dtype=np.uint16) * 257).astype(np.uint16)
    decoded = decode(png_bytes(Image.fromarray(wide)))
    assert decoded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(decoded.pixels, wide)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA"])
def test_colour_alpha_and_palette_pngs_become_grey(grey, mode):
    decoded = decode(png_bytes(grey.convert(mode)))
    assert decoded.pixels.shape == np.asarray(grey).shape
    np.testing.assert_allclose(decoded.pixels.astype(int), np.asarray(grey).astype(int), atol=3)


@pytest.mark.parametrize("kwargs", [{}, {"progressive": True}])
def test_cmyk_and_progressive_jpegs_become_grey(grey, kwargs):
    for img in (grey.convert("CMYK"), grey.convert("RGB")):
        decoded = decode(jpeg_bytes(img, **kwargs))
        assert decoded.pixels.shape == np.asarray(grey).shape
        assert np.abs(decoded.pixels.astype(float) - np.asarray(grey)).mean() < 0.03 * 255


def test_monochrome1_dicom_is_inverted_to_monochrome2(small_dicom):
    for tag in ("VOILUTSequence", "WindowCenter", "WindowWidth"):
        delattr(small_dicom, tag) if tag in small_dicom else None
    mono2 = decode(dicom_bytes(small_dicom)).pixels
    small_dicom.PhotometricInterpretation = "MONOCHROME1"
    small_dicom.PixelData = (16383 - small_dicom.pixel_array).astype(np.uint16).tobytes()
    mono1 = decode(dicom_bytes(small_dicom)).pixels
    # Inverting the stored values and declaring MONOCHROME1 must give back the same picture.
    np.testing.assert_allclose(mono1 - mono1.min(), mono2 - mono2.min())


def test_dicom_with_12_bits_stored_and_window_tags(small_dicom):
    stored = small_dicom.pixel_array >> 2  # 14 → 12 bits
    del small_dicom.VOILUTSequence
    small_dicom.BitsStored, small_dicom.HighBit = 12, 11
    small_dicom.PixelData = stored.astype(np.uint16).tobytes()
    small_dicom.WindowCenter, small_dicom.WindowWidth = 2000, 2000
    decoded = decode(dicom_bytes(small_dicom))
    assert decoded.pixels.shape == (382, 287)
    # The window (1000–3000) was applied: everything below it is one value, everything above another,
    # and inside it the mapping is increasing.
    below, above = stored <= 1000, stored >= 3000
    assert below.any() and above.any()
    assert np.ptp(decoded.pixels[below]) == 0 and np.ptp(decoded.pixels[above]) == 0
    inside = ~below & ~above
    order = np.argsort(stored[inside], kind="stable")
    assert np.all(np.diff(decoded.pixels[inside][order]) >= 0)
    assert (
        decoded.pixels[above][0]
        > decoded.pixels[inside].max()
        > decoded.pixels[inside].min()
        > decoded.pixels[below][0]
    )


def test_dicom_age_from_birth_and_study_dates(small_dicom):
    del small_dicom.PatientAge
    small_dicom.PatientBirthDate, small_dicom.StudyDate = "19930101", "20000101"
    assert decode(dicom_bytes(small_dicom)).age_months == pytest.approx(84, abs=0.1)


def test_malformed_dicom_sex_and_age_are_ignored_with_a_note(small_dicom):
    small_dicom.PatientSex, small_dicom.PatientAge = "X", "7 yrs"
    decoded = decode(dicom_bytes(small_dicom))
    assert decoded.sex is None and decoded.age_months is None
    assert len(decoded.notes) == 2


@pytest.mark.parametrize(
    ("value", "months"),
    [("007Y", 84), ("084M", 84), ("052W", 11.96), ("030D", 0.99), ("7Y", None), ("abcY", None), ("", None)],
)
def test_dicom_age_strings(value, months):
    assert parse_dicom_age(value) == (pytest.approx(months, abs=0.01) if months else None)


# Bad files ------------------------------------------------------------------------------


def test_empty_file():
    with pytest.raises(EmptyImage, match="empty"):
        decode(b"")


@pytest.mark.parametrize("data", [b"hello, this is a text file named hand.png\n", bytes(range(256)) * 8])
def test_text_and_random_bytes_are_not_images(data):
    with pytest.raises(NotAnImage, match="PNG, JPEG or DICOM"):
        decode(data)


@pytest.mark.parametrize("make", [png_bytes, jpeg_bytes])
def test_truncated_png_and_jpeg(grey, make):
    data = make(grey)
    with pytest.raises(TruncatedImage, match="truncated or corrupt"):
        decode(data[: len(data) // 2])


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png_declaring_a_huge_size_is_refused_before_decoding():
    ihdr = struct.pack(">IIBBBBB", 60_000, 60_000, 8, 0, 0, 0, 0)
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + _chunk(b"IEND", b"")
    )
    with pytest.raises(ImageTooLarge, match="limit"):
        decode(bomb)


def test_pixel_limit_is_configurable(grey):
    with pytest.raises(ImageTooLarge):
        decode(png_bytes(grey), max_pixels=1000)


def test_gif_and_bmp_are_unsupported(grey):
    for fmt in ("GIF", "BMP"):
        buf = io.BytesIO()
        grey.save(buf, format=fmt)
        with pytest.raises(UnsupportedFormat, match=fmt):
            decode(buf.getvalue())


def test_dicom_without_pixel_data(small_dicom):
    del small_dicom.PixelData
    with pytest.raises(EmptyImage, match="no pixel data"):
        decode(dicom_bytes(small_dicom))


def test_dicom_with_an_undecodable_transfer_syntax(small_dicom):
    small_dicom.file_meta.TransferSyntaxUID = JPEGLSLossless
    small_dicom.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 64])
    small_dicom["PixelData"].VR = "OB"
    with pytest.raises(UnsupportedTransferSyntax, match="JPEG-LS"):
        decode(dicom_bytes(small_dicom))


def test_truncated_dicom(small_dicom):
    data = dicom_bytes(small_dicom)
    with pytest.raises(TruncatedImage, match="truncated"):
        decode(data[:-5000])  # pixel data cut short


def test_a_thumbnail_is_tiny_but_valid():
    path = next(THUMBNAILS.glob("*.png"))
    assert decode_file(path).pixels.shape == (100, 100)


# Compressed DICOM, as PACS export it (issue 12 item 5) ----------------------------------

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def transcoded(path: Path, syntax: str, out: Path) -> Path:
    """The same DICOM re-encoded by GDCM in another transfer syntax (pixels untouched for lossless)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(out))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return out


@pytest.mark.parametrize(
    ("syntax", "name"),
    [
        ("JPEGLosslessProcess14_1", "JPEG Lossless"),
        ("JPEGLSLossless", "JPEG-LS Lossless"),
        ("JPEG2000Lossless", "JPEG 2000 Image Compression (Lossless Only)"),
        ("RLELossless", "RLE Lossless"),
    ],
)
def test_the_real_hand_dicom_compressed_losslessly_decodes_to_the_same_pixels(syntax, name, tmp_path):
    path = transcoded(SMALL_DICOM, syntax, tmp_path / f"{syntax}.dcm")
    assert name in pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.name
    compressed, plain = decode_file(path), decode_file(SMALL_DICOM)
    np.testing.assert_array_equal(compressed.pixels, plain.pixels)
    assert (compressed.sex, compressed.age_months) == ("female", 84.0)


@pytest.mark.parametrize(
    ("compressed", "plain"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("JPEG2000.dcm", None),
        ("693_J2KI.dcm", None),
    ],
)
def test_pydicoms_own_compressed_files_decode(compressed, plain):
    decoded = decode_file(PYDICOM_FILES / compressed)
    assert decoded.pixels.ndim == 2 and decoded.pixels.max() > decoded.pixels.min()
    if plain:
        np.testing.assert_array_equal(decoded.pixels, decode_file(PYDICOM_FILES / plain).pixels)


def test_12bit_jpeg_extended_is_refused_with_the_syntax_named():
    with pytest.raises(UnsupportedTransferSyntax, match="JPEG Extended"):
        decode_file(PYDICOM_FILES / "JPEG-lossy.dcm")


def test_an_inverse_presentation_lut_is_honoured(small_dicom):
    plain = decode(dicom_bytes(small_dicom)).pixels
    small_dicom.PresentationLUTShape = "INVERSE"
    inverse = decode(dicom_bytes(small_dicom)).pixels
    np.testing.assert_allclose(inverse, plain.max() + plain.min() - plain)
    small_dicom.PhotometricInterpretation = "MONOCHROME1"  # DX: INVERSE restates MONOCHROME1, no second flip
    np.testing.assert_allclose(decode(dicom_bytes(small_dicom)).pixels, inverse)


def test_the_rescale_is_kept_when_the_window_cannot_be_applied(small_dicom):
    del small_dicom.VOILUTSequence
    small_dicom.RescaleSlope, small_dicom.RescaleIntercept = 2, -100
    small_dicom.WindowCenter, small_dicom.WindowWidth = 2000, 0  # a zero-width window cannot be applied
    decoded = decode(dicom_bytes(small_dicom))
    np.testing.assert_allclose(decoded.pixels, small_dicom.pixel_array * 2.0 - 100)
