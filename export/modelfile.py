"""The bundled model file: an ONNX graph that carries its own preprocessing spec and metadata.

Reading needs ONNX Runtime only (no TensorFlow), so the service, the verify command and the
benchmarks share this one loader. A file that is missing, truncated, not ONNX, or an ONNX
model without our metadata is refused with a message naming the file and the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from export.calibration import FeatureGate, IntervalModel
from radiograph import PreprocessSpec

#: Every metadata key we write starts with this, so foreign keys never collide.
PREFIX = "boneage."
SPEC_KEY = PREFIX + "preprocessing"
FORMAT_VERSION = "1"

INPUT_IMAGE, INPUT_SEX, OUTPUT = "image", "sex", "bone_age_months"
#: Optional second output: the pooled image features the out-of-distribution gate scores.
FEATURES = "image_features"
#: ``weights_storage`` of a file whose convolution weights are stored as int8 and computed in float32.
INT8_WEIGHTS = "int8-weights"
#: ONNX Runtime's session option that lets constant folding dequantise int8 initializers at load.
FOLD_DEQUANTIZE = "session.disable_quant_qdq"


class ModelFileError(RuntimeError):
    """The model file cannot be served; the message names the file and what is wrong."""


@dataclass
class ModelFile:
    """What the service needs to know about a model, read from the file alone."""

    path: Path
    spec: PreprocessSpec
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.metadata.get("model_name", self.path.stem))

    @property
    def version(self) -> str:
        return str(self.metadata.get("model_version", "unknown"))

    interval: IntervalModel | None = None
    gate: FeatureGate | None = None
    has_features: bool = False

    def public_metadata(self) -> dict[str, Any]:
        """The metadata without the calibration's raw statistics (hundreds of kB of residuals and arrays)."""
        return {k: v for k, v in self.metadata.items() if k not in ("interval", "gate")}

    def calibration_summary(self) -> dict[str, Any]:
        """What the interval and gate are, in a few lines: method, sizes, bands and threshold."""
        out: dict[str, Any] = {"interval": None, "gate": None}
        if self.interval is not None:
            raw = self.metadata["interval"]
            out["interval"] = {
                "method": raw.get("method"),
                "validation_images": raw.get("validation_images"),
                "max_level": round(self.interval.max_level(), 4),
                "bands": self.interval.bands(),
            }
        if self.gate is not None:
            raw = self.metadata["gate"]
            out["gate"] = {
                "method": raw.get("method"),
                "threshold": self.gate.threshold,
                "percentile": self.gate.percentile,
                "components": int(self.gate.components.shape[0]),
                "training_images": raw.get("training_images"),
            }
        return out


def decode_metadata(props: dict[str, str]) -> dict[str, Any]:
    """ONNX metadata strings → values (our keys hold JSON), without the prefix."""
    out: dict[str, Any] = {}
    for key, raw in props.items():
        if not key.startswith(PREFIX) or key == SPEC_KEY:  # The spec is read (and validated) on its own.
            continue
        try:
            out[key[len(PREFIX) :]] = json.loads(raw)
        except json.JSONDecodeError:
            out[key[len(PREFIX) :]] = raw
    return out


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """Values → ONNX metadata strings (JSON), with the prefix."""
    return {PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in values.items()}


def open_session(path: str | Path, providers: list | None = None, options=None):
    """Load and check a model file → ``(onnxruntime.InferenceSession, ModelFile)``."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: model file is empty")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for every kind of bad file.
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelFileError(f"{path}: not a readable ONNX model (truncated or foreign file?): {reason}") from None
    props = session.get_modelmeta().custom_metadata_map
    if SPEC_KEY not in props:
        raise ModelFileError(
            f"{path}: ONNX model has no '{SPEC_KEY}' metadata, so its preprocessing is unknown; "
            "export models with `python -m export`"
        )
    try:
        spec = PreprocessSpec.from_json(props[SPEC_KEY])
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    if set(inputs) != {INPUT_IMAGE, INPUT_SEX} or sorted(outputs) not in ([OUTPUT], sorted([OUTPUT, FEATURES])):
        raise ModelFileError(
            f"{path}: expected inputs image, sex and outputs bone_age_months (+ image_features); "
            f"got {sorted(inputs)} → {outputs}"
        )
    if list(inputs[INPUT_IMAGE][1:]) != [spec.input_size, spec.input_size, spec.channels]:
        raise ModelFileError(
            f"{path}: image input shape {inputs[INPUT_IMAGE]} does not match the spec's "
            f"{spec.input_size}×{spec.input_size}×{spec.channels}"
        )
    metadata = decode_metadata(props)
    if metadata.get("weights_storage") == INT8_WEIGHTS:
        # int8-stored weights are dequantised once, at load: by default ONNX Runtime keeps every
        # DequantizeLinear for its int8 kernels and would re-run them on every call (~1.6× slower
        # at batch 1 here). So the file is opened again, told that it has no int8 kernels to keep.
        # (``options``, when given, gets that entry too.)
        del session  # one session in memory at a time
        options = options or ort.SessionOptions()
        options.add_session_config_entry(FOLD_DEQUANTIZE, "1")
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ModelFileError(f"{path}: its int8-stored weights could not be loaded: {exc}") from None
    try:
        interval = IntervalModel.from_dict(metadata["interval"]) if "interval" in metadata else None
        gate = FeatureGate.from_dict(metadata["gate"]) if "gate" in metadata else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{path}: its calibration metadata is unreadable: {exc}") from None
    if gate is not None and FEATURES not in outputs:
        raise ModelFileError(f"{path}: has a feature gate but no '{FEATURES}' output")
    return session, ModelFile(
        path=path, spec=spec, metadata=metadata, interval=interval, gate=gate, has_features=FEATURES in outputs
    )
