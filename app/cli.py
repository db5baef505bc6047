"""The `coinserve` console script. Subcommands import `models`/`workers` inside their bodies,
so that importing `app` never loads torch (STYLE §1)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from app.configuration_doc import shown

DEFAULT_BUNDLE = Path("bundles/default")
DEFAULT_CODED_METHOD = "average-distill"  # chosen on validation by eval-coding (docs/results/coding.json)
BUNDLE_ENV = "COINSERVE_BUNDLE"


DESCRIPTION = """\
Inference serving where a few slow replicas do not decide the tail: coinserve asks k models the
same question and protects them with a coded model, so that a straggler's answer is decoded from
the others', and it answers coarse first, then refined, so that no request waits past its
deadline. It speaks the Open Inference Protocol v2 (HTTP and gRPC).

Start with `coinserve up` (it trains the default bundle on the first run); `coinserve COMMAND
--help` documents each command. Every setting: docs/configuration.md; when something goes wrong:
docs/troubleshooting.md."""


def default_bundle() -> Path:
    return Path(os.environ.get(BUNDLE_ENV) or DEFAULT_BUNDLE)


def version() -> str:
    """The installed distribution's version: pyproject.toml's, through the package metadata."""
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("coinserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless it already names one (or has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default %(default)s)"


class TopHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """`coinserve --help`: DESCRIPTION's paragraphs as written."""


def _command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand: `summary` is its line in `coinserve --help`, `description` opens its own --help."""
    return sub.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)


def _setting_flags(p: argparse.ArgumentParser, settings: Any, skip: Collection[str] = ()) -> None:
    """One flag per field of a pydantic-settings class (uvicorn's habit: a flag and an environment
    variable feed one object): the help is its description, default and variable. Flags default to
    None, so that an unset flag leaves the environment's value in force."""
    prefix = settings.model_config["env_prefix"]
    for name, field in settings.model_fields.items():
        if name in skip:
            continue
        default = field.get_default(call_default_factory=True)
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else None
        text = (field.description or "").replace("%", "%%")
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            choices=choices,
            metavar=None if choices else name.upper(),
            help=f"{text} (default {shown(default)}; env {prefix}{name.upper()})",
        )


