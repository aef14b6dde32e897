"""An integrator's client, generated from the running service's OpenAPI document, works.

Hospital integrators rarely write HTTP by hand: they generate a client from /openapi.json. This
does what they do with openapi-python-client (a widely used generator): generate from the live
document, post a real radiograph through the generated code, and read the typed answer.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HALFRES_PNG
from tests.test_uvicorn import running_service

GENERATOR = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))


@pytest.fixture
def generated_client(tmp_path, bundled_model):
    """(package, base URL): a client generated from the live document of a running service."""
    if GENERATOR is None:
        pytest.skip("openapi-python-client is not installed (pip install -e '.[dev]')")
    config = tmp_path / "generator.yaml"
    config.write_text("post_hooks: []\npackage_name_override: boneage_client\n")
    with running_service(tmp_path, model_path=bundled_model) as (url, _, _):
        source = f"{url}/openapi.json"
        out, cfg = str(tmp_path / "boneage_client"), str(config)
        done = subprocess.run(
            [GENERATOR, "generate", "--url", source, "--meta", "none", "--output-path", out, "--config", cfg],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Warning" not in done.stdout, done.stdout
        sys.path.insert(0, str(tmp_path))
        try:
            yield importlib.import_module("boneage_client"), url
        finally:
            sys.path.remove(str(tmp_path))
            for name in [m for m in sys.modules if m == "boneage_client" or m.startswith("boneage_client.")]:
                del sys.modules[name]


def test_a_generated_client_posts_a_radiograph_as_a_file_and_reads_the_typed_answer(generated_client):
    package, url = generated_client
    bone_age = importlib.import_module("boneage_client.api.bone_age.bone_age")
    models = importlib.import_module("boneage_client.models")
    types = importlib.import_module("boneage_client.types")

    with package.Client(base_url=url, timeout=60) as client:
        body = models.BodyBoneAge(
            image=types.File(payload=HALFRES_PNG.open("rb"), file_name=HALFRES_PNG.name, mime_type="image/png"),
            sex=models.BodyBoneAgeSexType0.FEMALE,
            chronological_age_months=120.0,
        )
        response = bone_age.sync_detailed(client=client, body=body)

    assert response.status_code == 200, response.content
    answer = response.parsed
    assert isinstance(answer, models.BoneAgeResponse)
    assert answer.sex == models.BoneAgeResponseSex.FEMALE
    assert 0 < answer.bone_age_months < 300
    assert answer.bone_age_years == pytest.approx(answer.bone_age_months / 12, abs=0.06)
    assert answer.chronological_age_months == 120.0


def test_the_document_advertises_canonical_sex_values_and_the_service_accepts_the_usual_variants(client):
    schema = client.get("/openapi.json").json()["components"]["schemas"]["Body_bone_age"]
    assert schema["properties"]["sex"]["anyOf"][0]["enum"] == ["male", "female"]
    assert schema["properties"]["image"]["format"] == "binary"
    for spelling, expected in [("M", "male"), ("f", "female"), ("Male", "male"), (" FEMALE ", "female")]:
        answer = client.post(
            "/v1/bone-age", files={"image": (HALFRES_PNG.name, HALFRES_PNG.read_bytes())}, data={"sex": spelling}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["sex"] == expected
