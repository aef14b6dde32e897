"""Images the service must refuse: real pictures that are not a child's hand radiograph.

Two sources, both real and reproducible on any machine that installs the project:

- pictures shipped inside installed packages: scikit-image's sample data (photographs,
  micrographs, astronomy, text, a CT phantom) and pydicom's test files (CT, MR, RT dose,
  ultrasound and colour secondary captures);
- hard cases made from real hand radiographs: inverted, rotated a quarter turn, the
  fingers alone, two hands side by side, and a screenshot with a viewer's interface round it.

Each item is ``(name, file bytes)``, sent to the service as a user would send it.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: pydicom test files that hold an uncompressed, single-frame picture (not a hand).
PYDICOM_FILES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "liver_1frame.dcm",
    "rtdose_1frame.dcm",
    "examples_rgb_color.dcm",
    "examples_ybr_color.dcm",
    "examples_palette.dcm",
    "examples_overlay.dcm",
    "image_dfl.dcm",
)
#: scikit-image sample pictures left out: too small to be any radiograph (the service already
#: refuses them as blank or implausible) or not a still picture.
SKIMAGE_SKIP = {"no_time_for_that_tiny.gif", "multipage.tif", "multipage_rgb.tif", "chessboard_RGB.png"}


def packaged() -> list[tuple[str, bytes]]:
    """Pictures from scikit-image's and pydicom's own data folders."""
    import pydicom
    import skimage

    items = []
    folder = Path(skimage.__file__).parent / "data"
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in (".png", ".jpg", ".jpeg") and path.name not in SKIMAGE_SKIP:
            items.append((f"skimage/{path.name}", path.read_bytes()))
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in PYDICOM_FILES:
        if (folder / name).is_file():
            items.append((f"pydicom/{name}", (folder / name).read_bytes()))
    return items


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _grey8(path: Path) -> np.ndarray:
    """A real radiograph as 8-bit grey, through the project's own decoder (PNG, JPEG or DICOM)."""
    from radiograph import decode_file

    pixels = decode_file(path).pixels
    if pixels.dtype.kind == "u":  # 8/16-bit files decode to their own levels; this recipe works on fractions
        pixels = pixels.astype(np.float32) / np.float32(np.iinfo(pixels.dtype).max)
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    return (np.clip((pixels - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def screenshot(hand: np.ndarray) -> np.ndarray:
    """The radiograph inside a viewer's window: title bar, toolbar, side panel with text, status bar."""
    h, w = hand.shape
    canvas = Image.new("RGB", (w + w // 2 + 40, h + 160), (236, 236, 240))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, canvas.width, 40), fill=(40, 60, 110))
    draw.text((12, 12), "PACS Viewer - Study 1 of 3 - Series 2", fill=(255, 255, 255))
    for i in range(12):
        draw.rectangle((10 + i * 46, 50, 46 + i * 46, 86), fill=(200, 200, 210), outline=(120, 120, 130))
    canvas.paste(Image.fromarray(hand).convert("RGB"), (20, 100))
    for i in range(14):
        draw.text((w + 40, 110 + i * 22), f"Series {i + 1}   DX   2 images", fill=(30, 30, 30))
    draw.rectangle((0, canvas.height - 40, canvas.width, canvas.height), fill=(210, 210, 215))
    draw.text((12, canvas.height - 28), "W: 4095 L: 2047   Zoom 100%", fill=(20, 20, 20))
    return np.asarray(canvas)


def made_from_hands(paths: Iterable[Path]) -> list[tuple[str, bytes]]:
    """Hard cases from real hand radiographs: each is still a radiograph of a hand, but not a ratable one."""
    items = []
    hands = [(Path(p).stem, _grey8(Path(p))) for p in paths]
    for name, hand in hands:
        h = hand.shape[0]
        items += [
            (f"{name} inverted", _png(255 - hand)),
            (f"{name} rotated 90°", _png(np.ascontiguousarray(np.rot90(hand)))),
            (f"{name} fingers only", _png(hand[: int(h * 0.35)])),
            (f"{name} in a viewer screenshot", _png(screenshot(hand))),
        ]
    for (a, left), (b, right) in itertools.pairwise(hands):
        height = min(left.shape[0], right.shape[0])
        pair = np.concatenate([left[:height], right[:height]], axis=1)
        items.append((f"{a} and {b} side by side", _png(pair)))
    return items
