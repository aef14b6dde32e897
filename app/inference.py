"""The served model: an ONNX Runtime session on CUDA when usable, else the CPU."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np

from export.modelfile import INPUT_IMAGE, INPUT_SEX, OUTPUT, open_session

log = logging.getLogger("boneage")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def choose_providers(setting: str) -> list[str]:
    """'auto' and 'cuda' ask for CUDA when this ONNX Runtime build has it; the CPU is always the fallback."""
    import onnxruntime as ort

    if setting in ("auto", "cuda") and CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    return [CPU]


class Model:
    """One session, its model file's metadata, and a ``predict`` that the batcher calls."""

    def __init__(self, path, providers: str = "auto", intra_op_threads: int = 0):
        import onnxruntime as ort

        # ORT's own multi-line CUDA-missing errors become the one warning below.
        ort.set_default_logger_severity(4)
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        requested = choose_providers(providers)
        if CUDA in requested and hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia"):
            try:  # CUDA/cuDNN from the nvidia-* wheels of the 'gpu' extra, when installed.
                ort.preload_dlls()
            except Exception as exc:
                log.debug("preload_dlls: %s", exc)
        self.session, self.file = open_session(path, requested, options)
        self.providers: list[str] = self.session.get_providers()
        if providers != "cpu" and CUDA not in self.providers:
            reason = "not in this ONNX Runtime build" if CUDA not in requested else "no usable GPU/driver"
            if providers == "cuda" or CUDA in requested:
                log.warning("CUDA execution provider requested but unusable (%s); running on the CPU", reason)
        log.info(
            "model %s %s loaded from %s; execution providers: %s",
            self.file.name,
            self.file.version,
            self.file.path,
            ", ".join(self.providers),
        )

    @property
    def spec(self):
        return self.file.spec

    def predict(self, images: np.ndarray, sex: np.ndarray) -> np.ndarray:
        """``(N, S, S, 3)`` float32 and ``(N, 1)`` float32 (male = 1) → ``(N,)`` months."""
        out = self.session.run([OUTPUT], {INPUT_IMAGE: images, INPUT_SEX: sex})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def warm_up(self, max_batch_size: int) -> None:
        """Run every batch size the batcher can form once, so no user pays for first-call setup."""
        size = self.spec.input_size
        for n in range(1, max_batch_size + 1):
            self.predict(np.zeros((n, size, size, 3), np.float32), np.zeros((n, 1), np.float32))
