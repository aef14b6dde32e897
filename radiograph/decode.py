"""Decoding: file bytes → a grey picture, plus what a DICOM says about the patient.

Contract: :func:`decode` takes the raw bytes of a PNG, JPEG or DICOM file and returns a
:class:`DecodedImage` whose ``pixels`` are ``(H, W)`` with "brighter = denser"
(MONOCHROME1 is inverted): ``uint8`` or ``uint16`` for 8- and 16-bit PNG and JPEG (a fraction
of the type's full scale), ``float32`` for DICOM and anything else. The absolute range depends
on the source (windowed DICOM values, for one); preprocessing normalises it robustly, so
decoding keeps full precision.

Failures raise the typed errors of :mod:`radiograph.errors`, never a bare exception,
so callers can answer a user with a plain message.
"""

from __future__ import annotations

import datetime as dt
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from radiograph.errors import (
    EmptyImage,
    ImageError,
    ImageTooLarge,
    NotAnImage,
    TruncatedImage,
    UnsupportedFormat,
    UnsupportedTransferSyntax,
)

Sex = Literal["male", "female"]

#: Default pixel limit: a full-size RSNA radiograph is ~5 Mpx; 60 Mpx leaves room for
#: large detectors while refusing decompression bombs long before they exhaust memory.
DEFAULT_MAX_PIXELS = 60_000_000

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DAYS_PER_MONTH = 365.25 / 12


@dataclass
class DecodedImage:
    """A decoded radiograph and the patient facts its file carried (DICOM only)."""

    #: ``(H, W)``, brighter = denser: uint8/uint16 for 8/16-bit PNG and JPEG, float32 for DICOM and
    #: float or 32-bit PNG. Read-only for PNG and JPEG (a view of Pillow's buffer): copy before writing.
    pixels: np.ndarray
    format: Literal["png", "jpeg", "dicom"]
    sex: Sex | None = None
    age_months: float | None = None
    notes: list[str] = field(default_factory=list)
    #: How colourful the file was before it became grey (Hasler & Süsstrunk's metric, 0–255
    #: scale; ~0 for a grey picture saved as RGB, ~15 and up for a photograph); None for grey files.
    colourfulness: float | None = None
    #: Fraction of the picture in strong colour (chroma over :data:`STRONG_CHROMA`): a viewer's
    #: interface, coloured marks or a photograph. 0 for grey pictures saved in colour, near 0 for
    #: tinted photos of a film (their colour is weak and spread); None for grey files.
    coloured_fraction: float | None = None
    #: (height, width) of the picture inside its uniform borders, set by preprocessing
    #: (``radiograph.load_model_input``): how the hand is framed, before it is squared.
    content_shape: tuple[int, int] | None = None
    #: (median of its outer 8% frame, median of the whole) of that picture after normalisation to
    #: [0, 1], set by preprocessing: a radiograph's background is dark; an inverted one's is white.
    brightness: tuple[float, float] | None = None


