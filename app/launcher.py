"""`coinserve up`: the k member workers, the coded worker(s) and the gateway as child processes on
loopback; waits until every one is ready, prints the URLs and a curl, then supervises them: a child
that dies is restarted on the same port with the same command line, after an exponential back-off,
while the others keep serving. Only Ctrl-C or SIGTERM stops all of them (SIGTERM, SIGKILL after a
grace period).

Clusters built with `start` are not supervised unless a `Supervisor` runs over them: tests kill and
restart children themselves."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from app import zygote
from app.group import served_coded_method
from app.zygote import ForkedProcess

logger = logging.getLogger(__name__)
Process = subprocess.Popen[bytes] | ForkedProcess  # a fresh interpreter, or a worker forked by the zygote


_GIVEN: deque[int] = deque(maxlen=4096)  # ports free_port() handed out lately, in order
_GIVEN_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now that this process has not handed out lately: the kernel may offer a port
    again until somebody binds it, and children started together bind theirs only once they have
    started (two of them given the same port: one dies with "address already in use", seen when a
    worker's channel port was another worker's HTTP port)."""
    with _GIVEN_LOCK:
        for _ in range(64):
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _GIVEN:
                break
        _GIVEN.append(port)
        return port


@dataclass
class Child:
    """One process; `args`, `env` and `log_dir` (set by `spawn`) are what it takes to start it again."""

    name: str
    port: int
    process: Process
    args: list[str] | None = None
    env: dict[str, str] | None = None
    log_dir: Path | None = None
    started_s: float = field(default_factory=time.monotonic)
    host: str = "127.0.0.1"  # where this machine reaches it (the gateway may listen elsewhere: `up --host`)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def channel_url(self) -> str:
        """A worker's channel address, as the gateway dials it (`--channel-port` on its command line)."""
        args = self.args or []
        if "--channel-port" not in args:
            raise ValueError(f"{self.name} was not started with a --channel-port")
        return f"tcp://127.0.0.1:{args[args.index('--channel-port') + 1]}"


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
    """Start `coinserve ARGS`; its output goes to ours, or appends to LOG_DIR/NAME.log. A worker is
    forked from this process's zygote (app/zygote.py: the imports done once), anything else, or
    every process with COINSERVE_FORK_WORKERS=0, is a fresh interpreter."""
    command = [sys.executable, "-m", "app.cli", *args]
    forked = args[:1] == ["worker"] and zygote.forking()
    if log_dir is None:
        process: Process = zygote.zygote().spawn(args, env) if forked else subprocess.Popen(command, env=env)
        return Child(name, port, process, args, env, log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
        if forked:
            process = zygote.zygote().spawn(args, env, log.fileno())
        else:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        return Child(name, port, process, args, env, log_dir)


def respawn(child: Child) -> Child:
    """The same command line, environment, port and log as `child`, as a new process."""
    if child.args is None or child.env is None:
        raise ValueError(f"{child.name} was not started by spawn(): its command line is unknown")
    new = spawn(child.name, child.port, child.args, child.env, child.log_dir)
    new.host = child.host
    return new


def start(
    bundle: Path,
    port: int,
    coded_method: str | None = None,
    worker_args: dict[str, list[str]] | None = None,
    gateway_args: list[str] | None = None,
    env: dict[str, str] | None = None,
    worker_env: dict[str, dict[str, str]] | None = None,
    log_dir: Path | None = None,
    grpc_port: int = 0,
    host: str = "127.0.0.1",
    log_level: str | None = None,
) -> Cluster:
    """Start every process; returns without waiting for readiness (see `wait_ready`). The gateway's
    gRPC endpoint is off (`grpc_port` 0) unless a port is given: two clusters (tests, benchmarks)
    must never both reach for the default 8001; `coinserve up` passes its `--grpc-port`. The
    gateway listens on `host` (HTTP and gRPC), the workers on loopback, on ports found free.
    `log_level` (e.g. info: start-up facts too) goes to every child."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [m["name"] for m in manifest["members"]]
    coded_method = served_coded_method(manifest, coded_method)
    names += [c["name"] for c in manifest.get("coded", []) if c.get("method") == coded_method]
    env = {**os.environ, **(env or {})}
    levels = ["--log-level", log_level] if log_level else []
    cluster = Cluster()
    try:
        for name in names:
            p, channel = free_port(), free_port()
            extra = (worker_args or {}).get(name, [])
            args = ["worker", "--bundle", str(bundle), "--model", name, "--port", str(p)]
            args += ["--channel-port", str(channel), *levels, *extra]
            cluster.children.append(spawn(name, p, args, {**env, **(worker_env or {}).get(name, {})}, log_dir))
        replicas = [arg for c in cluster.children for arg in ("--replica", f"{c.name}={c.channel_url}")]
        gateway = [
            "gateway",
            "--bundle",
            str(bundle),
            "--port",
            str(port),
            "--coded-method",
            coded_method,
            "--grpc-port",
            str(grpc_port),
            *(["--host", host] if host != "127.0.0.1" else []),
            *levels,
            *replicas,
            *(gateway_args or []),
        ]
        child = spawn("gateway", port, gateway, env, log_dir)
        if host != "127.0.0.1":
            child.host = reachable(host)
        cluster.children.append(child)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def reachable(host: str) -> str:
    """The address this machine dials to reach a server listening on `host` (a wildcard: loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host


def add_gateway(cluster: Cluster, port: int, name: str = "gateway-b", env: dict[str, str] | None = None) -> Child:
    """Another gateway over the same replicas, as a second pod behind a Service is: the first
    gateway's command line and environment (`env` added), on `port`, gRPC off."""
    first = next(c for c in cluster.children if c.name == "gateway")
    assert first.args is not None and first.env is not None
    args = list(first.args)
    args[args.index("--port") + 1] = str(port)
    args[args.index("--grpc-port") + 1] = "0"
    child = spawn(name, port, args, {**first.env, **(env or {})}, first.log_dir)
    cluster.children.append(child)
    return child


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


def describe_exit(returncode: int) -> str:
    """'was killed by SIGKILL' or 'exited with status 1', from a Popen return code."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass
class Backoff:
    """Waits between restarts of one child: `initial_s`, doubling up to `max_s`; back to `initial_s`
    once the child has stayed up `reset_after_s` (a crash loop slows down, a rare death does not)."""

    initial_s: float = 0.5
    max_s: float = 8.0
    reset_after_s: float = 30.0
    next_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.next_s = self.initial_s

    def delay_s(self, uptime_s: float) -> float:
        """The wait before restarting a child that died after `uptime_s` seconds up."""
        if uptime_s >= self.reset_after_s:
            self.next_s = self.initial_s
        delay = self.next_s
        self.next_s = min(self.next_s * 2, self.max_s)
        return delay


class Supervisor:
    """Restarts the cluster's children that die. `poll()` looks once (call it every `interval_s`);
    a restarted child replaces the dead one in `cluster.children`, so `cluster.stop()` ends it."""

    def __init__(
        self,
        cluster: Cluster,
        backoff: Callable[[], Backoff] = Backoff,
        clock: Callable[[], float] = time.monotonic,
        start_again: Callable[[Child], Child] = respawn,
        interval_s: float = 0.2,
    ) -> None:
        self.cluster = cluster
        self.clock = clock
        self.start_again = start_again
        self.interval_s = interval_s
        self.stopping = False
        self._new_backoff = backoff
        self._backoff: dict[str, Backoff] = {}  # name -> its restart back-off
        self._due_s: dict[str, float] = {}  # name -> when a dead child is started again

    def poll(self) -> None:
        for index, child in enumerate(self.cluster.children):
            if self.stopping:
                return
            if child.name in self._due_s:
                if self.clock() >= self._due_s[child.name]:
                    self._restart(index, child)
            elif child.process.poll() is not None:
                self._bury(child)

    def _bury(self, child: Child) -> None:
        """Log one line for the death and schedule the restart."""
        now = self.clock()
        backoff = self._backoff.setdefault(child.name, self._new_backoff())
        delay = backoff.delay_s(now - child.started_s)
        self._due_s[child.name] = now + delay
        code = child.process.poll()  # _bury is called once poll() has seen the end
        how = describe_exit(code if code is not None else 0)
        logger.warning("%s (pid %d) %s; restarting in %g s", child.name, child.process.pid, how, delay)

    def _restart(self, index: int, child: Child) -> None:
        try:
            new = self.start_again(child)
        except OSError as exc:  # e.g. out of processes: try again later, as after a death
            delay = self._backoff[child.name].delay_s(0.0)
            self._due_s[child.name] = self.clock() + delay
            logger.warning("%s could not be started (%s); retrying in %g s", child.name, exc, delay)
            return
        new.started_s = self.clock()
        self.cluster.children[index] = new
        del self._due_s[child.name]
        logger.warning("%s restarted (pid %d)", new.name, new.process.pid)

    def run_until_signal(self) -> int:
        """Poll until SIGINT/SIGTERM; then stop every child. Returns the exit status (0)."""

        def handler(_signum: int, _frame: object) -> None:
            self.stopping = True

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self.stopping:
                self.poll()
                time.sleep(self.interval_s)
            return 0
        finally:
            self.cluster.stop()
            for s, h in previous.items():
                signal.signal(s, h)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (as SIGINT does) while the block runs, so that a cluster
    being started is stopped by the code that started it instead of being orphaned."""

    def handler(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_until_signal(cluster: Cluster) -> int:
    """Supervise `cluster` (restart children that die) until SIGINT/SIGTERM; then stop everything."""
    return Supervisor(cluster).run_until_signal()
