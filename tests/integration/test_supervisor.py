"""`coinserve up` as a user runs it: the real command, real processes, real SIGKILL.

The launcher supervises its children: a worker or the gateway that dies is restarted on the same
port with the same command line (logged once per death and once per restart) while the gateway
keeps answering, the coded replica covering the missing member. Only SIGTERM/SIGINT ends it all.
The tests share one `coinserve up` and run in file order; the last one stops it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from app import launcher
from tests.integration.conftest import request_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
BACK_WITHIN_S = 15.0
T = TypeVar("T")


@dataclass
class Up:
    """A `coinserve up` process; a thread keeps reading its output (the children's too) into `lines`."""

    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    seen_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
        self.ended.set()

    def wait_for_line(self, pattern: str, timeout_s: float, start: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            finished = self.ended.is_set()  # `up` has exited: once these lines are read, no more will come
            for line in self.lines[start:]:
                if m := re.search(pattern, line):
                    return m
            if finished:
                break
            time.sleep(0.05)
        tail = "\n".join(self.lines[-30:])
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s; last output:\n{tail}")

    def children(self) -> dict[str, int]:
        """{'member-0': pid, ..., 'gateway': pid}: the live children, found as `ps` would find them
        (workers are forked by `up`'s zygote, app/zygote.py: its children, with their own command line)."""
        found = {}
        listed = list(processes())
        parents = {self.process.pid} | {
            pid for pid, ppid, argv in listed if ppid == self.process.pid and "app.zygote" in argv
        }
        for pid, ppid, argv in listed:
            if ppid in parents and "app.cli" in argv:
                name = argv[argv.index("--model") + 1] if "--model" in argv else argv[argv.index("app.cli") + 1]
                found[name] = pid
        self.seen_pids.update(found.values())
        return found

    def count(self, pattern: str) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))


def processes() -> Iterator[tuple[int, int, list[str]]]:
    """(pid, parent pid, argv) of every process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = [a for a in (entry / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
            if len(argv) == 1:  # a title set by setproctitle (a forked worker): one string, as ps shows it
                argv = argv[0].split()
        except OSError:  # it ended while we looked
            continue
        if stat.rpartition(")")[2].split()[0] == "Z":
            continue
        yield int(entry.name), int(stat.rpartition(")")[2].split()[1]), argv


def is_alive(pid: int) -> bool:
    return any(p == pid for p, _, _ in processes())


@pytest.fixture(scope="module")
def up(coded_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    bundle = shutil.copytree(coded_bundle, tmp_path_factory.mktemp("up") / "bundle")  # `up` writes into it
    port = launcher.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COINSERVE_")} | {"PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "app.cli", "up", "--bundle", str(bundle), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    service = Up(process, port)
    reader = threading.Thread(target=service.read, daemon=True)
    reader.start()
    try:
        service.wait_for_line(r"coinserve is up", timeout_s=120)
        service.children()
        yield service
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in service.seen_pids:  # never leave a stray worker behind, whatever failed
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
        reader.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()


def ready_body(url: str) -> dict | None:
    """The /v2/health/ready body when it answers 200, else None."""
    try:
        response = httpx.get(f"{url}/v2/health/ready", timeout=1)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def every_replica_up(url: str) -> dict | None:
    """The gateway's readiness body once it lists no replica down, else None."""
    body = ready_body(url)
    return body if body is not None and body["down"] == [] else None


