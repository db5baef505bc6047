from __future__ import annotations

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
