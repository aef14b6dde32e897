"""The served model: an ONNX Runtime session on CUDA when usable, else the CPU."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import numpy as np

from export.modelfile import FEATURES, INPUT_IMAGE, INPUT_SEX, OUTPUT, open_session

log = logging.getLogger("boneage")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
#: ONNX Runtime's default log severity (0 verbose … 4 fatal).
ORT_WARNING = 2


class ProviderUnavailable(RuntimeError):
    """An explicitly requested execution provider cannot be used; the service must not start."""


def choose_providers(setting: str) -> list[str]:
    """'auto' and 'cuda' ask for CUDA when this ONNX Runtime build has it, with the CPU after it.

    Whether CUDA really runs is known only once a session exists: :class:`Model` then falls back
    to the CPU for 'auto' and refuses to start for 'cuda'.
    """
    import onnxruntime as ort

    if setting in ("auto", "cuda") and CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


@dataclass(frozen=True)
class Prediction:
    """One image's answer from one session call."""

    months: float
    #: How far the image's features lie from the training images' (None: the file has no gate).
    distance: float | None = None


class Model:
    """One session, its model file's metadata, and a ``predict`` that the batcher calls."""

    def __init__(self, path, providers: str = "auto", intra_op_threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        requested = choose_providers(providers)
        if CUDA in requested and hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia"):
            try:  # CUDA/cuDNN from the nvidia-* wheels of the 'gpu' extra, when installed.
                ort.preload_dlls()
            except Exception as exc:
                log.debug("preload_dlls: %s", exc)
        # With 'auto', trying CUDA on a machine without a GPU makes ORT print multi-line errors that
        # the one warning below replaces; its log is silenced for that attempt only, never otherwise.
        quiet = providers == "auto" and CUDA in requested
        if quiet:
            ort.set_default_logger_severity(4)
        try:
            self.session, self.file = open_session(path, requested, options)
        finally:
            if quiet:
                ort.set_default_logger_severity(ORT_WARNING)
        self.providers: list[str] = self.session.get_providers()
        if providers != "cpu" and CUDA not in self.providers:
            reason = "not in this ONNX Runtime build" if CUDA not in requested else "no usable GPU/driver"
            if providers == "cuda":
                raise ProviderUnavailable(
                    f"BONEAGE_PROVIDERS=cuda, but the CUDA execution provider is unusable ({reason}). "
                    "Use BONEAGE_PROVIDERS=auto to fall back to the CPU, or fix the GPU setup."
                )
            if CUDA in requested:
                log.warning("CUDA execution provider requested but unusable (%s); running on the CPU", reason)
        log.info(
            "model %s %s loaded from %s; execution providers: %s",
            self.file.name,
            self.file.version,
            self.file.path,
            ", ".join(self.providers),
        )
        if self.file.interval is None:
            log.warning("this model file carries no prediction interval: answers come without one")
        if self.file.gate is None:
            log.warning("this model file carries no out-of-distribution gate: no image is refused by its features")
        self._outputs = [OUTPUT, FEATURES] if self.file.gate is not None else [OUTPUT]

    @property
    def spec(self):
        return self.file.spec

    def predict(self, images: np.ndarray, sex: np.ndarray) -> list[Prediction]:
        """``(N, S, S, 3)`` float32 and ``(N, 1)`` float32 (male = 1) → one :class:`Prediction` per image."""
        out = self.session.run(self._outputs, {INPUT_IMAGE: images, INPUT_SEX: sex})
        months = np.asarray(out[0], dtype=np.float64).reshape(-1)
        if self.file.gate is None:
            return [Prediction(float(m)) for m in months]
        distances = self.file.gate.scores(out[1])
        return [Prediction(float(m), float(d)) for m, d in zip(months, distances, strict=True)]

    def warm_up(self, max_batch_size: int) -> list[int]:
        """Run the smallest and the largest batch once, so no user pays for first-call setup.

        The first call of a session (about 75 ms more than the next at batch 1 here) and the first at
        the largest batch (its memory arena grows: about 0.5 s more at 16) are what cost. A batch size
        in between costs at most a few per cent more on its first call once those two have run
        (measured on the ensemble at batch 3, 5, 7 and 12), while running every size from 1 to 16
        would hold readiness back by 136 images, about 15 s on two cores. On CUDA every size is run:
        cuDNN may search convolution algorithms for each new shape, and that was not measured here.
        Returns the sizes run.
        """
        size = self.spec.input_size
        every = CUDA in self.providers
        sizes = list(range(1, max_batch_size + 1)) if every else sorted({1, max_batch_size})
        for n in sizes:
            self.predict(np.zeros((n, size, size, 3), np.float32), np.zeros((n, 1), np.float32))
        return sizes
