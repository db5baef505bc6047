"""A real Redis for tests and benchmarks: Debian's `redis-server` on a free loopback port, no
persistence, killed on exit. `./dev.sh test` installs it (apt) where it is missing."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class RedisMissingError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@contextmanager
def redis_server(timeout_s: float = 10.0, port: int | None = None) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisMissingError("redis-server is missing: apt-get install -y redis-server (./dev.sh test does)")
    port = port or _free_port()
    with tempfile.TemporaryDirectory(prefix="coinserve-redis-") as folder:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--dir", folder, "--loglevel", "warning"]
        log = os.path.join(folder, "redis.log")
        args += ["--logfile", log]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = RedisServer(process, port)
        try:
            end = time.monotonic() + timeout_s
            while not server.ping():
                if process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited: {open(log).read()[-2000:] if os.path.exists(log) else ''}"
                    )
                if time.monotonic() > end:
                    raise RuntimeError(f"redis-server not answering on port {port} after {timeout_s:g} s")
                time.sleep(0.02)
            yield server
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            process.wait()
