"""`coinserve import`: user models → a bundle; every malformed input gets one line naming the member
and the problem, a non-zero exit, and no bundle directory left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file
from torch import nn

from app.cli import main
from models.bundle import open_bundle
from models.errors import ImportSpecError, ModelsError
from models.importer import import_bundle, parse_spec
from models.layers import build_sequential, check_layers
from models.sources import source

MLP_LAYERS = [
    {"type": "Linear", "in_features": 16, "out_features": 32},
    {"type": "BatchNorm1d", "num_features": 32},
    {"type": "ReLU"},
    {"type": "Dropout", "p": 0.1},
    {"type": "Linear", "in_features": 32, "out_features": 5},
]
LABELS = ["ant", "bee", "cat", "dog", "eel"]


def _member(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = build_sequential(check_layers(MLP_LAYERS))
    with torch.no_grad():  # batch-norm statistics that folding must really carry
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture
def user_files(tmp_path: Path) -> dict[str, Path]:
    """What a user brings: a spec, k = 3 state dicts, calibration inputs and a labelled set."""
    rng = np.random.default_rng(0)
    files = {"spec": tmp_path / "spec.json", "calibration": tmp_path / "calib.npy"}
    files["spec"].write_text(
        json.dumps(
            {"input": {"name": "features", "shape": [16], "datatype": "FP32"}, "labels": LABELS, "layers": MLP_LAYERS}
        )
    )
    np.save(files["calibration"], rng.normal(size=(64, 16)).astype(np.float32))
    np.save(tmp_path / "eval_x.npy", rng.normal(size=(40, 16)).astype(np.float32))
    np.save(tmp_path / "eval_y.npy", rng.integers(0, 5, size=40))
    files["eval_x"], files["eval_y"] = tmp_path / "eval_x.npy", tmp_path / "eval_y.npy"
    for i in range(3):
        files[f"member-{i}"] = tmp_path / f"member-{i}.safetensors"
        save_file(_member(i).state_dict(), files[f"member-{i}"])
    return files


def _argv(files: dict[str, Path], out: Path, **override: object) -> list[str]:
    members = override.pop("members", [f"member-{i}={files[f'member-{i}']}" for i in range(3)])
    argv = ["import", "--out", str(out), "--spec", str(files["spec"]), "--calibration", str(files["calibration"])]
    for member in members:  # type: ignore[attr-defined]
        argv += ["--member", member]
    return argv + ["--eval", str(files["eval_x"]), str(files["eval_y"])]


def test_an_imported_bundle_serves_the_originals_probabilities(user_files, tmp_path):
    out = tmp_path / "bundle"
    assert main(_argv(user_files, out)) == 0
    bundle = open_bundle(out)  # every hash checked
    spec = bundle.spec
    assert (spec.group, spec.input.name, spec.input.shape, spec.labels) == ("bundle", "features", (16,), tuple(LABELS))
    assert [layer["type"] for layer in bundle.layers] == ["Linear", "ReLU", "Linear"]  # folded, dropped
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32))
    for i in range(3):
        with torch.no_grad():
            want = torch.softmax(_member(i)(x), 1)
            got = torch.softmax(bundle.build_model(f"member-{i}")(x), 1)
        assert torch.allclose(want, got, atol=1e-6)
    data = source(bundle)
    assert data.calibration.shape == (64, 16) and data.calibration_labels is None
    assert len(data.selection(1000)) + len(data.test_split()) == 40
    assert "test_accuracy" in bundle.manifest["members"][0]


def _one_line_error(capsys, argv: list[str], out: Path, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert message in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left


def test_malformed_imports_leave_nothing_behind(user_files, tmp_path, capsys):
    out = tmp_path / "bundle"
    files = user_files
    bad = tmp_path / "bad"
    bad.mkdir()

    def state(member: int, change) -> str:
        weights = dict(_member(member).state_dict())
        change(weights)
        path = bad / f"m{member}-{len(list(bad.iterdir()))}.safetensors"
        save_file(weights, path)
        return f"member-{member}={path}"

    good = [f"member-{i}={files[f'member-{i}']}" for i in range(3)]
    cases = [
        ([good[0], state(1, lambda w: w.pop("0.bias")), good[2]], "member 'member-1': missing weight '0.bias'"),
        (
            [good[0], good[1], state(2, lambda w: w.update(extra=torch.zeros(1)))],
            "member 'member-2': unexpected weight 'extra'",
        ),
        ([state(0, lambda w: w.update({"4.weight": torch.zeros(5, 31)})), *good[1:]], "'4.weight' has shape [5, 31]"),
        ([good[0], state(1, lambda w: w["0.weight"].__setitem__((0, 0), float("nan"))), good[2]], "NaN or infinite"),
        ([good[0], f"member-1={bad / 'nope.safetensors'}", good[2]], "member 'member-1': cannot read"),
        (
            [good[0], good[0].replace("member-0=", "member-1="), f"member-2={files['spec']}"],
            "is not a safetensors file",
        ),
        ([good[0], good[1].replace("member-1", "member-0", 1)], "given twice"),
        ([good[0]], "at least 2 members"),
    ]
    pickle = bad / "model.pt"
    pickle.write_bytes(b"\x80\x04not really a pickle")
    cases.append(([good[0], f"member-1={pickle}"], "never unpickles"))
    for members, message in cases:
        _one_line_error(capsys, _argv(files, out, members=members), out, message)


def test_bad_data_files_are_refused_by_name(user_files, tmp_path, capsys):
    out = tmp_path / "bundle"
    np.save(tmp_path / "wrong.npy", np.zeros((10, 15), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((10, 16), np.int64))
    np.save(tmp_path / "labels6.npy", np.full(40, 7))
    argv = _argv(user_files, out)
    calib = argv.index("--calibration") + 1
    for path, message in [
        (tmp_path / "wrong.npy", "--calibration: " + str(tmp_path / "wrong.npy") + " has shape [10, 15]"),
        (tmp_path / "ints.npy", "inputs must be floats"),
        (tmp_path / "absent.npy", "not found"),
    ]:
        _one_line_error(capsys, [*argv[:calib], str(path), *argv[calib + 1 :]], out, message)
    _one_line_error(capsys, [*argv[:-1], str(tmp_path / "labels6.npy")], out, "labels outside 0..4")


def test_input_range_is_declared_by_the_flag_or_the_spec(user_files, tmp_path, capsys):
    """`--input-range LOW HIGH` writes `input.range` (the gateway refuses values outside it); without it
    the spec's range holds, and without either the input is unchecked."""
    assert open_bundle(_import(user_files, tmp_path / "none")).spec.input.range is None
    ranged = _import(user_files, tmp_path / "flag", "--input-range", "-4", "4.5")
    assert json.loads((ranged / "manifest.json").read_text())["input"]["range"] == [-4.0, 4.5]
    assert open_bundle(ranged).spec.input.range == (-4.0, 4.5)
    spec = json.loads(user_files["spec"].read_text())
    spec["input"]["range"] = [-10, 10]
    user_files["spec"].write_text(json.dumps(spec))
    assert open_bundle(_import(user_files, tmp_path / "spec")).spec.input.range == (-10.0, 10.0)
    out = tmp_path / "bad"
    _one_line_error(
        capsys, [*_argv(user_files, out), "--input-range", "1", "0"], out, "--input-range must be [low, high]"
    )


