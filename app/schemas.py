"""Request and response models; their examples are what /docs shows users."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from app.assessment import RULE, Classification

Sex = Literal["male", "female"]
MAX_AGE_MONTHS = 300.0
_SEX_SPELLINGS = {"male": "male", "m": "male", "female": "female", "f": "female"}


def canonical_sex(value: object) -> object:
    """'M', 'f', 'Male', ' FEMALE '… → 'male'/'female'; anything else is left for validation to reject.

    The schema advertises only the two canonical values: client generators turn enum values into
    identifiers, and case variants ('M'/'m') collide there. Validation still accepts the variants
    that DICOM (PatientSex 'M'/'F') and people write.
    """
    if isinstance(value, str):
        return _SEX_SPELLINGS.get(value.strip().lower(), value)
    return value


#: Request-side sex: canonical in the OpenAPI document, forgiving in validation.
SexIn = Annotated[Sex, BeforeValidator(canonical_sex)]


class BoneAgeJsonRequest(BaseModel):
    """A radiograph sent as base64 in JSON (for clients that cannot send multipart)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"image": "iVBORw0KGgoAAAANSUhEUgAA…", "sex": "female", "chronological_age_months": 84}]
        },
    )

    image: str = Field(..., min_length=1, description="PNG, JPEG or DICOM file, base64-encoded.")
    sex: SexIn | None = Field(
        None, description="male or female (M/F and other cases accepted); optional when a DICOM carries PatientSex."
    )
    chronological_age_months: float | None = Field(
        None, gt=0, le=MAX_AGE_MONTHS, description="Child's age; optional, taken from a DICOM when absent."
    )

    @field_validator("image")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()


class Assessment(BaseModel):
    difference_months: float = Field(description="Bone age − chronological age.")
    sd_months: float | None = Field(description="SD of bone age for this age and sex; null outside the table.")
    z_score: float | None
    z_score_interval: tuple[float, float] | None = Field(
        None, description="The z-score's own uncertainty: the bone-age interval expressed in SDs (null without one)."
    )
    classification: Classification = Field(description=f"Rule: {RULE}.")
    statement: str = Field(description="The comparison and the classification's reason in words.")
    rule: str = Field(RULE, description="The classification rule in words.")
    sd_source: str
    sd_method: str


class Interval(BaseModel):
    """A prediction interval: the true bone age lies in [lower, upper] with probability ``level``."""

    lower: float
    upper: float
    level: float = Field(description="Coverage, e.g. 0.9 for a 90% interval.")


class ModelRef(BaseModel):
    name: str
    version: str


class BoneAgeResponse(BaseModel):
    """The bone age, and how it compares with the child's age when that is known."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "6f1c2b7e9a4d4f0e8b1a2c3d4e5f6a7b",
                    "bone_age_months": 101.3,
                    "bone_age_years": 8.4,
                    "bone_age_interval_months": {"lower": 86.5, "upper": 118.0, "level": 0.9},
                    "bone_age_interval_years": {"lower": 7.2, "upper": 9.8, "level": 0.9},
                    "sex": "female",
                    "sex_source": "dicom",
                    "chronological_age_months": 84.0,
                    "chronological_age_source": "dicom",
                    "assessment": {
                        "difference_months": 17.3,
                        "sd_months": 9.64,
                        "z_score": 1.79,
                        "z_score_interval": [0.26, 3.53],
                        "classification": "normal",
                        "statement": "Bone age is 17.3 months ahead of chronological age (z = +1.79), within the ±2 SD "
                        "range: normal; the model's 90% interval (86–118 months, z +0.3 to +3.5) reaches beyond "
                        "±2 SD, so an advance cannot be excluded.",
                        "rule": RULE,
                        "sd_source": "Greulich & Pyle (Brush Foundation) SD of skeletal age; …",
                        "sd_method": "linear interpolation between table ages",
                    },
                    "model": {"name": "boneage-xception-ensemble", "version": "xception-ensemble-v1.4"},
                    "notes": [],
                    "warnings": [],
                }
            ]
        }
    )

    request_id: str
    bone_age_months: float = Field(description="Predicted bone age, one decimal.")
    bone_age_years: float = Field(description="The same in years, one decimal.")
    bone_age_interval_months: Interval | None = Field(
        None,
        description="Prediction interval for the bone age (split-conformal, from the model's validation error by "
        "predicted-age band); null when the model file carries no calibration.",
    )
    bone_age_interval_years: Interval | None = Field(None, description="The same interval in years.")
    sex: Sex
    sex_source: Literal["request", "dicom"]
    chronological_age_months: float | None = None
    chronological_age_source: Literal["request", "dicom"] | None = None
    assessment: Assessment | None = Field(None, description="Present when the chronological age is known.")
    model: ModelRef
    notes: list[str] = Field(default_factory=list, description="Anything the user should know about this answer.")
    warnings: list[str] = Field(
        default_factory=list,
        description="Why this image may not be ratable (only when the service is set to warn instead of refusing).",
    )


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    request_timeout_s: float


class ModelInfo(BaseModel):
    """What is being served, read from the model file itself."""

    name: str
    version: str
    input_size: int
    preprocessing: dict
    execution_providers: list[str]
    batching: BatchingInfo
    interval: dict | None = Field(
        None, description="How answers get their prediction interval (null: this model file has none)."
    )
    gate: dict | None = Field(
        None, description="The out-of-distribution gate: method, threshold and action (null: this model file has none)."
    )
    metadata: dict


class Health(BaseModel):
    status: Literal["ok", "ready", "not ready"]
    detail: str | None = None


class Problem(BaseModel):
    """RFC 9457 problem details, returned as application/problem+json for every error."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": "about:blank",
                    "title": "Not an image",
                    "status": 400,
                    "detail": "The file is not a recognisable image. Send a PNG, JPEG or DICOM radiograph.",
                    "instance": "/v1/bone-age",
                    "request_id": "6f1c2b7e9a4d4f0e8b1a2c3d4e5f6a7b",
                }
            ]
        }
    )

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[dict] | None = None


class Explanation(BaseModel):
    """Where covering the radiograph changed the bone age: a qualitative aid, not evidence."""

    method: str
    caveat: str
    grid: int = Field(description="Squares per side; ``change_months`` is grid × grid, row by row from the top.")
    change_months: list[list[float]] = Field(
        description="Bone age with the square covered − bone age of the whole image (months)."
    )
    input_png_base64: str = Field(description="The model's input: the radiograph as the model saw it, PNG.")
    overlay_png_base64: str = Field(description="The same with the |change| blended over it, PNG.")
    model_inputs: int = Field(description="Model inputs this explanation cost (grid² occluded copies + the image).")
    seconds: float = Field(description="Time to answer, explanation included.")


class ExplainResponse(BaseModel):
    bone_age: BoneAgeResponse
    explanation: Explanation
