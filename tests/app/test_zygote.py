"""Workers forked from the launcher's zygote (app/zygote.py) are processes of their own: their own
command line, environment, output, signals and exit status, as with a fresh interpreter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.zygote import Zygote


@pytest.fixture
def zygote():
    z = Zygote()
    yield z
    z.close()


def spawn_logged(zygote: Zygote, args: list[str], env: dict[str, str], log: Path):
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        return zygote.spawn(args, env, fd)
    finally:
        os.close(fd)


def test_each_child_gets_its_own_environment_output_and_exit_status(zygote, tmp_path):
    env = {**os.environ, "COINSERVE_WORKER_BUNDLE": str(tmp_path / "no-such-bundle")}
    bad = spawn_logged(zygote, ["worker", "--port", "0"], env, tmp_path / "bad.log")
    good = spawn_logged(zygote, ["worker", "--help"], dict(os.environ), tmp_path / "good.log")
    assert bad.pid != good.pid != zygote.process.pid
    assert good.wait(timeout=60) == 0 and "Run one replica" in (tmp_path / "good.log").read_text()
    fresh = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--port", "0"], env=env, capture_output=True)
    assert bad.wait(timeout=60) == fresh.returncode != 0  # the exit status a fresh interpreter has
    assert "no-such-bundle" in (tmp_path / "bad.log").read_text()  # this child's environment, not the zygote's


def test_signals_reach_the_child_and_its_end_is_reported_like_popen(zygote, tiny_bundle_dir, tmp_path):
    args = ["worker", "--port", "0", "--bundle", str(tiny_bundle_dir)]
    child = spawn_logged(zygote, args, dict(os.environ), tmp_path / "w.log")
    cmdline = Path(f"/proc/{child.pid}/cmdline")
    deadline = time.monotonic() + 30
    while "app.cli worker --port 0" not in cmdline.read_bytes().decode() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "app.cli worker --port 0 --bundle" in cmdline.read_bytes().decode()  # what `ps` shows
    os.kill(child.pid, signal.SIGSTOP)
    assert child.poll() is None  # stopped is not ended
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    child.kill()
    assert child.wait(timeout=10) == -signal.SIGKILL and child.returncode == -signal.SIGKILL


def test_when_the_zygote_goes_its_children_go_with_it(tmp_path):
    z = Zygote()
    child = spawn_logged(z, ["worker", "--port", "0", "--bundle", str(tmp_path)], dict(os.environ), tmp_path / "w.log")
    os.kill(child.pid, signal.SIGSTOP)
    z.close()  # what happens when the launcher's process exits: the socket closes
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child.pid}").exists()
    assert child.poll() == -signal.SIGKILL  # asked after the zygote went: reported as killed
