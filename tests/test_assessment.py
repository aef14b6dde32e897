"""Bone age vs. chronological age against the Greulich & Pyle (Brush) SD table, by hand."""

from __future__ import annotations

import pytest

from app.assessment import assess, sd_for_age


@pytest.mark.parametrize(
    ("sex", "age", "sd"),
    [
        ("male", 3, 0.69),
        ("male", 60, 8.79),
        ("male", 204, 13.05),
        ("female", 84, 9.64),
        ("female", 192, 7.31),
        ("female", 3, 0.72),
    ],
)
def test_sd_at_table_points(sex, age, sd):
    assert sd_for_age(sex, age) == pytest.approx(sd)


def test_sd_between_table_points_is_linear():
    # Boys 60 → 8.79, 72 → 9.17: at 66 months halfway, at 63 a quarter of the way.
    assert sd_for_age("male", 66) == pytest.approx((8.79 + 9.17) / 2)
    assert sd_for_age("male", 63) == pytest.approx(8.79 + 0.25 * (9.17 - 8.79))
    # Girls 180 → 9.23, 192 → 7.31.
    assert sd_for_age("female", 186) == pytest.approx((9.23 + 7.31) / 2)


@pytest.mark.parametrize(("sex", "age"), [("male", 2.9), ("male", 205), ("female", 193), ("female", 1)])
def test_no_sd_outside_the_table(sex, age):
    assert sd_for_age(sex, age) is None
    result = assess(100, age, sex)
    assert result.classification == "indeterminate" and result.z_score is None and result.sd_months is None
    assert "No Greulich & Pyle SD exists" in result.statement


def test_z_score_and_classification_by_hand():
    # Girl, 84 months, SD 9.64: bone age 110 → +26 months, z = 26 / 9.64 = 2.697 → advanced.
    a = assess(110, 84, "female")
    assert (a.difference_months, a.sd_months, a.z_score, a.classification) == (26.0, 9.64, 2.7, "advanced")
    # Boy, 66 months, SD 8.98: bone age 50 → −16, z = −1.78 → normal.
    b = assess(50, 66, "male")
    assert b.z_score == pytest.approx(-16 / 8.98, abs=0.005) and b.classification == "normal"
    # Boy, 120 months, SD 9.79: bone age 99 → −21, z = −2.145 → delayed.
    assert assess(99, 120, "male").classification == "delayed"


def test_exactly_two_sd_is_still_normal():
    assert assess(84 + 2 * 9.64, 84, "female").classification == "normal"


# Girl, 84 months, SD 9.64: the normal range is 84 ± 19.28 = 64.72–103.28 months.
@pytest.mark.parametrize(
    ("bone_age", "interval", "label", "words"),
    [
        (130, (110, 150), "advanced", "lies wholly above +2 SD"),
        (50, (40, 60), "delayed", "lies wholly below −2 SD"),
        (110, (95, 125), "indeterminate", "too large to call it advanced"),
        (60, (45, 75), "indeterminate", "too large to call it delayed"),
        (90, (70, 110), "normal", "an advance cannot be excluded"),
        (84, (60, 108), "normal", "a delay or an advance cannot be excluded"),
    ],
)
def test_delayed_or_advanced_only_when_the_whole_interval_lies_beyond_two_sd(bone_age, interval, label, words):
    a = assess(bone_age, 84, "female", interval, 0.9)
    assert a.classification == label and words in a.statement
    assert a.z_score_interval == (round((interval[0] - 84) / 9.64, 2), round((interval[1] - 84) / 9.64, 2))
    assert "90% interval" in a.statement


def test_a_narrow_interval_inside_the_range_is_plainly_normal():
    a = assess(90, 84, "female", (80, 100), 0.9)
    assert a.classification == "normal" and "cannot be excluded" not in a.statement


def test_without_an_interval_the_plain_rule_applies_and_says_so():
    a = assess(110, 84, "female")
    assert a.classification == "advanced" and a.z_score_interval is None
    assert "no prediction interval" in a.statement
