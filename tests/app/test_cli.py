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
