"""Results in the record's own formats: FHIR Observation (validated by a FHIR library), DICOM SR and
Secondary Capture (read back with pydicom and dcmtk)."""

from __future__ import annotations

import io
import re
import subprocess

import pydicom
import pytest
from fhir.resources.R4B.observation import Observation
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from tests.conftest import HALFRES_PNG, SMALL_DICOM, require_tool
from tests.test_api import is_problem, post

FHIR = "application/fhir+json"


def test_accept_fhir_returns_a_valid_bone_age_observation_that_says_what_the_api_says(client):
    plain = post(client, HALFRES_PNG, sex="female", age=120).json()
    response = post(client, HALFRES_PNG, sex="female", age=120, headers={"Accept": FHIR})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(FHIR)
    obs = Observation.model_validate_json(response.content)  # raises on an invalid resource

    assert obs.status == "preliminary"
    assert (obs.code.coding[0].system, obs.code.coding[0].code) == ("http://loinc.org", "85151-9")
    assert float(obs.valueQuantity.value) == pytest.approx(plain["bone_age_months"])
    assert (obs.valueQuantity.system, obs.valueQuantity.code) == ("http://unitsofmeasure.org", "mo")
    assert "Greulich & Pyle" in obs.method.text
    model = plain["model"]
    assert obs.device.display == f"{model['name']} {model['version']}"
    assert obs.contained[0].version[0].value == model["version"]

    verdict = plain["assessment"]
    expected = {"delayed": "L", "normal": "N", "advanced": "H", "indeterminate": "IND"}[verdict["classification"]]
    assert obs.interpretation[0].coding[0].code == expected
    assert obs.interpretation[0].text == verdict["statement"]
    band = obs.referenceRange[0]
    assert float(band.low.value) == pytest.approx(120 - 2 * verdict["sd_months"], abs=0.051)
    assert float(band.high.value) == pytest.approx(120 + 2 * verdict["sd_months"], abs=0.051)
    components = {c.code.text: float(c.valueQuantity.value) for c in obs.component}
    assert components["Bone age z-score (Greulich & Pyle SD)"] == pytest.approx(verdict["z_score"], abs=0.005)
    interval = plain["bone_age_interval_months"]  # the bundled model is calibrated: always an interval
    level = f"{interval['level']:.0%}"
    assert components[f"Bone age, {level} prediction interval, lower bound"] == interval["lower"]
    assert components[f"Bone age, {level} prediction interval, upper bound"] == interval["upper"]


def test_format_fhir_works_without_headers_and_on_the_json_endpoint(client):
    import base64

    by_query = post(client, HALFRES_PNG, sex="male", params={"format": "fhir"})
    assert by_query.status_code == 200 and by_query.headers["content-type"].startswith(FHIR)
    obs = Observation.model_validate_json(by_query.content)
    assert obs.interpretation is None and obs.referenceRange is None  # no age, so no comparison

    body = {"image": base64.b64encode(HALFRES_PNG.read_bytes()).decode(), "sex": "male"}
    by_json = client.post("/v1/bone-age/json", json=body, headers={"Accept": FHIR})
    assert by_json.status_code == 200
    assert Observation.model_validate_json(by_json.content).valueQuantity.value == obs.valueQuantity.value


def test_errors_stay_problem_json_when_fhir_is_asked_for(client):
    response = post(client, HALFRES_PNG, headers={"Accept": FHIR})  # no sex
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")


def dicom_answer(client, path, endpoint="/v1/bone-age", fmt="dicom-sr", **data):
    return client.post(endpoint, params={"format": fmt}, files={"image": (path.name, path.read_bytes())}, data=data)


def test_a_dicom_upload_can_be_answered_with_a_structured_report_in_its_own_study(client, tmp_path):
    source = pydicom.dcmread(SMALL_DICOM)
    plain = post(client, SMALL_DICOM).json()
    response = dicom_answer(client, SMALL_DICOM)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"

    sr = pydicom.dcmread(io.BytesIO(response.content))
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert (sr.StudyInstanceUID, sr.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.PreliminaryFlag == "PRELIMINARY"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID

    # Read back with dcmtk, as a PACS-side tool would.
    path = tmp_path / "sr.dcm"
    path.write_bytes(response.content)
    dump = subprocess.run([require_tool("dsrdump", "dcmtk"), str(path)], capture_output=True, text=True, check=True)
    text = dump.stdout

    def num(name: str, unit: str = "mo") -> float:  # dsrdump writes 101 as "101.0": compare numbers
        found = re.search(rf'NUM:\(,,"{re.escape(name)}"\)="([-0-9.]+)" \({unit},UCUM', text)
        assert found, (name, text)
        return float(found[1])

    assert num("Bone age") == pytest.approx(plain["bone_age_months"])
    assert f'"Algorithm Version")="{plain["model"]["version"]}"' in text
    assert 'IMAGE:(,,"Source of Measurement")' in text
    verdict = plain["assessment"]
    assert f"{verdict['classification']},99BONEAGE" in text
    assert num("Bone age z-score (Greulich & Pyle SD)", "1") == pytest.approx(verdict["z_score"])
    interval = plain["bone_age_interval_months"]
    assert num("Bone age 90% prediction interval, lower bound") == pytest.approx(interval["lower"])
    assert num("Bone age 90% prediction interval, upper bound") == pytest.approx(interval["upper"])
    age = re.search(r'NUM:\(,,"Age"\)="([0-9.]+)" \(mo,UCUM', text)
    assert age and float(age[1]) == plain["chronological_age_months"], text
    assert 'CODE:(,,"Sex the bone age was estimated for")=(248152002,SCT,"Female")' in text


def test_the_heatmap_can_go_back_as_a_secondary_capture_in_the_same_study(client):
    source = pydicom.dcmread(SMALL_DICOM)
    response = dicom_answer(client, SMALL_DICOM, "/v1/bone-age/explain", "dicom-sc", grid="4")
    assert response.status_code == 200, response.text
    sc = pydicom.dcmread(io.BytesIO(response.content))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert (sc.StudyInstanceUID, sc.PatientID) == (source.StudyInstanceUID, source.PatientID)
    side = client.get("/v1/model").json()["preprocessing"]["input_size"]
    assert sc.pixel_array.shape == (side, side, 3) and sc.PhotometricInterpretation == "RGB"
    assert "not evidence" in sc.ImageComments


@pytest.mark.parametrize(("endpoint", "fmt"), [("/v1/bone-age", "dicom-sr"), ("/v1/bone-age/explain", "dicom-sc")])
def test_a_dicom_result_for_a_png_is_refused_with_the_reason(client, endpoint, fmt):
    response = dicom_answer(client, HALFRES_PNG, endpoint, fmt, sex="female")
    assert is_problem(response, 422, "DICOM results need a DICOM upload")