def _import(files: dict[str, Path], out: Path, *flags: str) -> Path:
    assert main([*_argv(files, out), *flags]) == 0
    return out


def test_an_existing_bundle_is_kept_unless_forced(user_files, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(_argv(user_files, out)) == 0
    before = (out / "manifest.json").read_bytes()
    assert main(_argv(user_files, out)) == 2
    assert "exists" in capsys.readouterr().err and (out / "manifest.json").read_bytes() == before
    assert main([*_argv(user_files, out), "--force", "--name", "renamed"]) == 0
    assert open_bundle(out).spec.group == "renamed"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"input": {"name": "x", "shape": [16]}, "classes": 5, "layers": [{"type": "Conv3d"}]},
            "unsupported layer type 'Conv3d'",
        ),
        (
            {"input": {"name": "x", "shape": [16]}, "classes": 5, "layers": [{"type": "Linear", "in_features": 16}]},
            "missing arguments ['out_features']",
        ),
        (
            {
                "input": {"name": "x", "shape": [16]},
                "classes": 5,
                "layers": [{"type": "Linear", "in_features": 15, "out_features": 5}],
            },
            "layers[0] (Linear) cannot take an input of shape [16]",
        ),
        (
            {
                "input": {"name": "x", "shape": [16]},
                "classes": 4,
                "layers": [{"type": "Linear", "in_features": 16, "out_features": 5}],
            },
            "not the [4] class scores",
        ),
        ({"input": {"name": "x", "shape": [16]}, "layers": []}, "needs 'labels'"),
        (
            {
                "input": {"name": "x", "shape": [16]},
                "classes": 5,
                "layers": [
                    {"type": "BatchNorm1d", "num_features": 16},
                    {"type": "Linear", "in_features": 16, "out_features": 5},
                ],
            },
            None,
        ),
        (
            {"input": {"name": "x", "shape": [16]}, "classes": 5, "layers": [], "optimizer": "adam"},
            "unknown keys ['optimizer']",
        ),
    ],
)
def test_bad_specs_name_the_problem(spec, message):
    if message is None:  # parses: a batch norm with nothing before it fails at folding, on import
        parse_spec(spec, "spec")
        return
    with pytest.raises(
        ImportSpecError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ):
        parse_spec(spec, "spec")


