from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from app.cli import build_parser, main


def test_train_defaults_to_four_members_in_the_default_bundle():
    args = build_parser().parse_args(["train"])
    assert args.k == 4 and str(args.out) == "bundles/default"


def test_bundle_location_follows_the_environment(monkeypatch):
    monkeypatch.setenv("COINSERVE_BUNDLE", "/srv/bundle")
    assert str(build_parser().parse_args(["train"]).out) == "/srv/bundle"


def test_missing_dataset_is_one_clear_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COINSERVE_DATA", str(tmp_path))
    assert main(["train", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coinserve train: dataset missing:") and "Traceback" not in err
    assert err.count("\n") == 1


def test_unknown_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fly"])
    assert exc.value.code == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def test_up_serves_grpc_on_8001_unless_told(monkeypatch):
    assert build_parser().parse_args(["up"]).grpc_port == 8001
    assert build_parser().parse_args(["up", "--grpc-port", "0"]).grpc_port == 0
    monkeypatch.setenv("COINSERVE_GRPC_PORT", "9101")
    assert build_parser().parse_args(["up"]).grpc_port == 9101


def test_clusters_started_by_the_launcher_leave_8001_alone(monkeypatch, tmp_path):
    """Tests and benchmarks start many clusters: none reaches for the default gRPC port."""
    import json

    from app import launcher

    (tmp_path / "manifest.json").write_text(json.dumps({"members": [], "coded": []}))
    started = []
    monkeypatch.setattr(launcher, "spawn", lambda name, port, args, env, log_dir=None: started.append(args))
    launcher.start(tmp_path, 9000)
    launcher.start(tmp_path, 9002, grpc_port=9003)
    assert [a[a.index("--grpc-port") + 1] for a in started] == ["0", "9003"]


# --- help people can read (issue 29) ------------------------------------------------------------

FIRST_SENTENCE = re.compile(r"[A-Z][^\n]*?[^\s.]\.(\s|$)", re.S)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"": parser, **sub.choices}


def _description(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The paragraph after the usage block of `coinserve ARGV --help`, as a user reads it."""
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out.split("\n\n")[1]


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_help_opens_with_a_full_sentence(command, capsys):
    text = _description([command] if command else [], capsys)
    assert FIRST_SENTENCE.match(" ".join(text.split())), text


@pytest.mark.parametrize("suite", ["serving", "tail", "soak", "peers"])
def test_every_benchmark_help_opens_with_a_full_sentence(suite):
    out = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", suite, "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout.split("\n\n")[1]
    assert FIRST_SENTENCE.match(" ".join(text.split())), text


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_has_help_and_shows_its_default(command):
    parser = _commands()[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.option_strings}: no help"
        shown = formatter._expand_help(action)
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in shown, f"{command} {action.option_strings}: default not shown: {shown}"


@pytest.mark.parametrize(("command", "prefix"), [("gateway", "COINSERVE_"), ("worker", "COINSERVE_WORKER_")])
def test_every_setting_flag_names_its_default_and_environment_variable(command, prefix):
    from app.settings import GatewaySettings
    from workers.settings import WorkerSettings

    fields = (GatewaySettings if command == "gateway" else WorkerSettings).model_fields
    flags = [a for a in _commands()[command]._actions if a.dest in fields]
    assert len(flags) >= 10
    for action in flags:
        assert f"env {prefix}{action.dest.upper()})" in action.help and "default" in action.help, action.help


def test_setting_flags_reach_the_settings_and_unset_ones_leave_the_environment(monkeypatch):
    from app.settings import GatewaySettings

    monkeypatch.setenv("COINSERVE_CORS_ORIGINS", "https://a.example")
    args = build_parser().parse_args(["gateway", "--patience-quantile", "0.99", "--decode-policy", "eager"])
    settings = GatewaySettings(**{k: v for k, v in vars(args).items() if k in GatewaySettings.model_fields and v})
    assert (settings.patience_quantile, settings.decode_policy) == (0.99, "eager")
    assert settings.cors_origins == "https://a.example"


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"coinserve {importlib.metadata.version('coinserve')}\n"


def test_up_passes_its_gateway_flags_and_log_level_on(monkeypatch, tmp_path):
    import json

    from app import launcher

    (tmp_path / "manifest.json").write_text(json.dumps({"members": [{"name": "member-0"}], "coded": []}))
    started = []

    def spawn(name, port, args, env, log_dir=None):
        started.append(args)
        return launcher.Child(name, port, None, args, env)  # type: ignore[arg-type]

    monkeypatch.setattr(launcher, "spawn", spawn)
    cluster = launcher.start(
        tmp_path, 9000, "none", host="0.0.0.0", log_level="info", gateway_args=["--cors-origins", "*"]
    )
    worker, gateway = started
    assert worker[worker.index("--log-level") + 1] == "info" and "--host" not in worker
    assert gateway[gateway.index("--host") + 1] == "0.0.0.0" and gateway[gateway.index("--log-level") + 1] == "info"
    assert gateway[-2:] == ["--cors-origins", "*"]
    assert cluster.children[-1].url == "http://127.0.0.1:9000"  # a wildcard is reached on loopback


# --- a port already in use: one line naming the port and the flag, exit 2 ------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def _coinserve(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COINSERVE_BUNDLE": "/nonexistent/bundle"}  # nothing may start before the check
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *argv], capture_output=True, text=True, timeout=120, env=env
    )


def test_up_with_its_grpc_port_taken_says_so_in_one_line(taken_port):
    out = _coinserve("up", "--port", "0", "--grpc-port", str(taken_port))
    assert out.returncode == 2
    assert out.stderr == (
        f"coinserve up: port {taken_port} (gRPC, set with --grpc-port or COINSERVE_GRPC_PORT) is in use: "
        "choose another, or 0 to turn gRPC off\n"
    )


def test_up_with_its_http_port_taken_says_so_in_one_line(taken_port):
    out = _coinserve("up", "--port", str(taken_port), "--grpc-port", "0")
    assert out.returncode == 2
    assert (
        out.stderr
        == f"coinserve up: port {taken_port} (HTTP, set with --port or COINSERVE_PORT) is in use: choose another\n"
    )


def test_gateway_with_its_port_taken_says_so_in_one_line(taken_port):
    out = _coinserve("gateway", "--port", "0", "--grpc-port", str(taken_port))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1
    assert f"port {taken_port} (gRPC, set with --grpc-port or COINSERVE_GRPC_PORT) is in use" in out.stderr
