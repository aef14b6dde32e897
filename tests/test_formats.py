"""Results in the record's own formats: the answer as a FHIR Observation, validated by a FHIR library."""

from __future__ import annotations

import pytest
from fhir.resources.R4B.observation import Observation

from tests.conftest import HALFRES_PNG
from tests.test_api import post

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
    interval = plain["bone_age_interval_months"]
    if interval is not None:
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
