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


def _cmd_up(args: argparse.Namespace) -> int:
    """Until the serving path lands: make sure the default bundle exists and show its figures."""
    from models.bundle import MANIFEST, open_bundle

    if not (args.bundle / MANIFEST).is_file():
        print(f"no bundle at {args.bundle}: training the default one (about 2 minutes)")
        train_args = build_parser().parse_args(["train", "--out", str(args.bundle)])
        _cmd_train(train_args)
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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [_add_train, _add_up]


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