def wait_until(check: Callable[[], T | None], timeout_s: float) -> T | None:
    """The first value `check()` gives that is not None, polling for at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (value := check()) is not None:
            return value
        time.sleep(0.1)
    return None


def send_load(url: str, rate: float, seconds: float) -> list[tuple[float, str | None]]:
    """JSON infers at `rate` a second for `seconds`: (monotonic send time, None or what went wrong) each."""
    body = request_body(1)
    results: list[tuple[float, str | None]] = []

    def one(client: httpx.Client) -> None:
        sent = time.monotonic()
        try:
            response = client.post(f"{url}/v2/models/fashion/infer", json=body)
            problem = None if response.status_code == 200 else f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as exc:
            problem = repr(exc)
        results.append((sent, problem))

    start = time.monotonic()
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(max_workers=16) as pool:
        for i in range(int(rate * seconds)):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            pool.submit(one, client)
    return results


def test_a_killed_worker_is_restarted_on_its_port_while_the_gateway_keeps_answering(up):
    """1. Send 20 JSON infers a second to the gateway for 11 s.
    2. 1 s in, SIGKILL member-0.
    Result: no request fails; `up` logs the death once and the restart once; the new member-0 is
    ready on its old port within 15 s, and the gateway lists no replica down again."""
    old_pid = up.children()["member-0"]
    worker_url = up.wait_for_line(r"replica member-0\s+(http://\S+)", timeout_s=1).group(1)
    mark = len(up.lines)
    load: list[tuple[float, str | None]] = []
    sender = threading.Thread(target=lambda: load.extend(send_load(up.url, rate=20, seconds=11)))
    sender.start()
    try:
        time.sleep(1)
        os.kill(old_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        new_pid = int(up.wait_for_line(r"member-0 restarted \(pid (\d+)\)", BACK_WITHIN_S, mark).group(1))
        assert wait_until(lambda: ready_body(worker_url), BACK_WITHIN_S - (time.monotonic() - killed_at)) is not None
        print(f"member-0 ready again {time.monotonic() - killed_at:.2f} s after SIGKILL")
    finally:
        sender.join()
    after_kill = [problem for sent, problem in load if killed_at <= sent < killed_at + 10]
    assert len(after_kill) >= 150 and [p for p in after_kill if p] == []
    assert [p for _, p in load if p] == []
    assert up.count(rf"member-0 \(pid {old_pid}\) was killed by SIGKILL; restarting in [\d.]+ s") == 1
    assert up.count(r"member-0 restarted") == 1 and up.count(r"restarting in") == 1
    assert up.children()["member-0"] == new_pid
    assert wait_until(lambda: every_replica_up(up.url), 40) is not None
    print(f"gateway sees every replica again {time.monotonic() - killed_at:.2f} s after SIGKILL")


def test_a_killed_gateway_is_restarted_on_its_port(up):
    """1. SIGKILL the gateway.
    Result: `up` logs the death and the restart once each; the new gateway answers readiness on the
    same port within 15 s, with the same replicas."""
    old_pid = up.children()["gateway"]
    mark = len(up.lines)
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    new_pid = int(up.wait_for_line(r"gateway restarted \(pid (\d+)\)", BACK_WITHIN_S, mark).group(1))
    body = wait_until(lambda: ready_body(up.url), BACK_WITHIN_S - (time.monotonic() - killed_at))
    assert body is not None
    print(f"gateway ready again {time.monotonic() - killed_at:.2f} s after SIGKILL")
    assert up.count(rf"gateway \(pid {old_pid}\) was killed by SIGKILL; restarting in [\d.]+ s") == 1
    assert up.count(r"gateway restarted") == 1
    assert up.children()["gateway"] == new_pid
    assert wait_until(lambda: every_replica_up(up.url), 30) is not None


def test_sigterm_to_up_ends_every_child(up):
    """1. SIGTERM `coinserve up` (the restarted children included).
    Result: it exits 0, every child has ended, and nothing was restarted on the way down."""
    pids = up.children()
    assert set(pids) == {"member-0", "member-1", "member-2", "coded-coin-0", "gateway"}
    restarts = up.count(r"restarting in")
    up.process.send_signal(signal.SIGTERM)
    assert up.process.wait(timeout=30) == 0
    assert [name for name, pid in pids.items() if is_alive(pid)] == []
    assert up.count(r"restarting in") == restarts
    assert ready_body(up.url) is None


def test_sigterm_while_up_is_still_starting_ends_every_child(coded_bundle, tmp_path):
    """1. Start `coinserve up`; SIGTERM it as soon as its children exist, before it is ready.
    Result: it exits, and none of its children outlives it (they were orphaned before the fix)."""
    bundle = shutil.copytree(coded_bundle, tmp_path / "bundle")
    port = launcher.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COINSERVE_")} | {"PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "app.cli", "up", "--bundle", str(bundle), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    service = Up(process, port)
    try:
        assert wait_until(lambda: len(service.children()) == 5 or None, 60)
        assert ready_body(service.url) is None  # still starting: the workers are loading
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) != 0  # interrupted before it was up
        alive = wait_until(lambda: [p for p in service.seen_pids if is_alive(p)] or None, 2)
        assert alive is None, f"children outlived `up`: {alive}"
    finally:
        if process.poll() is None:
            process.kill()
        for pid in service.seen_pids:
            if is_alive(pid):
                os.kill(pid, signal.SIGKILL)
