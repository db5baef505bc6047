"""`./dev.sh test-image` (issue 30): the built image run as the manifests run it, checked end to end
with podman: one locked-down `coinserve up`, the dev overlay's pods through kube play, a paused and a
killed worker, a user's bundle mounted from outside; every published port on 127.0.0.1 only, and
everything it started removed at the end, on failure too."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages

from deploy.podman import kubeplay  # noqa: E402

LOCKED_DOWN = ["--read-only", "--tmpfs", "/tmp", "--user", "10001:10001", "--cap-drop", "ALL"]
LOCKED_DOWN += ["--security-opt", "no-new-privileges"]


class CheckError(Exception):
    """A check failed; the message says what was expected and what came."""


def say(message: str, stream: TextIO = sys.stdout) -> None:
    stream.write(f"==> {message}\n")  # a script's output (T201 is for the service's modules)
    stream.flush()


def podman(*args: str, check: bool = True) -> str:
    out = subprocess.run(["podman", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise CheckError(f"podman {' '.join(args[:3])} ... failed: {out.stderr.strip()[-800:]}")
    return out.stdout.strip()


def free_ports() -> Iterator[int]:
    """Ports free on 127.0.0.1 now, none twice."""
    given: set[int] = set()
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in given:
            given.add(port)
            yield port


# ---- expected answers: the bundle's own models, run here ----


class Expected:
    """A bundle's example request and each member's probabilities for it, computed on this machine."""

    def __init__(self, bundle_dir: Path) -> None:
        import torch

        from models.bundle import open_bundle
        from models.sources import example_request

        bundle = open_bundle(bundle_dir)
        self.group = bundle.spec.group
        self.members = bundle.member_names
        self.request = example_request(bundle)
        tensor = self.request["inputs"][0]
        x = torch.tensor(tensor["data"], dtype=torch.float32).reshape(tensor["shape"])
        with torch.no_grad():
            self.probs = {m: torch.softmax(bundle.build_model(m)(x), dim=1).numpy()[0] for m in self.members}
        self.label = int(np.mean(list(self.probs.values()), axis=0).argmax())

    def check(self, answer: dict[str, Any], decoded: tuple[str, ...] = ()) -> None:
        """Exactly the bundle's answer: every member that answered itself equals what its model computes
        here, the ensemble's class is the expected one; `decoded` members are marked decoded."""
        outputs = {o["name"]: np.asarray(o["data"], dtype=np.float32) for o in answer["outputs"]}
        params = answer.get("parameters", {})
        if answer["model_name"] != self.group or sorted(outputs) != sorted([*self.members, "ensemble"]):
            raise CheckError(f"expected {self.group} with {self.members} + ensemble, got {answer}")
        if list(params.get("decoded_members", [])) != list(decoded):
            raise CheckError(f"expected decoded members {list(decoded)}, got {params}")
        if not decoded and params.get("approximate") is not False:
            raise CheckError(f"expected an exact (not approximate) answer, got {params}")
        for member in set(self.members) - set(decoded):
            if not np.allclose(outputs[member], self.probs[member], atol=1e-5):
                raise CheckError(f"{member}: {outputs[member]} != {self.probs[member]} computed here")
        if int(outputs["ensemble"].argmax()) != self.label:
            raise CheckError(f"ensemble's class {int(outputs['ensemble'].argmax())} != expected {self.label}")


def infer_json(base: str, expected: Expected, **parameters: Any) -> dict[str, Any]:
    body = {**expected.request, **({"parameters": parameters} if parameters else {})}
    response = httpx.post(f"{base}/v2/models/{expected.group}/infer", json=body, timeout=30)
    if response.status_code != 200:
        raise CheckError(f"infer: HTTP {response.status_code} {response.text[:400]}")
    return dict(response.json())


