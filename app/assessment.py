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


@dataclass(frozen=True)
class Assessment:
    difference_months: float
    sd_months: float | None
    z_score: float | None
    classification: Classification
    statement: str


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


def assess(bone_age_months: float, chronological_age_months: float, sex: str) -> Assessment:
    """Compare bone age to chronological age with the ±2 SD rule."""
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
    label: Classification = "delayed" if z < -2 else "advanced" if z > 2 else "normal"
    word = {"delayed": "below", "advanced": "above", "normal": "within"}[label]
    statement = (
        f"Bone age is {abs(difference):.1f} months {'ahead of' if difference >= 0 else 'behind'} "
        f"chronological age (z = {z:+.2f}), {word} the ±2 SD range: {label}."
    )
    return Assessment(round(difference, 1), round(sd, 2), round(z, 2), label, statement)
