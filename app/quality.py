"""The quality gate: say when an image is not one the model can rate.

A regression model gives a number for anything. Two kinds of evidence say the number
means nothing:

- the file itself, before the model: a colour photograph or a screenshot with coloured bars is
  not a radiograph, and a picture wider than tall is no upright hand (turned, cropped to the
  fingers, or two hands);
- the model's own view: its pooled image features lie far from those of the training
  radiographs (the model file's :class:`export.calibration.FeatureGate`, threshold at a
  high percentile of held-out validation radiographs).

Each finding is a sentence for the user. The service refuses (422, problem type
:data:`PROBLEM_TYPE`) or, when configured to warn, answers with the findings as warnings.
"""

from __future__ import annotations

from export.calibration import FeatureGate
from radiograph import DecodedImage

#: Problem type of a refusal (RFC 9457 ``type``; relative to the service, documented there).
PROBLEM_TYPE = "/problems/out-of-distribution"
PROBLEM_TITLE = "Image cannot be rated"

#: Colourfulness (Hasler & Süsstrunk, 0–255 scale) above which a file is a colour photograph.
#: Grey radiographs saved as RGB score 0; phone photos of a film or a screen, tinted by the
#: light, score up to ~16 in the hospital set; everyday colour photographs score 30 and more.
MAX_COLOURFULNESS = 25.0

#: Fraction of the picture in strong colour (``radiograph.decode.STRONG_CHROMA``) above which it is
#: not the radiograph alone: a screenshot with a viewer's coloured bars, or a photograph whose
#: colour is in one part. Real hand radiographs measured here: 0 except one phone photo of a film
#: (0.4%); viewer screenshots 2.4–5.8%.
MAX_COLOURED_FRACTION = 0.01


#: Width / height of the picture inside its borders above which it is no upright hand radiograph.
#: Real ones measured here (300 half- and 21 full-resolution RSNA, 16 hospital, 10 infant, 1 DICOM)
#: are at most 1.19 wide for 1 high (median 0.77); a hand turned a quarter, the fingers alone or two
#: hands side by side are wider, and the model, which squares every picture, cannot tell.
MAX_WIDTH_TO_HEIGHT = 1.25


#: Above both (median of the picture's outer frame, and of the whole picture, after normalisation to
#: [0, 1]) a picture is an inverted radiograph: white background, dark bones. Measured here: of
#: 11,703 real hand radiographs (RSNA training set, half- and full-resolution sets, hospital, infant,
#: DICOM) none has both above 0.9 (six photographed films have a bright surround, with a whole-picture
#: median up to 0.88); inverted hands have both at 0.94–1.0.
MAX_INVERTED_BRIGHTNESS = 0.9


def file_findings(decoded: DecodedImage) -> list[str]:
    """What the file alone shows (before the model runs)."""
    findings = []
    if decoded.colourfulness is not None and decoded.colourfulness > MAX_COLOURFULNESS:
        findings.append(
            f"The picture is in colour (colourfulness {decoded.colourfulness:.0f}, a radiograph's is near 0): "
            "it looks like a photograph, not a radiograph."
        )
    elif decoded.coloured_fraction is not None and decoded.coloured_fraction > MAX_COLOURED_FRACTION:
        findings.append(
            f"{decoded.coloured_fraction:.1%} of the picture is in strong colour, which a radiograph never is: it "
            "looks like a screenshot (a viewer's window around the image) or a photograph. Send the radiograph "
            "itself, exported from the viewer or PACS (DICOM where possible)."
        )
    if decoded.content_shape is not None:
        h, w = decoded.content_shape
        if w > MAX_WIDTH_TO_HEIGHT * h:
            findings.append(
                f"The picture is {w / h:.2f} times as wide as it is tall (inside its borders): a hand radiograph "
                "is upright and taller than wide. It may be turned on its side, cropped to the fingers, or show "
                "both hands; send one upright posteroanterior view of the left hand."
            )
    if decoded.brightness is not None and min(decoded.brightness) > MAX_INVERTED_BRIGHTNESS:
        findings.append(
            "The picture looks inverted: its background is white and the bones dark, where a radiograph shows "
            "bone white on a dark background. Send the radiograph as the modality stored it (DICOM where possible)."
        )
    return findings


def feature_findings(distance: float | None, gate: FeatureGate | None) -> list[str]:
    """What the model's features show: an image unlike the radiographs it was trained on."""
    if gate is None or distance is None or distance <= gate.threshold:
        return []
    return [
        f"The image is unlike the children's hand radiographs the model was trained on (feature distance "
        f"{distance:.2f}; {gate.percentile:g}% of held-out training radiographs score at most {gate.threshold:.2f}). "
        "It may not be a left-hand radiograph of a child, or it may be inverted, rotated, cropped, or a photo "
        "of a screen. Send the original radiograph (DICOM where possible)."
    ]
