"""The model-building flags of `coinserve train`, `code` and `eval-coding` against models/ (issue 18)."""

from __future__ import annotations

from app.cli import build_parser


def test_coded_method_flags_match_the_models_package():
    from models.coded import EVALUATED, METHODS

    code = build_parser().parse_args(["code", "--method", "regmean-distill"])
    assert code.method == "regmean-distill"
    choices = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["code"]._actions if a.dest == "method"
    )
    assert tuple(choices.choices) == METHODS
    evaluate = build_parser().parse_args(["eval-coding"])
    assert tuple(evaluate.methods) == (*EVALUATED, "none")


def test_far_preset_and_explicit_flags_make_the_training_config():
    from models.train import preset

    args = build_parser().parse_args(["train", "--preset", "far", "--member-steps", "7"])
    assert args.preset == "far" and args.member_steps == 7 and args.alpha is None
    cfg = preset("far", member_steps=7)
    assert (cfg.member_steps, cfg.member_lr, cfg.alpha) == (7, 3e-4, 0.2)


def test_wide_preset_builds_the_wider_cnn_and_only_a_cnn():
    import pytest

    from models.networks import CNNConfig, build
    from models.train import PRESETS, model_config, preset

    assert build_parser().parse_args(["train", "--preset", "wide"]).preset == "wide"
    choices = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "preset"
    )
    assert set(choices.choices) == set(PRESETS)
    cfg = model_config(preset("wide"))
    assert cfg == CNNConfig(channels=(64, 128), hidden=512)
    assert build("cnn", cfg)[3].out_channels == 128
    assert model_config(preset("default")) == CNNConfig()
    with pytest.raises(ValueError, match="CNN setting"):
        model_config(preset("wide", architecture="mlp"))