def infer_sse(base: str, expected: Expected) -> dict[str, Any]:
    """The same call as an SSE stream: exactly one `final`, last; → its data."""
    headers = {"Accept": "text/event-stream"}
    url = f"{base}/v2/models/{expected.group}/infer"
    with httpx.stream("POST", url, json=expected.request, headers=headers, timeout=30) as response:
        text = "".join(response.iter_text())
    events = [
        dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        for block in text.split("\n\n")
        if block.strip() and not block.startswith(":")
    ]
    kinds = [e.get("event") for e in events]
    if not kinds or kinds[-1] != "final" or kinds.count("final") != 1:
        raise CheckError(f"SSE: expected events ending in one final, got {kinds}")
    return dict(json.loads(events[-1]["data"]))


def infer_grpc(port: int, expected: Expected) -> dict[str, Any]:
    """The same call over OIP v2 gRPC (Triton's client), shaped like the JSON answer."""
    import tritonclient.grpc as grpcclient

    tensor = expected.request["inputs"][0]
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        infer_input = grpcclient.InferInput(tensor["name"], tensor["shape"], tensor["datatype"])
        infer_input.set_data_from_numpy(np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"]))
        result = client.infer(expected.group, [infer_input])
    finally:
        client.close()
    response = result.get_response(as_json=True)
    outputs = [{"name": o["name"], "data": result.as_numpy(o["name"]).ravel().tolist()} for o in response["outputs"]]
    parameters = {k: _grpc_parameter(v) for k, v in response.get("parameters", {}).items()}
    return {"model_name": response["model_name"], "outputs": outputs, "parameters": parameters}


def _grpc_parameter(value: dict[str, Any]) -> Any:
    (kind, raw), *_ = value.items()
    return json.loads(raw) if kind == "string_param" and raw[:1] in "[{" else raw


def wait_ready(base: str, timeout_s: float, container: str) -> dict[str, Any]:
    """Until the gateway says ready with no replica down; a container that died ends the wait."""
    deadline, body = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base}/v2/health/ready", timeout=2)
            body = response.json()
            if response.status_code == 200 and body.get("down") == []:
                return dict(body)
        except (httpx.HTTPError, ValueError):
            pass
        if podman("inspect", "--format", "{{.State.Running}}", container, check=False) == "false":
            logs = podman("logs", "--tail", "30", container, check=False)
            raise CheckError(f"container {container} stopped before it was ready:\n{logs}")
        time.sleep(0.5)
    raise CheckError(f"{base} not ready with every replica within {timeout_s:.0f} s (last: {body})")


# ---- every port on 127.0.0.1 only ----


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines() if line.split()[2] in ("inet", "inet6")]
    return [a for a in addresses if a not in ("127.0.0.1", "::1") and not a.startswith("fe80")]


def check_loopback_only(published: list[int]) -> None:
    """`podman port --all` names 127.0.0.1 only; `ss -ltnp` shows no container port (nor podman's
    port reservations, held by conmon) on another address; and a connection to each published port
    on each of this machine's other addresses is refused."""
    bindings = [line.split("->")[1].strip() for line in podman("port", "--all").splitlines() if "->" in line]
    if not bindings or any(not b.startswith("127.0.0.1:") for b in bindings):
        raise CheckError(f"podman port --all: expected 127.0.0.1 only, got {bindings}")
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    seen = set()
    for line in listening:
        local = line.split()[3]
        port = int(local.rsplit(":", 1)[1])
        if (port in published or "conmon" in line) and not local.startswith("127.0.0.1:"):
            raise CheckError(f"a container port listens beyond loopback: {line}")
        seen.add(port)
    if not set(published) <= seen:  # podman holds every published port open (conmon): ss must see each
        raise CheckError(f"ports {sorted(set(published) - seen)} are published but ss sees no listener")
    for address in host_addresses():
        for port in published:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family) as s:
                s.settimeout(1)
                if s.connect_ex((address, port)) == 0:
                    raise CheckError(f"port {port} answers on {address}, beyond loopback")
    say(f"   ports {sorted(published)}: 127.0.0.1 only (podman port, ss, {len(host_addresses())} other addresses)")


# ---- the checks ----