def test_a_batch_norm_with_nothing_to_fold_into_is_refused(user_files, tmp_path, capsys):
    layers = [{"type": "BatchNorm1d", "num_features": 16}, {"type": "Linear", "in_features": 16, "out_features": 5}]
    user_files["spec"].write_text(json.dumps({"input": {"name": "x", "shape": [16]}, "classes": 5, "layers": layers}))
    members = []
    for i in range(2):
        path = tmp_path / f"bn-{i}.safetensors"
        save_file(build_sequential(check_layers(layers)).state_dict(), path)
        members.append(f"m{i}={path}")
    out = tmp_path / "bundle"
    _one_line_error(capsys, _argv(user_files, out, members=members), out, "must follow a Conv2d or Linear")


_json_scalars = st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) | st.text(max_size=6)
_layer = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "Conv2d",
                "Linear",
                "ReLU",
                "MaxPool2d",
                "AvgPool2d",
                "Flatten",
                "BatchNorm1d",
                "BatchNorm2d",
                "Dropout",
                "Sigmoid",
            ]
        )
    },
    optional={
        k: _json_scalars | st.lists(st.integers(-1, 5), max_size=3)
        for k in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "in_features",
            "out_features",
            "num_features",
            "p",
            "eps",
            "bias",
        )
    },
)
_spec = st.fixed_dictionaries(
    {},
    optional={
        "input": st.fixed_dictionaries(
            {"name": st.text(max_size=4), "shape": st.lists(st.integers(-1, 9), max_size=4) | _json_scalars},
            optional={"datatype": st.sampled_from(["FP32", "INT8", 3])},
        )
        | _json_scalars,
        "labels": st.lists(st.text(max_size=3), max_size=6) | _json_scalars,
        "classes": _json_scalars,
        "layers": st.lists(_layer, max_size=6) | _json_scalars,
        "name": _json_scalars,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_spec)
def test_fuzzed_spec_files_never_raise_anything_but_a_named_error(spec):
    try:
        parse_spec(spec, "spec")
    except ModelsError as exc:  # anything else (TypeError, KeyError, a torch error) fails the test
        assert str(exc).startswith("spec")


def test_import_is_atomic_even_when_writing_fails(user_files, tmp_path, monkeypatch):
    import models.importer

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models.importer, "save_tensors", broken)
    out = tmp_path / "bundle"
    with pytest.raises(OSError, match="disk full"):
        import_bundle(
            out,
            user_files["calibration"],
            spec_path=user_files["spec"],
            members=[(f"member-{i}", user_files[f"member-{i}"]) for i in range(3)],
            log=lambda _msg: None,
        )
    assert sorted(p.name for p in tmp_path.iterdir() if "bundle" in p.name) == []


def test_code_and_the_evaluations_run_on_an_imported_bundle(user_files, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(_argv(user_files, out)) == 0
    assert main(["code", "--bundle", str(out), "--method", "average-distill", "--distill-steps", "5"]) == 0
    assert [e["method"] for e in open_bundle(out).coded] == ["average-distill"]
    report = tmp_path / "coding.json"
    argv = ["eval-coding", "--bundle", str(out), "--k", "3", "--r", "1", "--methods", "average", "regmean", "none"]
    assert main([*argv, "--json", str(report)]) == 0
    coding = json.loads(report.read_text())
    assert coding["default_method"] in ("average", "regmean") and {r["split"] for r in coding["rows"]} == {"test"}
    assert (
        main(
            [
                "eval-refinement",
                "--bundle",
                str(out),
                "--repeats",
                "2",
                "--no-linear",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    refinement = json.loads((tmp_path / "r.json").read_text())
    assert refinement["model"] == "member-0"
    assert refinement["machine"]["cpu"] and isinstance(refinement["machine"]["quantized_engines"], list)
    for row in refinement["plans"]["served"]["rows"]:  # every ratio is to the best float32 pass of the run
        assert row["best_float32_ms"] <= row["one_shot_ms"]
        cumulative, best, half = row["cumulative_ms"], row["best_float32_ms"], 0.0005  # both rounded to 3 decimals
        assert (cumulative - half) / (best + half) <= row["vs_best_float32"] <= (cumulative + half) / (best - half)


def test_without_a_labelled_set_code_works_and_evaluation_says_what_it_needs(user_files, tmp_path, capsys):
    out = tmp_path / "bundle"
    argv = _argv(user_files, out)
    assert main(argv[: argv.index("--eval")]) == 0
    assert main(["code", "--bundle", str(out), "--method", "average"]) == 0
    capsys.readouterr()
    assert main(["eval-coding", "--bundle", str(out), "--k", "3", "--r", "1", "--methods", "average", "none"]) == 2
    assert "import it again with --eval" in capsys.readouterr().err
