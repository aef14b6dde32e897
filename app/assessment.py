"""Bone age vs. chronological age: SD, z-score and delayed / normal / advanced.

The SD of bone age for a child's age and sex comes from the Greulich & Pyle (Brush
Foundation) table shipped in ``app/reference`` (Greulich WW, Pyle SI. Radiographic Atlas
of Skeletal Development of the Hand and Wrist, 2nd ed. Stanford University Press, 1959).
Between table ages the SD is interpolated linearly; outside the table (boys 3–204 months,
girls 3–192 months) no SD exists and none is invented.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

TABLE = Path(__file__).parent / "reference" / "greulich-pyle-brush-sd.csv"
SD_SOURCE = (
    "Greulich & Pyle (Brush Foundation) SD of skeletal age; Greulich WW, Pyle SI, "
    "Radiographic Atlas of Skeletal Development of the Hand and Wrist, 2nd ed., 1959"
)
SD_METHOD = "linear interpolation between table ages"

Classification = Literal["delayed", "normal", "advanced", "indeterminate"]


#: The classification rule, in words (API schema, README and every answer's statement agree with it).
RULE = (
    "delayed or advanced only when the model's whole prediction interval for bone age lies beyond "
    "chronological age ∓ 2 SD; normal when the estimate lies within ±2 SD; indeterminate when the estimate "
    "lies beyond ±2 SD but the interval reaches back into the normal range, or when no SD exists for the age"
)


@dataclass(frozen=True)
class Assessment:
    difference_months: float
    sd_months: float | None
    z_score: float | None
    classification: Classification
    statement: str
    z_score_interval: tuple[float, float] | None = None


@lru_cache
def sd_table() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Sex ('male'/'female') → (ages in months, SD in months), sorted by age."""
    rows: dict[str, list[tuple[float, float]]] = {"male": [], "female": []}
    with TABLE.open() as fh:
        for row in csv.DictReader(fh):
            sex = "male" if row["sex"] == "M" else "female"
            rows[sex].append((float(row["chronological_age_months"]), float(row["sd_months"])))
    return {sex: tuple(np.array(col) for col in zip(*sorted(points), strict=True)) for sex, points in rows.items()}


def sd_for_age(sex: str, age_months: float) -> float | None:
    """SD of bone age at this chronological age, or None outside the table's range."""
    ages, sds = sd_table()[sex]
    if not ages[0] <= age_months <= ages[-1]:
        return None
    return float(np.interp(age_months, ages, sds))


def assess(
    bone_age_months: float,
    chronological_age_months: float,
    sex: str,
    interval: tuple[float, float] | None = None,
    level: float = 0.9,
) -> Assessment:
    """Compare bone age with chronological age by the ±2 SD rule, without outrunning the model.

    ``interval`` is the model's prediction interval for the bone age at ``level``. The z-score
    carries it as ``z_score_interval``; delayed/advanced needs the whole interval beyond ±2 SD
    (see :data:`RULE`). Without an interval the plain ±2 SD rule applies and the statement says so.
    """
    difference = bone_age_months - chronological_age_months
    sd = sd_for_age(sex, chronological_age_months)
    if sd is None:
        ages = sd_table()[sex][0]
        return Assessment(
            round(difference, 1),
            None,
            None,
            "indeterminate",
            f"No Greulich & Pyle SD exists for a {sex} child aged {chronological_age_months:.1f} months "
            f"(table covers {ages[0]:.0f}–{ages[-1]:.0f} months); no z-score is given.",
        )
    z = difference / sd
    gap = (
        f"Bone age is {abs(difference):.1f} months {'ahead of' if difference >= 0 else 'behind'} "
        f"chronological age (z = {z:+.2f})"
    )
    if interval is None:
        label: Classification = "delayed" if z < -2 else "advanced" if z > 2 else "normal"
        word = {"delayed": "below", "advanced": "above", "normal": "within"}[label]
        statement = (
            f"{gap}, {word} the ±2 SD range: {label}. This model file carries no prediction interval, "
            "so the model's own error is not taken into account."
        )
        return Assessment(round(difference, 1), round(sd, 2), round(z, 2), label, statement)

    lower, upper = interval
    z_lo, z_hi = (lower - chronological_age_months) / sd, (upper - chronological_age_months) / sd
    span = f"the model's {level:.0%} interval ({lower:.0f}–{upper:.0f} months, z {z_lo:+.1f} to {z_hi:+.1f})"
    if z_hi < -2:
        label, statement = "delayed", f"{gap}, and {span} lies wholly below −2 SD: delayed."
    elif z_lo > 2:
        label, statement = "advanced", f"{gap}, and {span} lies wholly above +2 SD: advanced."
    elif abs(z) <= 2:
        label = "normal"
        beyond = [side for side, out in (("a delay", z_lo < -2), ("an advance", z_hi > 2)) if out]
        caveat = f"; {span} reaches beyond ±2 SD, so {' or '.join(beyond)} cannot be excluded" if beyond else ""
        statement = f"{gap}, within the ±2 SD range: normal{caveat}."
    else:
        label = "indeterminate"
        side = "below −2 SD" if z < -2 else "above +2 SD"
        statement = (
            f"{gap}, {side}, but {span} reaches back into the normal range: the model's own error is too "
            f"large to call it {'delayed' if z < -2 else 'advanced'}. Indeterminate."
        )
    return Assessment(
        round(difference, 1), round(sd, 2), round(z, 2), label, statement, (round(z_lo, 2), round(z_hi, 2))
    )
