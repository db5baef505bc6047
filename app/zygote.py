"""Worker processes forked from one process that has already imported them (issue 29: the suite's
budget, and every `coinserve up`).

A worker spends about 2 s of CPU importing torch and the serving stack before it reads a byte of
its bundle (measured on the 2-core EPYC: 1.95 s of its 2.6 s start-up); five of them starting
together on two cores took ~6 s, and the test suite starts about fifty clusters. The launcher
therefore starts one *zygote* per process (`python -m app.zygote`, on first use): it imports the
worker's modules once, then forks a child per worker with that worker's command line, environment
and log file. A forked worker is a real process of its own (its own pid, signals, exit status),
ready in a fraction of a second more than its bundle takes.

The zygote is this process's child and stays the parent of the workers it forks: `ForkedProcess`
is the `subprocess.Popen` face the launcher and the tests use (pid, poll, wait, signals), asking
the zygote for exit statuses over a socket pair. The zygote starts no thread and touches no
tensor before it forks, ignores Ctrl-C (its children get it as fresh processes would) and, when
the process that started it goes away (the socket closes), ends the workers it still has.
`COINSERVE_FORK_WORKERS=0` starts every worker with its own interpreter instead, as before.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

FORK_ENV = "COINSERVE_FORK_WORKERS"
# torch, the refinement engine, FastAPI and uvicorn: the ~2 s of imports a forked worker is spared
PRELOAD = ("setproctitle", "workers.server")
_MAX_MESSAGE = 1 << 20


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _receive(sock: socket.socket, buffer: bytearray, fds: list[int] | None = None) -> dict[str, Any] | None:
    """One JSON line (None at end of stream); descriptors that came with it are appended to `fds`."""
    while b"\n" not in buffer:
        if fds is None:
            chunk = sock.recv(65536)
        else:
            chunk, received, _flags, _address = socket.recv_fds(sock, 65536, 4)
            fds.extend(received)
        if not chunk:
            return None
        buffer += chunk
        if len(buffer) > _MAX_MESSAGE:
            raise ValueError("zygote message too long")
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    result: dict[str, Any] = json.loads(line)
    return result


class Zygote:
    """The zygote process of this process, and the one conversation with it (serialised by a lock:
    the tests poll children from several threads)."""

    def __init__(self, module: str = "app.cli", preload: tuple[str, ...] = PRELOAD) -> None:
        ours, theirs = socket.socketpair()
        self.module = module  # what a child runs, as `python -m MODULE ARGS` would
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.zygote", str(theirs.fileno()), *preload],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self.buffer = bytearray()
        self.lock = threading.Lock()

    def ask(self, message: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any]:
        with self.lock:
            _send(self.sock, message, fds)
            reply = _receive(self.sock, self.buffer)
        if reply is None:
            raise OSError(f"the worker zygote (pid {self.process.pid}) has gone away")
        if "error" in reply:
            raise OSError(reply["error"])
        return reply

    def spawn(self, command: list[str], env: dict[str, str], output: int | None = None) -> ForkedProcess:
        """Fork `python -m MODULE COMMAND...` with `env`; its stdout and stderr go to `output` (a
        descriptor) or, without one, where ours go now."""
        fds = [output] if output is not None else [sys.stdout.fileno(), sys.stderr.fileno()]
        message = {"op": "spawn", "module": self.module, "args": command, "env": env, "cwd": os.getcwd()}
        reply = self.ask(message, fds)
        return ForkedProcess(self, int(reply["pid"]), [sys.executable, "-m", self.module, *command])

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        """End the conversation: the zygote ends the workers it still has, and exits."""
        self.sock.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ForkedProcess:
    """A forked worker, as much of `subprocess.Popen` as the launcher and the tests use."""

    def __init__(self, zygote: Zygote, pid: int, args: list[str]) -> None:
        self.zygote, self.pid, self.args = zygote, pid, args
        self.returncode: int | None = None
        self.stdout = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                code = self.zygote.ask({"op": "poll", "pid": self.pid})["returncode"]
            except OSError:  # the zygote is gone, and with it (see `serve`) its children
                code = -signal.SIGKILL
            self.returncode = code
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid {self.pid} returncode {self.returncode}>"


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def forking() -> bool:
    return os.environ.get(FORK_ENV, "1") not in ("0", "false", "no")


def zygote() -> Zygote:
    """This process's zygote, started on first use (and again if it died)."""
    global _zygote
    with _zygote_lock:
        if _zygote is None or not _zygote.alive():
            if _zygote is None:
                atexit.register(_close)
            _zygote = Zygote()
        return _zygote


def _close() -> None:
    if _zygote is not None:
        _zygote.close()


# the zygote process ----------------------------------------------------------------------------------


def _child(message: dict[str, Any], fds: list[int], sock: socket.socket) -> None:
    """In the forked child: become `python -m MODULE ARGS` with its environment and output; never
    returns."""
    code: Any = 1
    try:
        sock.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if fds:  # one descriptor: stdout and stderr together; two: each its own
            os.dup2(fds[0], 1)
            os.dup2(fds[-1], 2)
            for fd in fds:
                if fd > 2:
                    os.close(fd)
        os.chdir(message["cwd"])
        os.environ.clear()
        os.environ.update(message["env"])
        module, args = message["module"], message["args"]
        sys.argv = [module, *args]
        from setproctitle import setproctitle

        # what `ps`, `pgrep -f` and /proc/PID/cmdline show: the command line it would have had
        setproctitle(" ".join([sys.executable, "-m", module, *args]))
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # whatever happens, the child must not return into the zygote's loop
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _reap(statuses: dict[int, int], children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        statuses[pid] = os.waitstatus_to_exitcode(status)


def serve(fd: int, preload: list[str]) -> None:
    """The zygote's loop: import the `preload` modules, then fork one child per request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches our children; we report their ends
    import setproctitle

    setproctitle.getproctitle()  # finds the argv memory now: a child clears its environment first
    for name in preload:
        importlib.import_module(name)

    sock = socket.socket(fileno=fd)
    buffer = bytearray()
    statuses: dict[int, int] = {}
    children: set[int] = set()
    try:
        while True:
            fds: list[int] = []
            message = _receive(sock, buffer, fds)
            if message is None:
                break
            _reap(statuses, children)
            if message["op"] == "spawn":
                pid = os.fork()
                if pid == 0:
                    _child(message, fds, sock)
                children.add(pid)
                _send(sock, {"pid": pid})
            elif message["op"] == "poll":
                _send(sock, {"returncode": statuses.get(message["pid"])})
            else:
                _send(sock, {"error": f"unknown zygote operation {message['op']!r}"})
            for descriptor in fds:
                os.close(descriptor)
    finally:  # the process that started us is gone: so are the workers it started
        for pid in children:
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2:])
