"""The `coinserve` console script. Subcommands import `models`/`workers` inside their bodies,
so that importing `app` never loads torch (STYLE §1)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_BUNDLE = Path("bundles/default")
BUNDLE_ENV = "COINSERVE_BUNDLE"


def default_bundle() -> Path:
    return Path(os.environ.get(BUNDLE_ENV) or DEFAULT_BUNDLE)


def _cmd_train(args: argparse.Namespace) -> int:
    from models.train import TrainingConfig, train_bundle

    cfg = TrainingConfig(
        architecture=args.architecture,
        k=args.k,
        seed=args.seed,
        base_epochs=args.epochs,
        member_steps=args.member_steps,
        alpha=args.alpha,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
    )
    manifest = train_bundle(args.out, cfg)
    print(f"bundle written to {args.out}")
    print(f"  base test accuracy {manifest['base_test_accuracy']:.4f}")
    for member in manifest["members"]:
        print(f"  {member['name']} test accuracy {member['test_accuracy']:.4f}")
    off_diagonal = [v for i, row in enumerate(manifest["pairwise_disagreement"]) for j, v in enumerate(row) if i != j]
    if off_diagonal:
        print(f"  pairwise disagreement {min(off_diagonal):.4f} .. {max(off_diagonal):.4f}")
    print(f"  seconds {manifest['training']['seconds']}")
    return 0


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train a base model and k members into a bundle")
    p.add_argument(
        "--out", type=Path, default=default_bundle(), help=f"bundle folder (default: ${BUNDLE_ENV} or {DEFAULT_BUNDLE})"
    )
    p.add_argument("--k", type=int, default=4, help="number of members (default 4)")
    p.add_argument("--architecture", choices=("cnn", "mlp"), default="cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=6, help="base training epochs (default 6)")
    p.add_argument("--member-steps", type=int, default=100, help="fine-tuning steps per member (default 100)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the shards (default 0.5)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only the first N test images")
    p.set_defaults(func=_cmd_train)


def _cmd_code(args: argparse.Namespace) -> int:
    import torch

    from models.bundle import open_bundle
    from models.coded import Ingredients, build_coded, members_of, write_coded
    from models.data import load_split
    from models.runtime import use_all_cores

    use_all_cores()
    bundle = open_bundle(args.bundle)
    ingredients = Ingredients(
        bundle,
        members_of(bundle),
        calibration_images=args.calibration_images,
        fisher_kind=args.fisher,
        parity_epochs=args.parity_epochs,
        calibrate=not args.no_calibrate,
    )
    k = len(bundle.member_names)
    coded = build_coded(ingredients, args.method, k, args.r)
    test = load_split("test")
    entries = write_coded(bundle, coded, torch.from_numpy(test.images), test.labels)
    print(f"{args.method}: {len(entries)} coded model(s) over {k} members built in {coded.build_seconds:.2f} s")
    for entry in entries:
        coeffs = ", ".join(f"{a:.4f}" for a in entry["coefficients"])
        print(f"  {entry['name']}: coefficients [{coeffs}], test accuracy {entry['test_accuracy']:.4f}")
    return 0


def _add_code(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("code", help="add coded models (COIN or a baseline) to a bundle")
    p.add_argument("--bundle", type=Path, default=default_bundle())
    p.add_argument("--r", type=int, choices=(1, 2), default=1, help="coded models = stragglers tolerated (default 1)")
    p.add_argument("--method", choices=("coin", "average", "parity"), default="coin")
    p.add_argument("--fisher", choices=("true", "sampled", "empirical"), default="true", help="Fisher estimator (coin)")
    p.add_argument("--calibration-images", type=int, default=1000, help="validation images for the Fisher (coin)")
    p.add_argument("--parity-epochs", type=int, default=6, help="training epochs of the parity model (parity)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the output-temperature fit (coin, average)")
    p.set_defaults(func=_cmd_code)


def _cmd_eval_coding(args: argparse.Namespace) -> int:
    import json

    from models.bundle import open_bundle
    from models.coding_eval import evaluate_coding, report
    from models.runtime import use_all_cores

    use_all_cores()
    rows, objective = evaluate_coding(
        open_bundle(args.bundle),
        ks=args.k,
        rs=args.r,
        methods=args.methods,
        parity_epochs=args.parity_epochs,
        calibrate=not args.no_calibrate,
        test_limit=args.test_limit,
    )
    print(report(rows, objective))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def _add_eval_coding(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval-coding", help="evaluate COIN and the baselines on the test split")
    p.add_argument("--bundle", type=Path, default=default_bundle())
    p.add_argument("--json", type=Path, default=None, help="write one JSON object per (method, k, r, straggler)")
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--r", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--methods",
        nargs="+",
        choices=("coin", "average", "parity", "none"),
        default=["coin", "average", "parity", "none"],
    )
    p.add_argument("--parity-epochs", type=int, default=6)
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only the first N test images")
    p.add_argument("--no-calibrate", action="store_true", help="skip the output-temperature fit of merged models")
    p.set_defaults(func=_cmd_eval_coding)


def _cmd_eval_refinement(args: argparse.Namespace) -> int:
    import json

    from models.bitplanes import RefinementPlan
    from models.bundle import open_bundle
    from models.layered_sim import SimConfig
    from models.refine_eval import evaluate_refinement, markdown
    from models.runtime import keep_freed_memory, use_all_cores

    use_all_cores()
    keep_freed_memory()
    bundle = open_bundle(args.bundle)
    plans = {"served": RefinementPlan.from_dict(bundle.manifest.get("refinement"))}
    for text in args.plan:
        plans[text] = RefinementPlan.parse(text)
    report = evaluate_refinement(
        bundle,
        plans,
        model_name=args.model,
        repeats=args.repeats,
        linear=None if args.no_linear else SimConfig(jobs=args.linear_jobs),
    )
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _add_eval_refinement(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval-refinement", help="measure successive refinement on the test split")
    p.add_argument("--bundle", type=Path, default=default_bundle())
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--model", default="member-0", help="which bundle model to refine (default member-0)")
    p.add_argument("--plan", action="append", default=["3,4,5,6,8"], help="extra plans to measure, e.g. 3,4,5,6,8")
    p.add_argument("--repeats", type=int, default=40, help="timed repetitions per resolution (median reported)")
    p.add_argument("--linear-jobs", type=int, default=100, help="jobs per deadline in the linear-case simulation")
    p.add_argument("--no-linear", action="store_true", help="skip the linear-case simulation")
    p.set_defaults(func=_cmd_eval_refinement)


def _cmd_up(args: argparse.Namespace) -> int:
    """Until the serving path lands: make sure the default bundle exists and show its figures."""
    from models.bundle import MANIFEST, open_bundle

    if not (args.bundle / MANIFEST).is_file():
        print(f"no bundle at {args.bundle}: training the default one (about 2 minutes)")
        _cmd_train(build_parser().parse_args(["train", "--out", str(args.bundle)]))
    if not open_bundle(args.bundle, verify=False).coded:
        print(f"bundle {args.bundle} has no coded model: building the COIN coded model")
        _cmd_code(build_parser().parse_args(["code", "--bundle", str(args.bundle)]))
    bundle = open_bundle(args.bundle)
    print(f"bundle {args.bundle}: base test accuracy {bundle.manifest['base_test_accuracy']:.4f}")
    for member in bundle.manifest["members"]:
        print(f"  {member['name']} test accuracy {member['test_accuracy']:.4f}")
    return 0


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="make sure the default bundle exists (training it if missing) and run the service")
    p.add_argument("--bundle", type=Path, default=default_bundle())
    p.set_defaults(func=_cmd_up)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinserve", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_train,
    _add_code,
    _add_eval_coding,
    _add_eval_refinement,
    _add_up,
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from models.errors import ModelsError

    try:
        code: int = args.func(args)
    except ModelsError as exc:
        print(f"coinserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