class Run:
    """What one check run started, removed in `close` (also after a failure or a signal)."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.label = f"coinserve.check={uuid.uuid4().hex[:8]}"
        self.ports = free_ports()
        self.tmp = Path(tempfile.mkdtemp(prefix="coinserve-check-"))
        self.tmp.chmod(0o755)  # the containers' uid 10001 reads the bundles under it
        self.kube_files: list[Path] = []
        self.networks: list[str] = []

    def close(self) -> None:
        for path in self.kube_files:
            podman("kube", "down", str(path), check=False)
        ids = podman("ps", "-a", "-q", "--filter", f"label={self.label}", check=False).split()
        if ids:
            podman("rm", "-f", "-t", "2", *ids, check=False)
        for network in self.networks:
            podman("network", "rm", "-f", network, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)
        left = podman("ps", "-a", "-q", "--filter", f"label={self.label}", check=False)
        say("removed everything this check started" if not left else f"left behind: {left}")

    def run_up(self, name: str, extra: list[str], up_args: list[str]) -> tuple[str, int, int]:
        """`coinserve up` in one locked-down container; → (its name, HTTP port, gRPC port) on 127.0.0.1."""
        http, grpc = next(self.ports), next(self.ports)
        podman(
            "run", "-d", "--name", name, "--label", self.label, *LOCKED_DOWN,
            "-p", f"127.0.0.1:{http}:8000", "-p", f"127.0.0.1:{grpc}:8001", *extra,
            self.image, "up", "--host", "0.0.0.0", "--port", "8000", "--grpc-port", "8001", *up_args,
        )  # fmt: skip
        return name, http, grpc

    def bundle_of_image(self) -> Path:
        """The default bundle baked into the image, copied out to compute the expected answers."""
        container = podman("create", "--label", self.label, self.image)
        podman("cp", f"{container}:/opt/coinserve/bundle", str(self.tmp / "image-bundle"))
        podman("rm", container)
        return self.tmp / "image-bundle"


def check_locked_down_up(run: Run) -> None:
    expected = Expected(run.bundle_of_image())
    name, http, grpc = run.run_up(f"coinserve-check-up-{run.label[-8:]}", [], [])
    base = f"http://127.0.0.1:{http}"
    wait_ready(base, 120, name)
    user = podman("exec", name, "id", "-u")
    caps = podman("exec", name, "sh", "-c", "grep CapEff /proc/self/status")
    if user != "10001" or not caps.endswith("0000000000000000"):
        raise CheckError(f"expected uid 10001 with no capabilities, got uid {user}, {caps}")
    if podman("exec", name, "sh", "-c", "touch /opt/x 2>/dev/null && echo writable || echo read-only") != "read-only":
        raise CheckError("the root filesystem is writable")
    expected.check(infer_json(base, expected))
    expected.check(infer_sse(base, expected))
    expected.check(infer_grpc(grpc, expected))
    say("   JSON, SSE and gRPC answered exactly; uid 10001, no capabilities, read-only root")
    check_loopback_only([http, grpc])
    podman("rm", "-f", "-t", "5", name)


def digits_bundle(run: Run) -> Path:
    """The digits example's bundle, made as its README says (plain PyTorch, import, code)."""
    out, bundle = run.tmp / "digits-out", run.tmp / "digits"
    coinserve = str(Path(sys.executable).parent / "coinserve")
    members = [f"--member=member-{i}={out}/members/member-{i}.safetensors" for i in range(3)]
    labelled = ["--eval", f"{out}/eval_x.npy", f"{out}/eval_y.npy"]
    for command in (
        [sys.executable, str(ROOT / "examples" / "digits" / "train_members.py"), "--out", str(out)],
        [coinserve, "import", "--out", str(bundle), "--spec", f"{out}/spec.json", *members,
         "--calibration", f"{out}/calibration.npy", *labelled, "--name", "digits"],
        [coinserve, "code", "--bundle", str(bundle)],
    ):  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckError(f"{' '.join(command[:3])} failed: {done.stderr[-1500:]}")
    subprocess.run(["chmod", "-R", "a+rX", str(bundle)], check=True)  # uid 10001 reads it
    return bundle


