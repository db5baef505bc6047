"""The peers' own virtual environments, outside the product's dependencies, made once and cached.

    ~/.cache/coinserve/peers/ray      ray[serve], torch, numpy, safetensors
    ~/.cache/coinserve/peers/triton   nvidia-pytriton (it ships the tritonserver binary), torch, ...
    ~/.cache/coinserve/peers/kserve   kserve's own client library (tests/integration/test_kserve_clients.py)

All are made with Debian's system `python3.11` (/usr/bin/python3.11): Triton's Python-backend stub
runs only from such a venv (../shared/ENVIRONMENT.md), and Ray and PyTriton need different protobuf
versions, so they never share one. kserve is a client, not a peer, but its generated gRPC code
registers the same message names as Triton's client, so the tests run it in a process of its own.
`COINSERVE_PEERS_CACHE` moves the cache. The project's root goes on PYTHONPATH of every peer
process (`env_for`), so they import bench/peers/member.py and the project's `models` exactly as the
workers do.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3.11"
COMMON = ["torch==2.13.0", "numpy>=1.26,<3", "safetensors>=0.4,<1"]
PACKAGES = {
    "ray": ["ray[serve]==2.60.0", *COMMON],
    "triton": ["nvidia-pytriton==0.7.0", *COMMON],
    "kserve": ["kserve==0.21.0"],
}


def cache_dir() -> Path:
    return Path(os.environ.get("COINSERVE_PEERS_CACHE", Path.home() / ".cache" / "coinserve" / "peers"))


def ensure(peer: str, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """The peer's venv (made and filled on first use; about a minute or two each); returns its python."""
    packages = PACKAGES[peer]
    venv = cache_dir() / peer
    stamp = hashlib.sha256("\n".join([PYTHON, *packages]).encode()).hexdigest()[:16]
    python = venv / "bin" / "python"
    marker = venv / ".coinserve-peer"
    if python.exists() and marker.exists() and marker.read_text() == stamp:
        return python
    if not Path(PYTHON).exists():
        raise RuntimeError(f"{PYTHON} is missing: apt-get install -y python3.11 python3.11-venv (Debian 12)")
    log(f"setting up the {peer} venv in {venv} (once): {' '.join(packages)}")
    subprocess.run([PYTHON, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages], check=True
    )
    marker.write_text(stamp)
    return python


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A peer process's environment: ours, the project root on PYTHONPATH, no COINSERVE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COINSERVE_", "VIRTUAL_ENV", "PYTHONHOME"))}
    env["PYTHONPATH"] = str(ROOT)
    return {**env, **(extra or {})}
