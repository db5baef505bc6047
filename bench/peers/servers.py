"""Start and stop the peers (Ray Serve, Triton) over a bundle's k members, each with k + 1 model
processes, and find those processes' pids for the straggler schedule. Every process they start is
in its own process group and is killed with it (`Peer.stop`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app import launcher
from bench.peers import venvs
from bench.peers.triton_repo import write_repository


@dataclass
class Peer:
    name: str  # ray-serve | triton
    url: str  # the inference URL (V2 JSON body in, V2 JSON out)
    process: subprocess.Popen[bytes]
    pids: list[int]  # k + 1 model processes: slot i = member i, slot k = the extra one
    folder: Path
    notes: dict[str, object] = field(default_factory=dict)

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in session(self.process.pid):  # Ray's actors have groups of their own, in our session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def session(sid: int) -> list[int]:
    """Every live process of session `sid` (the peer was started in a session of its own)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # after ')': state, ppid, pgrp, session
            found.append(int(entry.name))
    return found


def _wait_answering(url: str, body: bytes, process: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited with {process.returncode}; its log: {log}\n{log.read_text()[-3000:]}")
        try:
            r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=5)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"peer not answering at {url} after {timeout_s:g} s: {last}; log {log}")


def member_names(bundle: Path) -> list[str]:
    return [m["name"] for m in json.loads((bundle / "manifest.json").read_text())["members"]]


def start_ray(bundle: Path, body: bytes, extra: str) -> Peer:
    python = venvs.ensure("ray")
    folder = Path(tempfile.mkdtemp(prefix="coinserve-peer-ray-"))
    port = launcher.free_port()
    pids_file = folder / "pids.json"
    log = folder / "ray.log"
    env = venvs.env_for({"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60"})
    command = [str(python), "-m", "bench.peers.ray_app", str(bundle.resolve()), str(port), str(pids_file)]
    command += ["--extra", extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v2/models/fashion/infer"
    try:
        deadline = time.monotonic() + 180
        while not pids_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray Serve did not come up; its log {log}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        _wait_answering(url, body, process, 60, log)
        found = json.loads(pids_file.read_text())
        names = member_names(bundle)
        members = found["members"]
        missing = [n for n in names if not members.get(n)]
        if missing or len(members[extra]) < 2:
            raise RuntimeError(f"Ray Serve replicas not found by name: {missing}; actors {found.get('actors')}")
        pids = [members[n][0] for n in names] + [members[extra][1]]
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return Peer("ray-serve", url, process, pids, folder, {"ingress_pids": found.get("ingress")})


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _descendants(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        for child in _children(stack.pop()):
            found.append(child)
            stack.append(child)
    return found


def _ask(python: Path, code: str) -> str:
    """What `code` prints in the peer's venv."""
    return subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def start_triton(bundle: Path, body: bytes, extra: str) -> Peer:
    python = venvs.ensure("triton")
    folder = Path(tempfile.mkdtemp(prefix="coinserve-peer-triton-"))
    names = write_repository(bundle, folder / "models", extra)
    site = _ask(python, "import pytriton, os; print(os.path.dirname(pytriton.__file__))")
    server = Path(site) / "tritonserver"
    # The Python backend with the stub for this venv's interpreter (what PyTriton assembles at run time).
    backends = folder / "backends"
    shutil.copytree(server / "backends", backends)
    version = _ask(python, "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    shutil.copy2(server / "python_backend_stubs" / version / "triton_python_backend_stub", backends / "python")
    port, grpc, metrics = launcher.free_port(), launcher.free_port(), launcher.free_port()
    log = folder / "triton.log"
    command = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={folder / 'models'}",
        f"--backend-directory={backends}",
        f"--http-port={port}",
        f"--grpc-port={grpc}",
        f"--metrics-port={metrics}",
        "--allow-gpu-metrics=false",
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
    ]
    libs = f"{Path(site).parent / 'nvidia_pytriton.libs'}"
    env = venvs.env_for(
        {
            "LD_LIBRARY_PATH": libs + ":" + os.environ.get("LD_LIBRARY_PATH", ""),
            "PATH": f"{python.parent}:{os.environ.get('PATH', '')}",
            "PYTHONPATH": f"{venvs.ROOT}",
            "VIRTUAL_ENV": str(python.parent.parent),
        }
    )
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v2/models/fashion/infer"
    try:
        _wait_answering(url, body, process, 180, log)
        stubs: dict[str, list[int]] = {}
        for pid in _descendants(process.pid):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            text = " ".join(part.decode(errors="replace") for part in cmdline)
            if "triton_python_backend_stub" not in text:
                continue
            for name in names:
                if f"/models/{name}/1/model.py" in text:
                    stubs.setdefault(name, []).append(pid)
        missing = [n for n in names if not stubs.get(n)]
        if missing or len(stubs[extra]) < 2:
            raise RuntimeError(f"Triton stub processes not found for {missing or extra}: {stubs}")
        pids = [sorted(stubs[n])[0] for n in names] + [sorted(stubs[extra])[1]]
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return Peer("triton", url, process, pids, folder)