def check_mounted_bundle(run: Run) -> None:
    bundle = digits_bundle(run)
    expected = Expected(bundle)
    mount = ["-v", f"{bundle}:/bundles/digits:ro", "-e", "COINSERVE_BUNDLE=/bundles/digits"]
    mount += ["-e", "COINSERVE_WORKER_BUNDLE=/bundles/digits"]
    name, http, grpc = run.run_up(f"coinserve-check-digits-{run.label[-8:]}", mount, [])
    base = f"http://127.0.0.1:{http}"
    wait_ready(base, 120, name)
    expected.check(infer_json(base, expected))
    say(f"   the digits bundle mounted read-only answered exactly (class {expected.label})")
    check_loopback_only([http, grpc])
    podman("rm", "-f", "-t", "5", name)


def check_kube_play(run: Run) -> None:
    expected = Expected(run.bundle_of_image())
    played, ports = kubeplay.adapt(kubeplay.render("dev"), run.image, run.ports)
    network = f"coinserve-check-{run.label[-8:]}"
    podman("network", "create", "--label", run.label, network)
    run.networks.append(network)
    path = run.tmp / "dev-overlay.yaml"
    kubeplay.write(played, path)
    run.kube_files.append(path)
    podman("kube", "play", "--network", network, str(path))
    gateway = kubeplay.pod_name("gateway") + "-gateway"
    base = f"http://127.0.0.1:{ports['gateway/http']}"
    wait_ready(base, 180, gateway)
    expected.check(infer_json(base, expected))
    expected.check(infer_grpc(ports["gateway/grpc"], expected))
    say(f"   {len(played)} pods on network {network}, replicas reached by pod name, answered exactly")
    check_loopback_only(list(ports.values()))
    check_paused_and_killed_worker(base, expected, kubeplay.pod_name("worker-member-1") + "-worker")


def check_paused_and_killed_worker(base: str, expected: Expected, container: str) -> None:
    """1. pause member-1's container, 2. ask: its answer is decoded, 3. unpause it and SIGKILL its
    process, 4. its restart policy brings it back, 5. the gateway uses it again: the answer is exact."""
    podman("pause", container)
    try:
        expected.check(infer_json(base, expected, deadline_ms=5000), decoded=("member-1",))
    finally:
        podman("unpause", container)
    say("   member-1 paused: its answer decoded from the coded replica")
    restarts = int(podman("inspect", "--format", "{{.RestartCount}}", container))
    # a crash, as the OOM killer makes one: `podman kill` would mark it stopped by the user, and podman
    # (like Docker) never restarts those
    os.kill(int(podman("inspect", "--format", "{{.State.Pid}}", container)), signal.SIGKILL)
    deadline = time.monotonic() + 60
    while int(podman("inspect", "--format", "{{.RestartCount}}", container)) == restarts:
        if time.monotonic() > deadline:
            raise CheckError(f"{container} was not restarted within 60 s of its kill")
        time.sleep(0.5)
    time.sleep(1)  # the gateway notices the lost channel before it is ready again
    wait_ready(base, 120, kubeplay.pod_name("gateway") + "-gateway")
    expected.check(infer_json(base, expected))
    say(f"   member-1 killed: restarted by its restart policy ({restarts} -> {restarts + 1}), used again, exact")


STAGES: list[tuple[str, Callable[[Run], None]]] = [
    ("one locked-down container running coinserve up", check_locked_down_up),
    ("a user's bundle (the digits example) mounted read-only", check_mounted_bundle),
    ("the dev overlay's pods with podman kube play", check_kube_play),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", default="localhost/coinserve:dev")
    parser.add_argument("--only", type=int, action="append", help="run only stage N (1-3); repeatable")
    args = parser.parse_args(argv)
    if not os.environ.get("CONTAINERS_CONF"):
        say("warning: CONTAINERS_CONF is not set; ./dev.sh test-image configures podman for this VM", sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cleanup below runs on SIGTERM too
    started = time.monotonic()
    with ExitStack() as stack:
        run = Run(args.image)
        stack.callback(run.close)
        for number, (title, stage) in enumerate(STAGES, 1):
            if args.only and number not in args.only:
                continue
            say(title)
            t0 = time.monotonic()
            try:
                stage(run)
            except CheckError as exc:
                say(f"FAILED: {title}: {exc}", sys.stderr)
                return 1
            say(f"{title}: {time.monotonic() - t0:.1f} s")
    say(f"test-image passed in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
