"""Typed errors for images that cannot become a model input.

Every failure carries a plain message a clinician can act on, and a ``status`` the
service maps straight onto an HTTP status, so the mapping lives in one place.
"""

from __future__ import annotations


class ImageError(ValueError):
    """An upload could not be turned into a model input."""

    status: int = 400
    title: str = "Unusable image"


class NotAnImage(ImageError):
    """The bytes are not a recognisable image file."""

    title = "Not an image"


class EmptyImage(ImageError):
    """The file is empty, has no pixels, or holds a blank (uniform) picture."""

    title = "Empty image"


class ImplausibleImage(ImageError):
    """Decodable, but cannot be a hand radiograph (e.g. a thin strip)."""

    title = "Not a hand radiograph"


class TruncatedImage(ImageError):
    """The file starts like an image but its data is cut short or corrupt."""

    title = "Truncated or corrupt image"


class UnsupportedFormat(ImageError):
    """A real image, but in a format or encoding the service does not read."""

    status = 415
    title = "Unsupported image format"


class UnsupportedTransferSyntax(UnsupportedFormat):
    """A DICOM file whose pixel data is compressed in a way we cannot decode."""

    title = "Unsupported DICOM transfer syntax"


class ImageTooLarge(ImageError):
    """More pixels than the configured limit (protects against decompression bombs)."""

    status = 413
    title = "Image too large"
