"""The Kubernetes manifests in deploy/k8s, rendered as kustomize would and validated offline
against the Kubernetes API schemas (kubernetes-validate), plus what they must say."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meg.services.edge import SERVICE_NAME as EDGE_SERVICE
from meg.services.policy_server import SERVICE_NAME as POLICY_SERVICE

ROOT = Path(__file__).parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.32.0"


def _pointer_add(doc: Any, path: str, value: Any) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if isinstance(node, list):
        node.append(value) if last == "-" else node.insert(int(last), value)
    else:
        node[last] = value


def render(folder: Path) -> list[dict[str, Any]]:
    """The subset of kustomize these manifests use: resources, namespace, labels, images, JSON 6902 patches."""
    kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for resource in kust.get("resources", []):
        path = folder / resource
        if path.is_dir():
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    docs = copy.deepcopy(docs)
    for doc in docs:
        if "namespace" in kust and doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = kust["namespace"]
        for label in kust.get("labels", []):
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
        for image in kust.get("images", []):
            for pod in _pod_specs(doc):
                for container in pod["containers"]:
                    name = container["image"].split(":")[0]
                    if name in (image["name"], image.get("newName")):
                        container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for patch in kust.get("patches", []):
        target = patch["target"]
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert hits, f"patch target {target} matches nothing"
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "add", op
            for doc in hits:
                _pointer_add(doc, op["path"], op["value"])
    return docs


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def _by(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("folder", ["base", "overlays/gpu"])
def test_manifests_validate_against_the_kubernetes_schemas(folder: str) -> None:
    docs = render(K8S / folder)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Namespace"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    # the validation above can fail: a misspelt field in the edge's probe is refused
    doc = _by(render(K8S / "base"), "Deployment", "meg-edge")
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_edge_deployment_says_what_the_edge_needs() -> None:
    docs = render(K8S / "base")
    edge = _by(docs, "Deployment", "meg-edge")
    container = edge["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["serve", "edge"] and "--host=0.0.0.0" in args
    # probes: the standard health service, the edge's own service name while loading/draining
    assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": EDGE_SERVICE}
    assert container["startupProbe"]["grpc"]["service"] == EDGE_SERVICE
    assert "service" not in container["livenessProbe"]["grpc"]
    # every flag in the manifests is one `meg serve edge` / `meg serve policy` accepts
    from meg.services.cli import serve_policy_command
    from meg.services.serve_cli import serve_edge_command

    for command, deployment in ((serve_edge_command, edge), (serve_policy_command, _by(docs, "Deployment", "meg-policy"))):
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        flags = {re.sub(r"=.*", "", a) for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--")}
        assert flags <= known, flags - known
    assert _by(docs, "Deployment", "meg-policy")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"] == POLICY_SERVICE
    # headless, so clients resolve every pod and balance per pod
    assert _by(docs, "Service", "meg-edge")["spec"]["clusterIP"] == "None"
    hpa = _by(docs, "HorizontalPodAutoscaler", "meg-edge")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "meg_requests_in_system"
    annotations = edge["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9100" and "--metrics-port=9100" in args


def test_gpu_overlay_requests_a_gpu_and_uses_the_cuda_image() -> None:
    edge = _by(render(K8S / "overlays" / "gpu"), "Deployment", "meg-edge")
    container = edge["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":cuda")
