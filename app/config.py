"""Service settings, all from environment variables prefixed ``BONEAGE_`` (see README)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from radiograph.decode import DEFAULT_MAX_PIXELS

#: The model shipped in the repository (see MODEL_CARD.md).
BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "models" / "boneage.onnx"


class Settings(BaseSettings):
    """Every operational knob of the service; defaults are chosen from bench/ (docs/benchmarks.md)."""

    model_config = SettingsConfigDict(env_prefix="BONEAGE_", env_file=None, frozen=True)

    model_path: Path = Field(BUNDLED_MODEL, description="ONNX model file written by `python -m export`.")
    providers: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto' uses CUDA when a usable GPU is present, else the CPU."
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Largest batch sent to ONNX Runtime.")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a batch waits to fill up.")
    queue_size: int = Field(
        256,
        ge=1,
        description="Prediction requests held at once (uploading, preprocessing, queued, predicting); beyond it: 503.",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="A request waiting longer answers 504.")
    max_upload_mb: float = Field(32.0, gt=0, description="Largest accepted upload; beyond it: 413.")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="Decompression-bomb guard.")
    preprocess_workers: int = Field(0, ge=0, description="Decode/preprocess threads (0 = one per core).")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads (0 = its default).")
    api_key: SecretStr | None = Field(None, description="When set, /v1 endpoints need header X-API-Key.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; empty = CORS off.")
    interval_level: float = Field(
        0.9,
        gt=0.5,
        lt=1,
        description="Coverage of the bone-age prediction interval (from the model file's conformal calibration).",
    )
    out_of_distribution: Literal["refuse", "warn"] = Field(
        "refuse",
        description="An image the model cannot rate (unlike its training radiographs): 'refuse' answers 422, "
        "'warn' answers with a warning.",
    )
    explain_concurrency: int = Field(
        2,
        ge=1,
        description="Explanations computed at once (each is grid² + 1 model inputs); more wait their turn.",
    )
    explain_batch_size: int = Field(
        4,
        ge=1,
        le=256,
        description="An explanation's occluded copies queued at a time, behind every plain request. Small "
        "keeps other clients' wait short (on a CPU the cost per image hardly depends on the batch); "
        "raise it on a GPU.",
    )
    log_level: str = "INFO"

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value):
        """``BONEAGE_API_KEY=`` (as compose passes an unset variable) means no key, not an empty one."""
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> dict[str, int]:
        """Largest request body per prediction endpoint: the image's limit plus its wrapping.

        Multipart adds form framing; JSON adds base64's 4/3 and the fields around it. The door
        (``app.admission``) refuses beyond these, and multipart parts are kept in memory up to the
        larger one, so whatever the door lets in never reaches the disk.
        """
        framing = 64 * 1024
        return {
            "/v1/bone-age": self.max_upload_bytes + framing,
            "/v1/bone-age/explain": self.max_upload_bytes + framing,
            "/v1/bone-age/json": self.max_upload_bytes * 4 // 3 + framing,
        }


@lru_cache
def get_settings() -> Settings:
    return Settings()
