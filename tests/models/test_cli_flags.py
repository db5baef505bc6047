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
