"""The README's examples of calling the service (curl, Triton's HTTP and gRPC clients), run as
written against a real service; `localhost:8000`/`localhost:8001` become its ports. The browser
example runs in tests/integration/test_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Public, request_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # the first to run pays for the session bundles
README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str, public: Public | None = None) -> str:
    """The code block after `<!-- example: NAME -->` in the README, with the service's ports."""
    found = re.search(rf"<!-- example: {re.escape(name)} -->\n```\w+\n(.*?)```", README.read_text(), re.S)
    assert found, f"README has no example {name!r}"
    code = found.group(1)
    if public is not None:
        code = code.replace("localhost:8000", f"127.0.0.1:{public.service.port}")
        code = code.replace("localhost:8001", f"127.0.0.1:{public.service.grpc_port}")
    return code


def test_curl_example(public, tmp_path):
    body = tmp_path / "request.json"
    body.write_text(json.dumps(request_body(1)))
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example("curl", public)],
        env={"BODY": str(body), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    answer, ready = (json.loads(line) for line in out.stdout.replace("}{", "}\n{").splitlines())
    assert [o["name"] for o in answer["outputs"]][-1] == "ensemble" and answer["model_version"] == "1"
    assert ready["ready"] is True


@pytest.mark.parametrize("name", ["python-http", "python-grpc"])
def test_python_examples(public, name):
    out = subprocess.run(
        [sys.executable, "-c", example(name, public)], capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stdout.splitlines()
    if name == "python-http":
        assert re.fullmatch(r"\[\d \d\] (True|False)", lines[0]), lines
    else:
        assert re.fullmatch(r"\[\d\]", lines[0]) and lines[1].startswith("coarse ") and lines[-1].startswith("final ")


def test_the_grpc_example_ends_with_the_error_when_the_stream_reports_one(public):
    """An error on the stream (here: a model the gateway does not serve; in CI once a refusal) ends
    the script with that error instead of leaving it hung on the client's stream thread."""
    code = example("python-grpc", public)
    code = code.replace('client.async_stream_infer("fashion"', 'client.async_stream_infer("nosuch"')
    assert '"nosuch"' in code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "no model group 'nosuch'" in out.stderr, out.stderr[-500:]
