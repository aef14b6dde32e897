"""The child's sex and age for an answer: from whoever sent the image, else from its DICOM header.

One rule for the service and for archive scoring (``app.score``): what the sender gives wins; the
DICOM fills what is missing; a DICOM age outside 0–300 months is not used; and a note says what
was overridden or ignored, so that nothing is changed silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.schemas import MAX_AGE_MONTHS, Sex
from radiograph import DecodedImage


@dataclass
class PatientFacts:
    sex: Sex | None  # None: neither given nor in the file
    sex_source: str | None
    age_months: float | None
    age_source: str | None
    notes: list[str] = field(default_factory=list)


def patient_facts(
    decoded: DecodedImage, sex: Sex | None, age_months: float | None, given_by: str = "request"
) -> PatientFacts:
    """Sex and age from the sender (``given_by``: 'request', 'record'), else from the DICOM."""
    notes = list(decoded.notes)
    if sex:
        used_sex, sex_source = sex, given_by
        if decoded.sex and decoded.sex != sex:
            notes.append(
                f"The DICOM's PatientSex ({decoded.sex}) differs from the {given_by}; the {given_by} was used."
            )
    elif decoded.sex:
        used_sex, sex_source = decoded.sex, "dicom"
    else:
        used_sex, sex_source = None, None
    age_source = given_by if age_months is not None else None
    if age_months is None and decoded.age_months is not None:
        if 0 < decoded.age_months <= MAX_AGE_MONTHS:
            age_months, age_source = decoded.age_months, "dicom"
        else:
            notes.append("The DICOM's patient age is outside 0–300 months and was not used.")
    return PatientFacts(used_sex, sex_source, age_months, age_source, notes)