def _bundle_flag(p: argparse.ArgumentParser, flag: str = "--bundle", what: str = "the bundle folder") -> None:
    p.add_argument(
        flag, type=Path, default=default_bundle(), help=f"{what} (default ${BUNDLE_ENV} or {DEFAULT_BUNDLE})"
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from models.train import preset, train_bundle

    flags = {
        "member_steps": args.member_steps,
        "member_lr": args.member_lr,
        "alpha": args.alpha,
        "base_epochs": args.epochs,
    }
    cfg = preset(
        args.preset,
        architecture=args.architecture,
        k=args.k,
        seed=args.seed,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        **{name: value for name, value in flags.items() if value is not None},
    )
    manifest = train_bundle(args.out, cfg, choose_recipe=args.choose_recipe)
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
    p = _command(
        sub,
        "train",
        "train a base model and k members into a bundle",
        "Train a base model on the default dataset, fine-tune k members on shards of it, and write them as "
        "a bundle (docs/training.md). Coded models are added afterwards by `coinserve code`.",
    )
    _bundle_flag(p, "--out", "the bundle folder to write")
    p.add_argument("--k", type=int, default=4, help="number of members (default 4)")
    p.add_argument("--architecture", choices=("cnn", "mlp"), default="cnn", help="the network of every model")
    p.add_argument("--seed", type=int, default=0, help="seed of the shards, initialisation and batches")
    p.add_argument(
        "--preset",
        choices=("default", "far", "wide"),
        default="default",
        help="default: 100 steps, lr 1e-4, alpha 0.5; far: members far apart (1000 steps, lr 3e-4, alpha 0.2); "
        "wide: a 4x wider CNN (64/128 channels, 512 hidden, 8 base epochs)",
    )
    p.add_argument("--epochs", type=int, default=None, help="base training epochs (default 6)")
    p.add_argument("--member-steps", type=int, default=None, help="fine-tuning steps per member (preset's)")
    p.add_argument("--member-lr", type=float, default=None, help="fine-tuning learning rate (preset's)")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet concentration of the shards (preset's)")
    p.add_argument(
        "--choose-recipe",
        action="store_true",
        help="choose shard alpha, member lr and steps on the validation split from docs/training.md's grid",
    )
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only the first N test images")
    p.set_defaults(func=_cmd_train)


def _cmd_import(args: argparse.Namespace) -> int:
    from models.importer import import_bundle
    from models.runtime import use_all_cores

    use_all_cores()
    import_bundle(
        args.out,
        args.calibration,
        spec_path=args.spec,
        members=[_named_file("--member", text) for text in args.member],
        onnx=[_named_file("--onnx", text) for text in args.onnx],
        eval_paths=tuple(args.eval) if args.eval else None,
        name=args.name,
        force=args.force,
        valid_range=tuple(args.input_range) if args.input_range else None,
    )
    print(f"next: coinserve code --bundle {args.out} && coinserve up --bundle {args.out}")
    return 0


def _named_file(flag: str, text: str) -> tuple[str, Path]:
    from models.errors import ImportSpecError

    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ImportSpecError(f"{flag} wants NAME=FILE, got {text!r}")
    return name, Path(path)


def _add_import(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _command(
        sub,
        "import",
        "make a bundle of your own k models: safetensors state dicts plus a layer spec, or ONNX files",
        "Make a bundle of your own k models (docs/import.md): check every member against the architecture, "
        "fold batch norms, and write the bundle atomically (nothing is left behind on any error). Never unpickles.",
    )
    p.add_argument("--out", type=Path, required=True, help="the bundle folder to create")
    p.add_argument("--spec", type=Path, help="layer spec JSON: input, labels or classes, layers (docs/import.md)")
    p.add_argument(
        "--member", action="append", default=[], metavar="NAME=WEIGHTS.safetensors", help="a member's state dict"
    )
    p.add_argument("--onnx", action="append", default=[], metavar="NAME=MODEL.onnx", help="a member exported to ONNX")
    p.add_argument(
        "--calibration", type=Path, required=True, help="unlabelled float32 .npy inputs [N, *input shape] (Fisher)"
    )
    p.add_argument(
        "--eval", nargs=2, type=Path, metavar=("INPUTS.npy", "LABELS.npy"), help="a labelled held-out set (optional)"
    )
    p.add_argument("--name", help="the group name served at /v2/models/NAME (default: the spec's, else --out's)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument(
        "--input-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="the input's valid values, e.g. 0 1: the gateway refuses a request with any value outside [LOW, HIGH] "
        "(default: the spec's input.range, else unchecked)",
    )
    p.set_defaults(func=_cmd_import)


def _cmd_code(args: argparse.Namespace) -> int:
    from models.bundle import open_bundle
    from models.coded import BUILD_OPTIONS, build_coded, ingredients_from_options, write_coded
    from models.runtime import use_all_cores

    use_all_cores()
    bundle = open_bundle(args.bundle)
    ingredients = ingredients_from_options(bundle, **{name: getattr(args, name) for name in BUILD_OPTIONS})
    k = len(bundle.member_names)
    coded = build_coded(ingredients, args.method, k, args.r)
    data = ingredients.data()
    entries = write_coded(bundle, coded, data.test_split() if data.has_test else None)
    print(f"{args.method}: {len(entries)} coded model(s) over {k} members built in {coded.build_seconds:.2f} s")
    for entry in entries:
        coeffs = ", ".join(f"{a:.4f}" for a in entry["coefficients"])
        accuracy = f", test accuracy {entry['test_accuracy']:.4f}" if "test_accuracy" in entry else ""
        print(f"  {entry['name']}: coefficients [{coeffs}]{accuracy}")
    return 0


# Coded-model methods, spelled out (not imported from models.coded) so that building the parser
# never loads torch; tests/models/test_cli_flags.py checks them against models.coded.
CODE_METHODS = (
    "coin",
    "coin-norm",
    "average",
    "regmean",
    "coin-distill",
    "coin-norm-distill",
    "average-distill",
    "regmean-distill",
    "parity",
)


def _add_build_options(p: argparse.ArgumentParser) -> None:
    """How coded models are built (models.coded.BUILD_OPTIONS): shared by `code` and `eval-coding`."""
    p.add_argument(
        "--fisher", choices=("true", "sampled", "empirical"), default="true", help="Fisher estimator (coin*)"
    )
    p.add_argument(
        "--calibration-images", type=int, default=1000, help="validation images for Fisher, Grams, temperature"
    )
    p.add_argument("--parity-epochs", type=int, default=6, help="training epochs of the parity model (parity)")
    p.add_argument("--no-calibrate", action="store_true", help="skip the output-temperature fit of merged models")
    p.add_argument("--regmean-alpha", type=float, default=0.95, help="off-diagonal Gram scaling (regmean*)")
    p.add_argument("--distill-steps", type=int, default=100, help="Adam steps toward the mixture (*-distill)")
    p.add_argument("--distill-lr", type=float, default=1e-4, help="distillation learning rate (*-distill)")
    p.add_argument("--distill-loss", choices=("mse", "kl"), default="mse", help="distillation loss (*-distill)")
    p.add_argument("--distill-images", type=int, default=10000, help="unlabelled training images to distil on")


def _add_code(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    methods = CODE_METHODS
    p = _command(
        sub,
        "code",
        "add coded models (COIN, another merge, or a baseline) to a bundle",
        "Build the coded model(s) that protect a bundle's members and add them to the bundle (docs/coin.md).",
    )
    _bundle_flag(p)
    p.add_argument("--r", type=int, choices=(1, 2), default=1, help="coded models = stragglers tolerated (default 1)")
    p.add_argument(
        "--method",
        choices=methods,
        default=DEFAULT_CODED_METHOD,
        help=f"how the coded model is built (default {DEFAULT_CODED_METHOD}, the validation winner: docs/coin.md)",
    )
    _add_build_options(p)
    p.set_defaults(func=_cmd_code)


def _cmd_eval_coding(args: argparse.Namespace) -> int:
    import json

    from models.bundle import open_bundle
    from models.coded import BUILD_OPTIONS, ingredients_from_options
    from models.coding_eval import evaluate_coding, report
    from models.runtime import use_all_cores
    from models.selection import choose_coding_method, coding_scores

    use_all_cores()
    bundle = open_bundle(args.bundle)
    rows, objective = evaluate_coding(
        bundle,
        ks=args.k,
        rs=args.r,
        methods=args.methods,
        test_limit=args.test_limit,
        ingredients=ingredients_from_options(bundle, **{name: getattr(args, name) for name in BUILD_OPTIONS}),
    )
    scores = coding_scores(rows)
    default = choose_coding_method(rows)  # validation rows only
    print(report(rows, objective, scores))
    print(f"default method (chosen on validation): {default}")
    if args.json:
        split = {name: [r for r in rows if r["split"] == name] for name in ("test", "validation")}
        out = {
            "default_method": default,
            "chosen_on": "validation",
            "validation_scores": scores,
            "rows": split["test"],
            "validation_rows": split["validation"],
            "objective": objective,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {len(split['test'])} test and {len(split['validation'])} validation rows to {args.json}")
    return 0


def _add_eval_coding(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    methods = tuple(m for m in CODE_METHODS if m != "coin-norm-distill")
    p = _command(
        sub,
        "eval-coding",
        "evaluate coded models: choose the default on validation, report on test",
        "Evaluate every way of building coded models: choose the default method on the validation split "
        "and report accuracy under stragglers on the test split (docs/coin.md).",
    )
    _bundle_flag(p)
    p.add_argument("--json", type=Path, default=None, help='write {"default_method", "rows", "validation_rows", ...}')
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 4], help="numbers of members to evaluate")
    p.add_argument("--r", type=int, nargs="+", default=[1, 2], help="numbers of coded models (stragglers tolerated)")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=(*methods, "coin-norm-distill", "none"),
        default=[*methods, "none"],
        help="the methods to compare ('none': no coded model)",
    )
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on only the first N test images")
    _add_build_options(p)
    p.set_defaults(func=_cmd_eval_coding)


def _cmd_eval_refinement(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace

    from models.bitplanes import RefinementPlan
    from models.bundle import open_bundle
    from models.layered_sim import SimConfig
    from models.refine_eval import evaluate_refinement, markdown
    from models.runtime import keep_freed_memory, use_all_cores

    use_all_cores()
    keep_freed_memory()
    bundle = open_bundle(args.bundle)
    served = RefinementPlan.from_dict(bundle.manifest.get("refinement"))
    plans = {"served": served}
    if served.grid is not None:  # the same planes by float32 truncation: before/after in one run
        plans["served, float32 kernels"] = replace(served, grid=None)
    for text in args.plan:  # extra plans use the served activation grid, if any (int8 up to 6 planes)
        plans[text] = replace(RefinementPlan.parse(text), grid=served.grid)
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
    p = _command(
        sub,
        "eval-refinement",
        "measure successive refinement on the test split",
        "Measure successive refinement on the test split: accuracy and compute time of every resolution "
        "of a bundle model's bit-planes (docs/refinement.md).",
    )
    _bundle_flag(p)
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    p.add_argument("--model", default="member-0", help="which bundle model to refine (default member-0)")
    p.add_argument("--plan", action="append", default=["3,4,5,6,8"], help="extra plans to measure, e.g. 3,4,5,6,8")
    p.add_argument("--repeats", type=int, default=40, help="timed repetitions per resolution (median reported)")
    p.add_argument("--linear-jobs", type=int, default=100, help="jobs per deadline in the linear-case simulation")
    p.add_argument("--no-linear", action="store_true", help="skip the linear-case simulation")
    p.set_defaults(func=_cmd_eval_refinement)


def _cmd_worker(args: argparse.Namespace) -> int:
    import threading

    from app.serve import serve
    from workers.server import create_app
    from workers.settings import WorkerSettings

    overrides = {k: v for k, v in vars(args).items() if k in WorkerSettings.model_fields and v is not None}
    settings = WorkerSettings(**overrides)
    _configure_logging(args.log_level)
    if settings.nice:
        os.nice(settings.nice)  # see WorkerSettings.nice: the gateway's timers come first on a shared host
    drain = threading.Event()
    serve(
        create_app(settings, drain),
        settings.host,
        settings.port,
        args.log_level,
        settings.graceful_s,
        args.drain_s,
        drain.set,
    )
    return 0


def _add_worker(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from workers.settings import WorkerSettings

    p = _command(
        sub,
        "worker",
        "run one replica serving one bundle model (flags or COINSERVE_WORKER_* env)",
        "Run one replica: it serves one bundle model (or several, comma-separated) to gateways over its "
        "channel, and health, metadata and metrics over HTTP. Every flag is also a COINSERVE_WORKER_* "
        "variable (docs/configuration.md); the shared secret is set only by variable or file.",
    )
    _setting_flags(p, WorkerSettings, skip=("faults", "shared_secret"))
    p.add_argument("--log-level", default="warning", help="debug, info (start-up facts too), warning or error")
    p.add_argument("--drain-s", type=float, default=0.0, help="keep serving this long with readiness failing first")
    p.set_defaults(func=_cmd_worker)


def _configure_logging(level: str) -> None:
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")


def _ensure_bundle(bundle: Path, coded_method: str | None) -> None:
    """Train the default bundle when it is missing, and build its coded model (progress is printed)."""
    from models.bundle import MANIFEST, open_bundle
    from models.errors import BundleError

    if not (bundle / MANIFEST).is_file():
        if bundle != default_bundle():
            raise BundleError(
                f"no bundle at {bundle}: make one with `coinserve import --out {bundle} ...` (your own models) "
                f"or `coinserve train --out {bundle}`"
            )
        print(f"no bundle at {bundle}: training the default one (about 80 s on 2 cores)")
        _cmd_train(build_parser().parse_args(["train", "--out", str(bundle)]))
    coded = open_bundle(bundle, verify=False).coded
    method = coded_method or (None if coded else DEFAULT_CODED_METHOD)
    if method is not None and method != "none" and not any(e.get("method") == method for e in coded):
        print(f"bundle {bundle} has no {method} coded model: building it")
        _cmd_code(build_parser().parse_args(["code", "--bundle", str(bundle), "--method", method]))


def _example_request(bundle: Path) -> tuple[Path, str]:
    """The bundle's first example input as a ready-to-send V2 request, for the printed curl;
    → (its path, what it is)."""
    import json
    import tempfile

    from models.bundle import open_bundle
    from models.sources import example_request, examples

    opened = open_bundle(bundle, verify=False)
    body = example_request(opened)
    label = int(examples(opened).labels[0])
    what = f"labelled {opened.spec.label(label)!r}, class {label}" if label >= 0 else "unlabelled"
    for folder in (bundle, Path(tempfile.gettempdir())):  # the bundle may be read-only (the container image)
        path = folder / "example-request.json"
        try:
            path.write_text(json.dumps(body))
            return path, what
        except OSError:
            continue
    raise OSError("cannot write the example request anywhere")


def _cmd_up(args: argparse.Namespace) -> int:
    from app import launcher
    from models.bundle import open_bundle

    _configure_logging("warning")  # the supervisor's one line per death and per restart
    _check_up_ports(args)  # before anything starts, training included
    _ensure_bundle(args.bundle, args.coded_method)
    group = open_bundle(args.bundle, verify=False).spec.group
    example, what = _example_request(args.bundle)
    gateway_args = [
        arg
        for flag, value in (
            ("--auth-token-file", args.auth_token_file),
            ("--cors-origins", args.cors_origins),
            ("--stream-store", args.stream_store),
        )
        if value is not None
        for arg in (flag, str(value))
    ]
    with launcher.interruptible():  # SIGTERM while starting: stop what was started, orphan nothing
        cluster = launcher.start(
            args.bundle,
            args.port,
            args.coded_method,
            gateway_args=gateway_args,
            grpc_port=args.grpc_port,
            host=args.host,
            log_level=args.log_level,
        )
        try:
            launcher.wait_ready(cluster)
        except (RuntimeError, TimeoutError) as exc:
            cluster.stop()
            print(f"coinserve up: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            cluster.stop()
            print("coinserve up: stopped before every process was ready", file=sys.stderr)
            return 130
    gateway = cluster.children[-1]
    base = gateway.url
    print(f"\ncoinserve is up: gateway {base} (group {group!r}, pid {gateway.process.pid}), metrics {base}/metrics")
    print(f"  console: open {base}/ in a browser (the bundle's examples, answers as they refine, the replicas)")
    if args.grpc_port:
        print(f"  gRPC (OIP v2 GRPCInferenceService) on {args.host}:{args.grpc_port}")
    for child in cluster.children[:-1]:
        print(f"  replica {child.name:14s} {child.url}  channel {child.channel_url}  (pid {child.process.pid})")
    print(f"\ntry it (the bundle's first example input, {what}):")
    json_type = "-H 'Content-Type: application/json'"
    token_file = args.auth_token_file or os.environ.get("COINSERVE_AUTH_TOKEN_FILE")
    if token_file or os.environ.get("COINSERVE_AUTH_TOKEN"):
        token = f"$(cat {token_file})" if token_file else "$COINSERVE_AUTH_TOKEN"
        json_type += f' -H "Authorization: Bearer {token}"'

    print(f"  curl -s {base}/v2/models/{group}/infer {json_type} -d @{example}")
    print(f"  curl -sN {base}/v2/models/{group}/infer -H 'Accept: text/event-stream' {json_type} -d @{example}")
    print("\nA process that dies is restarted on its port; Ctrl-C (or SIGTERM) stops every process.", flush=True)
    return launcher.run_until_signal(cluster)


def _check_up_ports(args: argparse.Namespace) -> None:
    """Every port `up` listens on itself (the workers' are found free when they start)."""
    from app.ports import Listener, check_free

    check_free(
        args.host,
        [
            Listener(args.port, "HTTP, set with --port or COINSERVE_PORT"),
            Listener(args.grpc_port, "gRPC, set with --grpc-port or COINSERVE_GRPC_PORT", GRPC_ADVICE),
        ],
    )


GRPC_ADVICE = "choose another, or 0 to turn gRPC off"


def _add_up(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _command(
        sub,
        "up",
        "run the whole service on one machine: k members, coded replica(s), gateway",
        "Run the whole service on this machine: the k member replicas and the coded replica(s) on loopback, "
        "and the gateway on --host; train the default bundle first if it is missing; restart a process that "
        "dies; stop everything on Ctrl-C or SIGTERM. Every COINSERVE_* variable in the environment reaches "
        "the gateway (deadlines, admission limits, health checks...: docs/configuration.md); the flags below "
        "are the ones people reach for.",
    )
    _bundle_flag(p)
    p.add_argument(
        "--host",
        default=os.environ.get("COINSERVE_HOST", "127.0.0.1"),
        help="the gateway's address, HTTP and gRPC; 0.0.0.0: every interface (default $COINSERVE_HOST or 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("COINSERVE_PORT", "8000")),
        help="the gateway's HTTP port (default $COINSERVE_PORT or 8000)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=int(os.environ.get("COINSERVE_GRPC_PORT", "8001")),
        help="the gateway's gRPC port; 0: off (default $COINSERVE_GRPC_PORT or 8001)",
    )
    p.add_argument(
        "--auth-token-file",
        type=Path,
        help="clients must send Authorization: Bearer <the file's content> (default $COINSERVE_AUTH_TOKEN_FILE "
        "or $COINSERVE_AUTH_TOKEN, else no token)",
    )
    p.add_argument(
        "--cors-origins",
        help="comma-separated origins whose pages may call the gateway (default $COINSERVE_CORS_ORIGINS, else none)",
    )
    p.add_argument(
        "--stream-store",
        help="where /v1/requests event logs live: memory or redis://HOST:PORT/DB "
        "(default $COINSERVE_STREAM_STORE or memory)",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="every process's log level; info adds the start-up facts (which kernels serve, the stream store)",
    )
    p.add_argument(
        "--coded-method",
        default=None,
        help="which coded models serve (default: the bundle's; a bundle without any gets "
        f"{DEFAULT_CODED_METHOD}); 'none': no coding",
    )
    p.set_defaults(func=_cmd_up)


def _cmd_gateway(args: argparse.Namespace) -> int:
    import threading

    from pydantic import ValidationError

    from app.group import GroupConfigError
    from app.main import create_app
    from app.serve import serve
    from app.settings import GatewaySettings

    overrides: dict[str, object] = {
        k: v for k, v in vars(args).items() if k in GatewaySettings.model_fields and v is not None and k != "replicas"
    }
    if args.replica:
        overrides["replicas"] = dict(_replica(r) for r in args.replica)
    try:
        settings = GatewaySettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        print(f"coinserve gateway: {problems}", file=sys.stderr)
        return 2
    _check_gateway_ports(settings)
    _configure_logging(args.log_level)
    drain = threading.Event()
    try:
        app = create_app(settings, drain)
    except GroupConfigError as exc:
        print(f"coinserve gateway: {exc}", file=sys.stderr)
        return 2
    serve(app, settings.host, settings.port, args.log_level, settings.graceful_s, args.drain_s, drain.set)
    return 0


def _check_gateway_ports(settings: Any) -> None:
    from app.ports import Listener, check_free

    check_free(
        settings.host,
        [
            Listener(settings.port, "HTTP, set with --port or COINSERVE_PORT"),
            Listener(settings.grpc_port, "gRPC, set with --grpc-port or COINSERVE_GRPC_PORT", GRPC_ADVICE),
        ],
    )


def _replica(text: str) -> tuple[str, str]:
    name, sep, url = text.partition("=")
    if not sep or not name or not url.startswith("tcp://"):
        raise SystemExit(f"coinserve gateway: --replica wants NAME=tcp://HOST:PORT (a worker's channel), got {text!r}")
    return name, url


def _add_gateway(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from app.settings import GatewaySettings

    p = _command(
        sub,
        "gateway",
        "run the gateway (flags or COINSERVE_* env)",
        "Run the gateway: the V2 HTTP and gRPC endpoints, /v1/requests streams and the console, in front of "
        "replicas started with `coinserve worker`. Every flag is also a COINSERVE_* variable "
        "(docs/configuration.md); secrets are set only by variable or file, never on a command line.",
    )
    p.add_argument(
        "--replica", action="append", help="NAME=tcp://HOST:PORT: a member's or coded replica's channel (repeat)"
    )
    _setting_flags(p, GatewaySettings, skip=("replicas", "auth_token", "worker_secret"))
    p.add_argument("--drain-s", type=float, default=0.0, help="keep serving this long with readiness failing first")
    p.add_argument("--log-level", default="warning", help="debug, info (start-up facts too), warning or error")
    p.set_defaults(func=_cmd_gateway)


def _cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks live in bench/, which product code never imports: run them as their own process."""
    import subprocess

    command = [sys.executable, "-m", f"bench.{args.suite}", *args.rest]
    return subprocess.call(command)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _command(
        sub,
        "bench",
        "run a benchmark: serving, tail, soak or peers (see bench/)",
        "Run a benchmark as its own process; `coinserve bench SUITE --help` lists its flags. serving: overhead, "
        "throughput and deadlines; tail: tail latency under stragglers; soak: minutes of kills and stragglers; "
        "peers: against Ray Serve and Triton.",
    )
    p.add_argument("suite", choices=("serving", "tail", "soak", "peers"), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags, e.g. --quick --json PATH")
    p.set_defaults(func=_cmd_bench)


def _cmd_config_doc(args: argparse.Namespace) -> int:
    from app.configuration_doc import render

    text = render(build_parser())
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"coinserve config-doc: {args.out} is stale: run `coinserve config-doc`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


def _add_config_doc(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _command(
        sub,
        "config-doc",
        "write docs/configuration.md from the settings objects",
        "Write the configuration reference (every setting of the gateway and the workers: its environment "
        "variable, flag, default and meaning) from the settings classes themselves.",
    )
    p.add_argument("--out", type=Path, default=Path("docs/configuration.md"), help="the file to write")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the file differs")
    p.set_defaults(func=_cmd_config_doc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coinserve", description=DESCRIPTION, formatter_class=TopHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_up,
    _add_gateway,
    _add_worker,
    _add_train,
    _add_import,
    _add_code,
    _add_eval_coding,
    _add_eval_refinement,
    _add_bench,
    _add_config_doc,
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from app.ports import PortInUseError
    from models.errors import ModelsError

    try:
        code: int = args.func(args)
    except PortInUseError as exc:
        print(f"coinserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except ModelsError as exc:
        print(f"coinserve {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)  # one line
        return 2
    except ValidationError as exc:  # a bad setting: name it, without the input (it may be a secret)
        for error in exc.errors(include_input=False, include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            print(f"coinserve {args.command}: {where}: {error['msg']}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
