"""The answer as a FHIR Observation, so a hospital's record can file it as it comes.

Built and validated with ``fhir.resources`` (its R4B models: FHIR 4.3, whose Observation is the
R4 Observation). The bone age is LOINC 85151-9 in months (UCUM ``mo``); the interpretation
comes from the classification and the reference range from the Greulich & Pyle band (chronological
age ± 2 SD), so what the record shows is what the API said. The status is *preliminary*: an
automated reading that a clinician confirms.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fhir.resources.R4B.observation import Observation

from app.schemas import BoneAgeResponse

MEDIA_TYPE = "application/fhir+json"
UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
#: classification → v3 ObservationInterpretation code (L low, N normal, H high, IND indeterminate)
INTERPRETATIONS = {
    "delayed": ("L", "Low"),
    "normal": ("N", "Normal"),
    "advanced": ("H", "High"),
    "indeterminate": ("IND", "Indeterminate"),
}


def _months(value: float) -> dict:
    return {"value": round(value, 1), "unit": "mo", "system": UCUM, "code": "mo"}


def observation(answer: BoneAgeResponse) -> dict:
    """A validated FHIR Observation (as JSON-ready dict) for one bone-age answer."""
    model = f"{answer.model.name} {answer.model.version}"
    resource: dict = {
        "resourceType": "Observation",
        "id": answer.request_id,
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                        "display": "Imaging",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": "85151-9", "display": "Bone age"}], "text": "Bone age"},
        "issued": datetime.now(UTC).isoformat(timespec="seconds"),
        "valueQuantity": _months(answer.bone_age_months),
        "method": {"text": "Greulich & Pyle, automated (deep-learning estimate from a hand radiograph)"},
        "contained": [
            {
                "resourceType": "Device",
                "id": "model",
                "deviceName": [{"name": answer.model.name, "type": "model-name"}],
                "version": [{"value": answer.model.version}],
            }
        ],
        "device": {"reference": "#model", "display": model},
        "component": [],
        "note": [{"text": text} for text in answer.notes + answer.warnings],
    }
    if answer.bone_age_interval_months is not None:
        interval = answer.bone_age_interval_months
        for bound, value in (("lower", interval.lower), ("upper", interval.upper)):
            resource["component"].append(
                {
                    "code": {"text": f"Bone age, {interval.level:.0%} prediction interval, {bound} bound"},
                    "valueQuantity": _months(value),
                }
            )
    verdict = answer.assessment
    if verdict is not None and answer.chronological_age_months is not None:
        code, display = INTERPRETATIONS[verdict.classification]
        resource["interpretation"] = [
            {"coding": [{"system": INTERPRETATION, "code": code, "display": display}], "text": verdict.statement}
        ]
        if verdict.sd_months is not None:
            age, sd = answer.chronological_age_months, verdict.sd_months
            resource["referenceRange"] = [
                {
                    "low": _months(max(age - 2 * sd, 0.0)),
                    "high": _months(age + 2 * sd),
                    "text": "Greulich & Pyle: chronological age ± 2 SD for this age and sex",
                }
            ]
        if verdict.z_score is not None:
            resource["component"].append(
                {
                    "code": {"text": "Bone age z-score (Greulich & Pyle SD)"},
                    "valueQuantity": {"value": round(verdict.z_score, 2), "unit": "SD", "system": UCUM, "code": "1"},
                }
            )
    for key in ("component", "note"):
        if not resource[key]:
            del resource[key]
    # Validation: a malformed resource raises here (a 500 in testing), never reaches a record.
    return Observation.model_validate(resource).model_dump(mode="json", exclude_none=True)
