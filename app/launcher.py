"""`coinserve up`: the k member workers, the coded worker(s) and the gateway as child processes on
loopback; waits until every one is ready, prints the URLs and a curl, and stops all of them cleanly
on Ctrl-C or SIGTERM (or when any child dies)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Child:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    """The running processes; `stop()` ends them all, SIGTERM first, SIGKILL after `grace_s`."""

    children: list[Child] = field(default_factory=list)

    def stop(self, grace_s: float = 10.0) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def dead(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)


def spawn(name: str, port: int, args: list[str], env: dict[str, str], log_dir: Path | None = None) -> Child:
    """Start `coinserve ARGS`; its output goes to ours, or appends to LOG_DIR/NAME.log."""
    command = [sys.executable, "-m", "app.cli", *args]
    if log_dir is None:
        return Child(name, port, subprocess.Popen(command, env=env))
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
        return Child(name, port, subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))


def start(
    bundle: Path,
    port: int,
    coded_method: str = "coin",
    worker_args: dict[str, list[str]] | None = None,
    gateway_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    worker_env: dict[str, dict[str, str]] | None = None,
    log_dir: Path | None = None,
) -> Cluster:
    """Start every process; returns without waiting for readiness (see `wait_ready`)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [m["name"] for m in manifest["members"]]
    names += [c["name"] for c in manifest.get("coded", []) if c.get("method") == coded_method]
    env = {**os.environ, **(env or {})}
    cluster = Cluster()
    try:
        for name in names:
            p = free_port()
            extra = (worker_args or {}).get(name, [])
            args = ["worker", "--bundle", str(bundle), "--model", name, "--port", str(p), *extra]
            cluster.children.append(spawn(name, p, args, {**env, **(worker_env or {}).get(name, {})}, log_dir))
        replicas = [arg for c in cluster.children for arg in ("--replica", f"{c.name}={c.url}")]
        gateway = [
            "gateway",
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--coded-method",
            coded_method,
            *replicas,
            *(gateway_args or []),
        ]
        cluster.children.append(spawn("gateway", port, gateway, env, log_dir))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def wait_ready(cluster: Cluster, timeout_s: float = 120.0) -> None:
    """Poll every child's /v2/health/ready until each is ready and the gateway sees every replica;
    raise if one exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    waiting = list(cluster.children)
    with httpx.Client(timeout=1.0) as client:
        while waiting:
            dead = cluster.dead()
            if dead is not None:
                raise RuntimeError(f"{dead.name} exited with status {dead.process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s:g} s: {[c.name for c in waiting]}")
            still = []
            for child in waiting:
                try:  # a gateway counts once it sees every replica, not merely enough to answer
                    response = client.get(f"{child.url}/v2/health/ready")
                    ok = response.status_code == 200 and not response.json().get("down")
                except (httpx.HTTPError, ValueError):
                    ok = False
                if not ok:
                    still.append(child)
            waiting = still
            if waiting:
                time.sleep(0.2)


def run_until_signal(cluster: Cluster) -> int:
    """Block until SIGINT/SIGTERM or a child dies; then stop everything. Returns the exit status."""
    stopping = {"signal": 0}

    def handler(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping["signal"]:
            dead = cluster.dead()
            if dead is not None:
                return 1
            time.sleep(0.2)
        return 0
    finally:
        cluster.stop()
        for s, h in previous.items():
            signal.signal(s, h)
