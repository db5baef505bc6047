"""The container tooling of issue 30, checked offline: the kube play adapter's rendering of the dev
overlay (loopback-only ports, none twice, replicas by pod name, numbered probes), and the Dockerfile's
build arguments. `./dev.sh test-image` runs the image itself with podman (outside the suite)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from deploy.podman import kubeplay

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "localhost/coinserve:dev"


@pytest.fixture(scope="module")
def played():
    if shutil.which("kubectl") is None and shutil.which("kustomize") is None:
        pytest.skip("neither kubectl nor kustomize is installed: cannot render the dev overlay")
    docs = kubeplay.render("dev")
    return docs, *kubeplay.adapt(docs, IMAGE, iter(range(41000, 42000)))


def containers(deployments):
    return [c for d in deployments for c in d["spec"]["template"]["spec"]["containers"]]


def test_adapter_publishes_every_container_port_on_loopback_at_a_port_of_its_own(played):
    _, deployments, ports = played
    published = [p for c in containers(deployments) for p in c["ports"]]
    assert len(published) == 12  # gateway: http, grpc; five workers: http, channel
    assert {p["hostIP"] for p in published} == {"127.0.0.1"}
    assert sorted(p["hostPort"] for p in published) == list(range(41000, 41012))
    assert ports["gateway/http"] == next(
        p["hostPort"]
        for c in containers(deployments)
        for p in c["ports"]
        if c["name"] == "gateway" and p["name"] == "http"
    )


def test_adapter_keeps_only_what_kube_play_runs(played):
    docs, deployments, _ = played
    assert {d["kind"] for d in deployments} == {"Deployment"}
    assert [d["metadata"]["name"] for d in deployments] == [
        d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"
    ]
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        assert "namespace" not in d["metadata"] and pod["restartPolicy"] == "Always"
        for c in pod["containers"]:
            assert c["image"] == IMAGE and "envFrom" not in c
            assert all(set(e) == {"name", "value"} for e in c["env"])  # ConfigMaps inlined, optional secrets out
            assert c["securityContext"]["readOnlyRootFilesystem"] is True  # the lock-down is kept


def test_adapter_addresses_each_replica_by_its_pod_name(played):
    _, deployments, _ = played
    gateway = next(c for c in containers(deployments) if c["name"] == "gateway")
    replicas = json.loads(next(e["value"] for e in gateway["env"] if e["name"] == "COINSERVE_REPLICAS"))
    pods = {kubeplay.pod_name(d["metadata"]["name"]) for d in deployments}
    assert replicas == {
        model: f"tcp://{kubeplay.pod_name('worker-' + model)}:8081"
        for model in ("member-0", "member-1", "member-2", "member-3", "coded-average-distill-0")
    }
    assert {url[len("tcp://") : -len(":8081")] for url in replicas.values()} <= pods
    workers = [c for c in containers(deployments) if c["name"] == "worker"]
    assert {e["value"] for c in workers for e in c["env"] if e["name"] == "COINSERVE_WORKER_BUNDLE"} == {
        "/opt/coinserve/bundle"
    }


def test_adapter_probes_the_same_paths_on_numbered_ports(played):
    docs, deployments, _ = played
    originals = {
        c["name"]: c for d in docs if d["kind"] == "Deployment" for c in d["spec"]["template"]["spec"]["containers"]
    }
    for c in containers(deployments):
        numbers = {p["name"]: p["containerPort"] for p in c["ports"]}
        for key in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = originals[c["name"]][key]["httpGet"]
            assert c[key]["httpGet"] == {"path": get["path"], "port": numbers[get["port"]]}  # kube play: a name is 0


def test_dockerfile_takes_its_base_and_package_sources_as_build_arguments():
    text = (ROOT / "Dockerfile").read_text()
    head = text[: text.index("FROM ")]
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in head and "ARG BUNDLE_SOURCE=train" in head
    froms = re.findall(r"^FROM (\S+) AS (\S+)$", text, flags=re.M)
    assert [base for base, stage in froms if stage in ("build", "runtime")] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert ("build", "bundle-train") in froms and ("build", "bundle-context") in froms
    assert ("bundle-${BUNDLE_SOURCE}", "bundle") in froms
    build = text[text.index("AS build") : text.index("AS bundle-train")]
    for arg in (
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu",
        "PIP_INDEX_URL=",
        "PIP_FIND_LINKS=",
        "PIP_CERT=",
    ):
        assert f"ARG {arg}" in build
    assert '--index-url "$TORCH_INDEX_URL" torch==2.13.0' in build
    assert build.index("torch==2.13.0") < build.index("COPY app app")  # an edit keeps torch's layer
    runtime = text[text.index("AS runtime") :]
    assert "ARG" not in runtime and "COPY --from=bundle /opt/coinserve/bundle" in runtime  # no pip settings


def test_build_context_holds_the_default_bundle_and_no_other():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "bundles/*" in lines and "!bundles/default" in lines
    assert lines.index("!bundles/default") > lines.index("bundles/*")
