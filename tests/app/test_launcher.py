"""The launcher's supervision logic with fake processes and a fake clock (the real thing, with
SIGKILL and `coinserve up`, is in tests/integration/test_supervisor.py)."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest

from app import launcher
from app.launcher import Backoff, Child, Cluster, Supervisor, describe_exit


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def fake_child(name: str, port: int, pid: int) -> Child:
    return Child(name, port, FakeProcess(pid), ["worker", "--model", name], {}, None, started_s=100.0)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def supervised(clock: Clock) -> tuple[Cluster, Supervisor]:
    pids = iter(range(500, 600))

    def start_again(child: Child) -> Child:
        return Child(child.name, child.port, FakeProcess(next(pids)), child.args, child.env)  # type: ignore[arg-type]

    cluster = Cluster([fake_child("member-0", 9001, 10), fake_child("gateway", 9000, 11)])
    return cluster, Supervisor(cluster, clock=clock, start_again=start_again)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "app.launcher"]


def test_backoff_doubles_from_half_a_second_up_to_eight():
    backoff = Backoff()
    assert [backoff.delay_s(uptime_s=1.0) for _ in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]


def test_backoff_starts_over_once_the_child_stayed_up_long_enough():
    backoff = Backoff()
    assert [backoff.delay_s(1.0) for _ in range(4)] == [0.5, 1, 2, 4]
    assert backoff.delay_s(uptime_s=29.0) == 8
    assert backoff.delay_s(uptime_s=30.0) == 0.5
    assert backoff.delay_s(uptime_s=2.0) == 1


@pytest.mark.parametrize(
    ("returncode", "text"),
    [
        (-9, "was killed by SIGKILL"),
        (-15, "was killed by SIGTERM"),
        (1, "exited with status 1"),
        (0, "exited with status 0"),
    ],
)
def test_an_exit_is_described_by_status_or_signal_name(returncode, text):
    assert describe_exit(returncode) == text


def test_a_dead_child_is_logged_once_and_restarted_on_its_port_after_the_backoff(supervised, clock, caplog):
    cluster, supervisor = supervised
    caplog.set_level(logging.INFO, "app.launcher")
    cluster.children[0].process.returncode = -9
    for now_s in (100.0, 100.2, 100.4):
        clock.now_s = now_s
        supervisor.poll()
        assert cluster.children[0].process.pid == 10
    clock.now_s = 100.5
    supervisor.poll()
    supervisor.poll()
    new = cluster.children[0]
    assert (new.name, new.port, new.process.pid, new.args) == ("member-0", 9001, 500, ["worker", "--model", "member-0"])
    assert cluster.children[1].process.pid == 11
    assert messages(caplog) == [
        "member-0 (pid 10) was killed by SIGKILL; restarting in 0.5 s",
        "member-0 restarted (pid 500)",
    ]


def test_a_crash_loop_backs_off_and_a_long_uptime_resets_it(supervised, clock, caplog):
    cluster, supervisor = supervised
    caplog.set_level(logging.INFO, "app.launcher")
    for _ in range(3):  # dies at once, every time
        cluster.children[1].process.returncode = 1
        supervisor.poll()
        clock.now_s += 10
        supervisor.poll()
    cluster.children[1].process.returncode = 1
    clock.now_s += 30
    supervisor.poll()
    delays = [m.split("restarting in ")[1] for m in messages(caplog) if "restarting in" in m]
    assert delays == ["0.5 s", "1 s", "2 s", "0.5 s"]


def test_nothing_is_restarted_once_stopping(supervised, clock, caplog):
    cluster, supervisor = supervised
    cluster.children[0].process.returncode = -15
    supervisor.stopping = True
    clock.now_s += 60
    supervisor.poll()
    assert cluster.children[0].process.pid == 10 and messages(caplog) == []


def test_a_restart_that_cannot_start_is_tried_again_later(supervised, clock, caplog):
    cluster, supervisor = supervised
    caplog.set_level(logging.INFO, "app.launcher")
    working = supervisor.start_again

    def fail(_child: Child) -> Child:
        raise OSError("no more processes")

    supervisor.start_again = fail
    cluster.children[0].process.returncode = -9
    supervisor.poll()
    clock.now_s += 1
    supervisor.poll()
    assert "member-0 could not be started (no more processes); retrying in 1 s" in messages(caplog)
    supervisor.start_again = working
    clock.now_s += 1
    supervisor.poll()
    assert cluster.children[0].process.pid == 500


def test_respawn_starts_the_same_command_line_env_and_port_again(tmp_path):
    env = {**os.environ, "LAUNCHER_TEST": "1"}
    first = launcher.spawn("member-0", 9001, ["--help"], env, tmp_path)
    second = launcher.respawn(first)
    assert second.process.wait(timeout=60) == 0 and first.process.wait(timeout=60) == 0
    assert (second.name, second.port, second.args, second.env, second.log_dir) == (
        "member-0",
        9001,
        ["--help"],
        env,
        tmp_path,
    )
    assert second.process.pid != first.process.pid
    assert (tmp_path / "member-0.log").read_text().count("usage: coinserve") == 2


def test_a_child_not_started_by_spawn_cannot_be_respawned():
    with pytest.raises(ValueError, match="member-0 was not started by spawn"):
        launcher.respawn(Child("member-0", 9001, FakeProcess(1)))  # type: ignore[arg-type]


def test_sigterm_ends_supervision_and_stops_the_cluster(supervised):
    cluster, supervisor = supervised
    stopped = []
    cluster.stop = lambda grace_s=10.0: stopped.append(grace_s)  # type: ignore[method-assign]
    before = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert supervisor.run_until_signal() == 0
    assert stopped == [10.0] and signal.getsignal(signal.SIGTERM) is before


def test_free_port_never_hands_out_a_port_it_gave_lately(monkeypatch):
    """The kernel offered the same port twice before anybody bound it (a worker's channel port was
    another worker's HTTP port, and one of them died): free_port() asks again instead."""
    offered = iter([46001, 46001, 46001, 46002])

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(launcher.socket, "socket", Socket)
    assert [launcher.free_port(), launcher.free_port()] == [46001, 46002]
