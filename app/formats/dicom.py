"""The answer back into PACS: a DICOM Structured Report and a Secondary Capture of the heatmap.

Both are built with ``highdicom`` from the source radiograph's own header, so they join its
patient and study. The SR is a TID 1500 Measurement Report whose image-level measurement group
(TID 1501) references the source instance and carries the bone age (LOINC 85151-9, UCUM ``mo``),
the prediction-interval bounds, the z-score and the classification, with the model named as the
algorithm. Codes that no public scheme defines live in a private scheme, ``99BONEAGE``.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from app.schemas import BoneAgeResponse
from radiograph.decode import sniff_format

MEDIA_TYPE = "application/dicom"
MANUFACTURER = "boneage-service (open source)"
PRIVATE = "99BONEAGE"
BONE_AGE = hd.sr.CodedConcept("85151-9", "LN", "Bone age")
MONTHS = hd.sr.CodedConcept("mo", "UCUM", "month")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
CLASSIFICATION = hd.sr.CodedConcept("classification", PRIVATE, "Bone age vs. chronological age (G&P +/- 2 SD)")
AGE = hd.sr.CodedConcept("30525-0", "LN", "Age")
SEX_USED = hd.sr.CodedConcept("sex-used", PRIVATE, "Sex the bone age was estimated for")
SEXES = {
    "male": hd.sr.CodedConcept("248153007", "SCT", "Male"),
    "female": hd.sr.CodedConcept("248152002", "SCT", "Female"),
}
CLASSES = {
    name: hd.sr.CodedConcept(name, PRIVATE, name.capitalize())
    for name in ("delayed", "normal", "advanced", "indeterminate")
}


TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


class NotDicom(ValueError):
    """A DICOM answer was asked for a PNG or JPEG: there is no study to put it in."""


def source_header(data: bytes) -> pydicom.Dataset:
    """The uploaded DICOM's header (no pixels): patient, study and instance it came from."""
    if sniff_format(data) != "dicom":
        raise NotDicom("DICOM results need a DICOM upload: a PNG or JPEG carries no patient or study to join.")
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    # Type 2 patient and study attributes must be present (possibly empty) in what we derive; a
    # de-identified export often drops them. Empty is what the standard asks for when unknown.
    for keyword in TYPE_2:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _algorithm(answer: BoneAgeResponse) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=answer.model.name, version=answer.model.version)


def structured_report(answer: BoneAgeResponse, source: pydicom.Dataset) -> pydicom.Dataset:
    """A Comprehensive SR (TID 1500) with the bone age and its context, referencing ``source``."""
    algorithm = _algorithm(answer)
    image = [hd.sr.SourceImageForMeasurement(source.SOPClassUID, source.SOPInstanceUID)]

    def measurement(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept = MONTHS):
        return hd.sr.Measurement(name, value, unit, algorithm_id=algorithm, referenced_images=image)

    measurements = [measurement(BONE_AGE, answer.bone_age_months)]
    interval = answer.bone_age_interval_months
    if interval is not None:
        for bound, value in (("lower", interval.lower), ("upper", interval.upper)):
            name = f"Bone age {interval.level:.0%} prediction interval, {bound} bound"
            measurements.append(measurement(hd.sr.CodedConcept(f"interval-{bound}", PRIVATE, name), value))
    # What the estimate and its comparison were computed with: the request may differ from the header.
    evaluations = [hd.sr.QualitativeEvaluation(SEX_USED, SEXES[answer.sex])]
    if answer.chronological_age_months is not None:
        measurements.append(measurement(AGE, answer.chronological_age_months))
    verdict = answer.assessment
    if verdict is not None:
        if verdict.z_score is not None:
            z = hd.sr.CodedConcept("z-score", PRIVATE, "Bone age z-score (Greulich & Pyle SD)")
            measurements.append(measurement(z, verdict.z_score, NO_UNITS))
        evaluations.append(hd.sr.QualitativeEvaluation(CLASSIFICATION, CLASSES[verdict.classification]))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Bone age"),
        algorithm_id=algorithm,
        method=hd.sr.CodedConcept("greulich-pyle-automated", PRIVATE, "Greulich & Pyle, automated"),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(),
            name=answer.model.name,
            model_name=f"{answer.model.name} {answer.model.version}",
            manufacturer_name=MANUFACTURER,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("bone-age", PRIVATE, "Bone age assessment, hand radiograph"),
        imaging_measurements=[group],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=generate_uid(),
        series_number=900,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # an automated reading, for a clinician to confirm
    )


def secondary_capture(overlay_rgb: np.ndarray, source: pydicom.Dataset, answer: BoneAgeResponse) -> pydicom.Dataset:
    """The heatmap overlay (RGB uint8) as a Secondary Capture in the source's study.

    The overlay keeps the source's orientation (it is cropped and squared, never flipped), so the
    source's PatientOrientation holds; when the source has none, the capture says unknown (empty).
    """
    orientation = tuple(source.get("PatientOrientation") or ())
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=orientation if len(orientation) == 2 else ("L", "H"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if len(orientation) != 2:
        image.PatientOrientation = ""  # Type 2: unknown, rather than the placeholder highdicom needs
    image.SeriesDescription = "Bone age heatmap (occlusion sensitivity), not for diagnosis"
    image.ImageComments = f"{answer.model.name} {answer.model.version}: qualitative aid, not evidence"
    return image


def to_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
