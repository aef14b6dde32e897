"""Turning a radiograph into a model input: the one implementation.

Training, evaluation, export checks and the service all call :func:`decode` and
:func:`preprocess` from here, parametrised by the :class:`PreprocessSpec` that
travels inside the exported model.
"""

from radiograph.decode import DecodedImage, decode, decode_file
from radiograph.errors import (
    EmptyImage,
    ImageError,
    ImageTooLarge,
    ImplausibleImage,
    NotAnImage,
    TruncatedImage,
    UnsupportedFormat,
    UnsupportedTransferSyntax,
)
from radiograph.preprocess import PreprocessSpec, load_model_input, preprocess

__all__ = [
    "DecodedImage",
    "EmptyImage",
    "ImageError",
    "ImageTooLarge",
    "ImplausibleImage",
    "NotAnImage",
    "PreprocessSpec",
    "TruncatedImage",
    "UnsupportedFormat",
    "UnsupportedTransferSyntax",
    "decode",
    "decode_file",
    "load_model_input",
    "preprocess",
]
