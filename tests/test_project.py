"""The project's promises about itself: README commands, CI, Docker and settings stay in step."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", README)


def test_readme_starts_with_the_run_and_test_commands():
    run, test = readme_commands()[:2]
    assert "uvicorn app.main:app" in run and "pytest" in test
    assert README.index(run) < 400  # First thing a reader sees.


def test_ci_runs_the_readme_test_command():
    assert readme_commands()[1] in (ROOT / ".ci" / "run").read_text()


def test_the_docker_image_installs_what_the_readme_installs_with_the_cpu_runtime_only():
    import tomllib

    run = readme_commands()[0]
    assert re.search(r"pip install -e '\.\[(\w+)\]'", run).group(1) == "serve"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG EXTRAS=cpu" in dockerfile and 'pip install --no-compile -e ".[${EXTRAS}]"' in dockerfile
    assert '"uvicorn", "app.main:app"' in dockerfile
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runtime = [d for d in extras["serve"] if "onnxruntime" in d]
    # serve = the service's dependencies + a runtime; cpu = the same dependencies + the CPU runtime only.
    assert [d for d in extras["serve"] if d not in runtime] == [d for d in extras["cpu"] if "onnxruntime" not in d]
    assert [d for d in extras["cpu"] if "onnxruntime" in d] == ["onnxruntime>=1.20"]


def test_compose_file_is_valid_against_the_compose_specification():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_serves_port_8000_checks_readyz_and_has_a_gpu_profile():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    cpu, gpu = services["boneage"], services["boneage-gpu"]
    assert cpu["ports"] == ["${BONEAGE_BIND:-127.0.0.1}:8000:8000"]  # a laptop's safe default
    assert "/readyz" in " ".join(cpu["healthcheck"]["test"])
    assert cpu["read_only"] and cpu["user"] == "10001:10001"
    assert "profiles" not in cpu and gpu["profiles"] == ["gpu"]
    assert gpu["environment"]["BONEAGE_PROVIDERS"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_replicas_sit_behind_haproxy_checking_readyz_least_connections():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["replica"]["profiles"] == services["lb"]["profiles"] == ["replicas"]
    assert "ports" not in services["replica"]  # reached only through the load balancer
    config = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    for line in ("balance leastconn", "option httpchk GET /readyz", "retry-on conn-failure", "server-template"):
        assert line in config


def test_every_setting_is_documented_in_the_readme():
    for name in Settings.model_fields:
        assert f"`BONEAGE_{name.upper()}`" in README, name


def test_the_rsna_attribution_is_in_the_readme():
    assert "Halabi SS" in README and "Radiology" in README


#: The model files the repository ships (tracked by git: a local export lying in models/ is not one).
BUNDLED = [
    ROOT / name
    for name in subprocess.run(
        ["git", "ls-files", "models/*.onnx"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
]


@pytest.mark.parametrize("path", BUNDLED, ids=[p.name for p in BUNDLED])
def test_a_bundled_model_file_names_no_path_of_the_machine_it_was_built_on(path):
    """Issue 12: the model file's metadata is public (GET /v1/model): no local folders in it."""
    import json

    from export.modelfile import open_session

    _, modelfile = open_session(path)
    text = json.dumps(modelfile.metadata)
    leaks = re.findall(r"(?:^|[\"\s])(/(?:root|home|work|tmp|Users|mnt|srv|data)/[^\"]*)", text)
    assert not leaks, leaks
    assert modelfile.interval is not None and modelfile.gate is not None  # every bundled model carries both


def test_bundled_model_files_stay_within_the_size_limits():
    """Issue 10: each file ≤ 50 MB (float16- or int8-stored weights), no more than 100 MB in all."""
    sizes = {p.name: p.stat().st_size / 1e6 for p in BUNDLED}
    assert "boneage.onnx" in sizes and all(mb <= 50 for mb in sizes.values()), sizes
    assert sum(sizes.values()) <= 100, sizes
