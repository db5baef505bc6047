"""The dev overlay made playable by `podman kube play` 4.3 (issue 30): what it ignores is dropped,
every port is published on 127.0.0.1 only at a port of its own, Service names become pod names,
named probe ports become numbers and each Deployment runs the locally built image."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# kube play skips these (Services, NetworkPolicies, HPA, PDB) or cannot run them (StatefulSet, 4.3);
# the offline validation in tests/test_deploy.py covers them
DROPPED = {"Namespace", "Service", "NetworkPolicy", "HorizontalPodAutoscaler", "PodDisruptionBudget", "StatefulSet"}
LOOPBACK = "127.0.0.1"


def render(overlay: str = "dev") -> list[dict[str, Any]]:
    """The overlay rendered by `kubectl kustomize` (or a standalone `kustomize build`)."""
    import yaml

    folder = str(ROOT / "k8s" / "overlays" / overlay)
    if kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", folder]
    elif kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", folder]
    else:
        raise RuntimeError("neither kubectl nor kustomize is installed: cannot render k8s/overlays")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def pod_name(deployment: str) -> str:
    """The name kube play gives a one-replica Deployment's pod (and the DNS name it answers to)."""
    return f"{deployment}-pod-0"


def adapt(
    docs: list[dict[str, Any]], image: str, host_ports: Iterator[int]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """→ (the Deployments to play, {"DEPLOYMENT/PORT_NAME": host port}): one host port from
    host_ports per container port, each on 127.0.0.1 only."""
    config = {_base_name(d): d["data"] for d in docs if d["kind"] == "ConfigMap"}
    services = {d["metadata"]["name"]: pod_name(d["metadata"]["name"]) for d in docs if d["kind"] == "Deployment"}
    played, ports = [], {}
    for doc in docs:
        if doc["kind"] in DROPPED or doc["kind"] == "ConfigMap":
            continue
        if doc["kind"] != "Deployment":
            raise ValueError(f"kube play adapter: no rule for kind {doc['kind']}")
        deployment = copy.deepcopy(doc)
        deployment["metadata"].pop("namespace", None)
        deployment["spec"]["replicas"] = 1  # kube play 4.3 runs one pod per Deployment
        # Kubernetes' default, written out: kube play leaves a pod without it never restarted
        deployment["spec"]["template"]["spec"]["restartPolicy"] = "Always"
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            container["image"] = image
            container["imagePullPolicy"] = "Never"
            container["env"] = _env(container, config, services)
            for port in container["ports"]:
                port["hostIP"] = LOOPBACK
                port["hostPort"] = ports[f"{doc['metadata']['name']}/{port['name']}"] = next(host_ports)
            _number_probe_ports(container)
        played.append(deployment)
    return played, ports


def _base_name(config_map: dict[str, Any]) -> str:
    return str(config_map["metadata"]["name"]).rsplit("-", 1)[0]  # kustomize's hash suffix off


def _env(
    container: dict[str, Any], config: dict[str, dict[str, str]], services: dict[str, str]
) -> list[dict[str, str]]:
    """envFrom's ConfigMaps inlined, Service names in COINSERVE_REPLICAS turned into pod names, and the
    optional secrets left out (none exists here; Kubernetes then sets nothing either)."""
    env = {}
    for source in container.pop("envFrom", []):
        env.update(config[_base_name({"metadata": {"name": source["configMapRef"]["name"]}})])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    if "COINSERVE_REPLICAS" in env:
        replicas = json.loads(env["COINSERVE_REPLICAS"])
        for model, url in replicas.items():
            host = url.removeprefix("tcp://").rsplit(":", 1)[0]
            replicas[model] = url.replace(f"//{host}:", f"//{services[host]}:")
        env["COINSERVE_REPLICAS"] = json.dumps(replicas)
    return [{"name": name, "value": str(value)} for name, value in env.items()]


def _number_probe_ports(container: dict[str, Any]) -> None:
    """kube play reads a named probe port as 0. (It then runs an httpGet probe as `curl` inside the
    container, which the image lacks, and only where systemd schedules health checks: on machines
    without systemd, as here, no probe runs; tests/test_deploy.py checks the probes offline.)"""
    numbers = {p["name"]: p["containerPort"] for p in container["ports"]}
    for key in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container.get(key, {}).get("httpGet")
        if get is not None:
            get["port"] = numbers.get(get["port"], get["port"])


def write(played: list[dict[str, Any]], path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump_all(played, sort_keys=False))
