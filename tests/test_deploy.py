"""Kubernetes manifests: valid against the Kubernetes schemas, and consistent with the service."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
VERSION = "1.37.0"
MANIFESTS = sorted(K8S.rglob("*.yaml"))


def documents() -> list[tuple[str, dict]]:
    return [(str(p.relative_to(K8S)), d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def by_kind(kind: str) -> list[dict]:
    return [d for _, d in documents() if d["kind"] == kind]


@pytest.mark.parametrize(("name", "manifest"), documents(), ids=[n for n, _ in documents()])
def test_each_manifest_is_valid_against_the_kubernetes_schema(name, manifest):
    if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
        # A CRD (Prometheus Operator): not in the Kubernetes schemas; checked against the Service below.
        pytest.skip("ServiceMonitor is a CRD; see test_the_service_monitor_scrapes_the_services_metrics_port")
    kubernetes_validate.validate(manifest, VERSION, strict=True)  # raises with the offending field


def test_a_broken_manifest_is_caught():
    bad = by_kind("Deployment")[0] | {"spec": {"replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_pods_probe_readyz_and_healthz_run_as_non_root_and_drain_within_their_grace_period():
    graceful = int(re.search(r'"--timeout-graceful-shutdown", "(\d+)"', (ROOT / "Dockerfile").read_text())[1])
    deployments = by_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"boneage", "boneage-gpu"}
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pause + graceful
        env = {e["name"]: e for e in container["env"]}
        # Every pod behind the one Service honours the API key; none may be a way around it.
        assert env["BONEAGE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "boneage"
        # Bodies in flight at worst (queue × upload limit) fit the memory limit with room to spare.
        limit_mib = int(container["resources"]["limits"]["memory"].removesuffix("Gi")) * 1024
        worst = int(env["BONEAGE_QUEUE_SIZE"]["value"]) * int(env["BONEAGE_MAX_UPLOAD_MB"]["value"])
        assert worst <= limit_mib / 2, (deployment["metadata"]["name"], worst, limit_mib)
    gpu = next(d for d in deployments if d["metadata"]["name"] == "boneage-gpu")
    container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "BONEAGE_PROVIDERS", "value": "cuda"} in container["env"]


def test_the_service_budget_and_autoscalers_select_the_pods():
    [service] = by_kind("Service")
    pods = by_kind("Deployment")
    for deployment in pods:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
    [budget] = by_kind("PodDisruptionBudget")
    cpu = next(d for d in pods if d["metadata"]["name"] == "boneage")
    assert budget["spec"]["selector"]["matchLabels"] == cpu["spec"]["selector"]["matchLabels"]
    assert budget["spec"]["minAvailable"] < cpu["spec"]["replicas"]
    for hpa in by_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] == "boneage"
        metric = hpa["spec"]["metrics"][0]
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] == "boneage_queue_depth"  # a metric the service exports


def test_the_service_monitor_scrapes_the_services_metrics_port(client):
    [monitor] = by_kind("ServiceMonitor")
    [service] = by_kind("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert client.get(endpoint["path"]).status_code == 200
    assert "boneage_queue_depth" in client.get(endpoint["path"]).text