def sniff_format(data: bytes) -> Literal["png", "jpeg", "dicom"]:
    """Name the file format from its first bytes; the file name and MIME type are not trusted."""
    if not data:
        raise EmptyImage("The uploaded file is empty.")
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    try:
        with Image.open(io.BytesIO(data)) as img:
            kind = img.format or "unknown"
    except Exception:  # Pillow's plugins raise all sorts on junk: none of it is an image we read.
        raise NotAnImage("The file is not a recognisable image. Send a PNG, JPEG or DICOM radiograph.") from None
    raise UnsupportedFormat(f"{kind} images are not supported. Send a PNG, JPEG or DICOM radiograph.")


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode PNG, JPEG or DICOM bytes into a grey picture (uint8, uint16 or float32).

    Total: any bytes give a decoded image or an :class:`~radiograph.errors.ImageError`. The
    decoders underneath (pydicom, Pillow, GDCM) raise many exception types on malformed files
    (``struct.error``, pydicom's ``BytesLengthException``, ``IndexError``…); whatever escapes the
    specific handlers below is a file that cannot be read, never a server error.
    """
    kind = sniff_format(data)
    try:
        if kind == "dicom":
            return _decode_dicom(data, max_pixels)
        pixels, colour = _decode_pillow(data, kind, max_pixels)
        return DecodedImage(
            pixels=pixels,
            format=kind,
            colourfulness=colour[0] if colour else None,
            coloured_fraction=colour[1] if colour else None,
        )
    except ImageError:
        raise
    except MemoryError:
        raise ImageTooLarge("The image needs more memory to decode than the service allows.") from None
    except Exception as exc:
        raise TruncatedImage(
            f"The {kind.upper()} file is malformed or truncated and cannot be read ({type(exc).__name__})."
        ) from None


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003) colourfulness of an ``(H, W, 3)`` RGB array (0–255 scale)."""
    return colour_measures(rgb)[0]


#: Chroma (max − min of R, G, B on a 0–255 scale) above which a pixel is strongly coloured. Phone
#: photos of films, tinted by the light, stay below it almost everywhere (at most 0.4% of a picture
#: in the hospital set here); a viewer's title bar or a coloured label is far above it.
STRONG_CHROMA = 64


def colour_measures(rgb: np.ndarray) -> tuple[float, float]:
    """(colourfulness, fraction of strongly coloured pixels) of an ``(H, W, 3)`` RGB array,
    on a subsample of about 250,000 pixels (a quality signal: a few milliseconds)."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))
    sample = rgb[::step, ::step]
    r, g, b = (sample[:, :, i].astype(np.float32) for i in range(3))
    rg, yb = r - g, (r + g) / 2 - b
    colourful = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    chroma = sample.max(axis=2).astype(np.int16) - sample.min(axis=2)
    return colourful, float((chroma > STRONG_CHROMA).mean())


def decode_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an image file from disk (training, evaluation and tests use this)."""
    return decode(Path(path).read_bytes(), max_pixels=max_pixels)


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise EmptyImage(f"The image has no pixels ({width}×{height}).")
    if width * height > max_pixels:
        raise ImageTooLarge(f"The image is {width}×{height} = {width * height:,} pixels; the limit is {max_pixels:,}.")


def _decode_pillow(data: bytes, kind: str, max_pixels: int) -> tuple[np.ndarray, tuple[float, float] | None]:
    """PNG (8/16-bit grey, RGB, RGBA, palette) and JPEG (grey, RGB, CMYK) → grey pixels and
    :func:`colour_measures` (None for grey files).

    8- and 16-bit files stay uint8/uint16: a float copy of a full-size picture costs as much as
    the normalisation that replaces it (preprocessing maps each grey level through a table)."""
    try:
        with warnings.catch_warnings():
            # Our own limit is checked below from the header; Pillow's warning adds nothing.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_size(*img.size, max_pixels=max_pixels)
            img.load()
    except (ImageTooLarge, EmptyImage):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"The image declares too many pixels: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise TruncatedImage(f"The {kind.upper()} file is truncated or corrupt and cannot be read ({exc}).") from None
    if getattr(img, "n_frames", 1) > 1:
        raise UnsupportedFormat("Animated images are not supported. Send a single radiograph.")
    if kind == "jpeg":
        # Phone photos of films carry their rotation in EXIF; apply it so the hand is upright.
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(img).astype(np.uint16, copy=False), None
    if mode == "I":
        return np.asarray(img, dtype=np.float32) / np.float32(65535), None
    if mode == "F":
        return np.asarray(img, dtype=np.float32), None
    colour = None
    if mode in ("L", "LA"):
        grey = img.getchannel(0)
    elif mode in ("P", "PA", "1", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        rgb = img.convert("RGB")
        colour = colour_measures(np.asarray(rgb)) if mode not in ("1",) else None
        grey = rgb.convert("L")
    else:
        raise UnsupportedFormat(f"{kind.upper()} images in mode {mode} are not supported.")
    return np.asarray(grey), colour


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    """DICOM through pydicom: rescale, VOI LUT or window, MONOCHROME1 or INVERSE presentation inverted.

    Compressed pixel data (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE) is decoded by
    the GDCM plugin of the serve extra (python-gdcm); 12-bit JPEG Extended is beyond it (415).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise TruncatedImage(f"The DICOM file is truncated or corrupt ({exc}).") from None
    if "PixelData" not in ds:
        raise EmptyImage("The DICOM file holds no pixel data (no image to assess).")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_size(cols, rows * frames, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedFormat(f"DICOM photometric interpretation {photometric} is not supported for radiographs.")
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        name = getattr(syntax, "name", str(syntax))
        raise UnsupportedTransferSyntax(
            f"DICOM pixel data encoded as '{name}' cannot be decoded here ({exc}). "
            "Export the image uncompressed (Explicit VR Little Endian)."
        ) from None
    except (ValueError, EOFError, OSError, AttributeError, KeyError, TypeError) as exc:
        raise TruncatedImage(f"The DICOM pixel data is truncated or corrupt ({exc}).") from None
    if frames > 1:
        pixels = pixels[0]
    if pixels.ndim != 2 or pixels.size == 0:
        raise EmptyImage("The DICOM pixel data is not a single grey image.")
    lut_errors = (ValueError, IndexError, KeyError, TypeError, AttributeError, ZeroDivisionError)
    try:
        modality = apply_modality_lut(pixels, ds)
        if not np.all(np.isfinite(modality)) or np.ptp(modality) == 0 < np.ptp(pixels):
            raise ValueError("the modality LUT or rescale collapses the image")
    except lut_errors:
        modality = pixels  # Malformed rescale or modality LUT: the stored values are the best left.
    try:
        values = modality
        if "VOILUTSequence" in ds and np.issubdtype(values.dtype, np.floating):
            # An identity rescale still yields floats; a VOI LUT indexes by integer value.
            values = np.rint(values).astype(np.int64)
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    except lut_errors:
        values = modality  # Malformed VOI LUT or window: keep the modality values, not the stored ones.
    values = np.asarray(values, dtype=np.float32)
    # Both say "the lowest value is displayed white"; DX files with MONOCHROME1 carry INVERSE as well,
    # which is the same inversion stated twice, not a second one.
    inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        values = values.max() + values.min() - values
    notes: list[str] = []
    sex = _dicom_sex(ds, notes)
    age = _dicom_age_months(ds, notes)
    return DecodedImage(pixels=values, format="dicom", sex=sex, age_months=age, notes=notes)


def _dicom_sex(ds, notes: list[str]) -> Sex | None:
    raw = str(ds.get("PatientSex", "") or "").strip().upper()
    if raw == "M":
        return "male"
    if raw == "F":
        return "female"
    if raw:
        notes.append("DICOM PatientSex is neither M nor F and was not used.")
    return None


def parse_dicom_age(value: str) -> float | None:
    """DICOM AS value ('007Y', '084M', '010W', '005D') → months; None when malformed."""
    value = value.strip().upper()
    if len(value) != 4 or not value[:3].isdigit() or value[3] not in "DWMY":
        return None
    number = int(value[:3])
    factor = {"D": 1 / _DAYS_PER_MONTH, "W": 7 / _DAYS_PER_MONTH, "M": 1.0, "Y": 12.0}[value[3]]
    return round(number * factor, 2)


def _parse_da(value) -> dt.date | None:
    try:
        return dt.datetime.strptime(str(value).strip(), "%Y%m%d").date()
    except ValueError:
        return None


def _dicom_age_months(ds, notes: list[str]) -> float | None:
    raw_age = str(ds.get("PatientAge", "") or "")
    if raw_age.strip():
        age = parse_dicom_age(raw_age)
        if age is not None:
            return age
        notes.append("DICOM PatientAge is malformed and was not used.")
    birth = ds.get("PatientBirthDate")
    if not birth:
        return None
    born = _parse_da(birth)
    taken = None
    for tag in ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate"):
        if ds.get(tag):
            taken = _parse_da(ds.get(tag))
            if taken:
                break
    if born is None or taken is None or taken < born:
        notes.append("DICOM birth or study date is malformed; age was not derived.")
        return None
    return round((taken - born).days / _DAYS_PER_MONTH, 2)
