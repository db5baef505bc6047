"""Make the inputs of `coinserve import`: k fine-tuned variants of one small digits classifier.

A plain PyTorch script (it does not import coinserve) that trains a small convolutional network on
scikit-learn's bundled 8x8 digits (1,797 images, nothing is downloaded), then fine-tunes k copies of
it, each on a class-skewed shard of the training split, so that the members agree on most images but
not all. Into `--out` (default `examples/digits/out`) it writes:

    spec.json                       the input, the labels and the layer list of the network
    members/member-<i>.safetensors  each member's state_dict(), as-is (batch norm and dropout included)
    onnx/member-<i>.onnx            each member in eval mode, input "pixels", output "logits" (not with --no-onnx)
    calibration.npy                 float32 [N, 1, 8, 8] unlabelled images for the server's Fisher weights
    eval_x.npy, eval_y.npy          float32 held-out images and their int64 labels

Pixels are the dataset's values 0..16 divided by 16. Everything is seeded: the same `--seed` gives
the same files. It takes a few seconds on 2 CPU cores. Then, from `examples/digits`:

    coinserve import --out bundles/digits --spec out/spec.json \\
        --member member-0=out/members/member-0.safetensors \\
        --member member-1=out/members/member-1.safetensors \\
        --member member-2=out/members/member-2.safetensors \\
        --calibration out/calibration.npy --eval out/eval_x.npy out/eval_y.npy --name digits
    coinserve code --bundle bundles/digits
    coinserve up --bundle bundles/digits

The ONNX files are an alternative to the state dicts: `--onnx member-0=out/onnx/member-0.onnx ...`
instead of `--spec` and the `--member`s (the layers are then read from the graph).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

LABELS = [str(d) for d in range(10)]
INPUT_SHAPE = (1, 8, 8)

# Base training and the fine-tuning recipe (chosen on the calibration split's labels, never on eval).
BASE_EPOCHS = 15
BASE_LR = 3e-3
BATCH = 64
SHARD_SIZE = 256  # images per member shard, drawn with Dirichlet class proportions
ALPHA = 0.3  # Dirichlet concentration: small = few classes dominate a shard
FINETUNE_STEPS = 80
FINETUNE_LR = 7e-4


@dataclass(frozen=True)
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    calib_x: torch.Tensor
    calib_y: torch.Tensor  # used only to report; never saved
    eval_x: torch.Tensor
    eval_y: torch.Tensor


def load_splits(seed: int) -> Splits:
    """Digits scaled to [0, 1], shaped [N, 1, 8, 8]; stratified 60 / 15 / 25 split."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, *INPUT_SHAPE)
    y = digits.target.astype(np.int64)
    train_x, rest_x, train_y, rest_y = train_test_split(x, y, train_size=0.60, stratify=y, random_state=seed)
    calib_x, eval_x, calib_y, eval_y = train_test_split(
        rest_x, rest_y, train_size=0.375, stratify=rest_y, random_state=seed
    )
    t = torch.from_numpy
    return Splits(t(train_x), t(train_y), t(calib_x), t(calib_y), t(eval_x), t(eval_y))


def make_base() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 64),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(64, 10),
    )


def _square(value: tuple[int, ...] | int) -> int | list[int]:
    if isinstance(value, int):
        return value
    return value[0] if len(set(value)) == 1 else list(value)


def describe_layer(module: nn.Module) -> dict[str, Any]:
    """One module as a layer of spec.json, with the argument names of its torch.nn constructor."""
    kind = type(module).__name__
    layer: dict[str, Any] = {"type": kind}
    if isinstance(module, nn.Conv2d):
        if module.dilation != (1, 1) or module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(f"{module}: only plain convolutions can be described")
        layer |= {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": _square(module.kernel_size),
            "stride": _square(module.stride),
            "padding": _square(module.padding),  # type: ignore[arg-type]
        }
        if module.bias is None:
            layer["bias"] = False
    elif isinstance(module, nn.Linear):
        layer |= {"in_features": module.in_features, "out_features": module.out_features}
        if module.bias is None:
            layer["bias"] = False
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
        layer["num_features"] = module.num_features
        if module.eps != 1e-5:
            layer["eps"] = module.eps
    elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        layer |= {"kernel_size": _square(module.kernel_size), "stride": _square(module.stride)}
        if _square(module.padding) != 0:
            layer["padding"] = _square(module.padding)
    elif isinstance(module, nn.Dropout):
        layer["p"] = module.p
    elif not isinstance(module, nn.ReLU | nn.Flatten):
        raise ValueError(f"no spec.json layer for {kind}")
    return layer


def make_spec(model: nn.Sequential) -> dict[str, Any]:
    return {
        "input": {"name": "pixels", "shape": list(INPUT_SHAPE), "datatype": "FP32"},
        "labels": LABELS,
        "layers": [describe_layer(m) for m in model.children()],
    }


def _batches(n: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(BATCH))


def train_base(splits: Splits, seed: int) -> nn.Sequential:
    """The base network: Adam on the whole training split, batch norm and dropout in train mode."""
    torch.manual_seed(seed)
    model = make_base()
    opt = torch.optim.Adam(model.parameters(), lr=BASE_LR)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(BASE_EPOCHS):
        for idx in _batches(len(splits.train_y), gen):
            opt.zero_grad()
            nn.functional.cross_entropy(model(splits.train_x[idx]), splits.train_y[idx]).backward()
            opt.step()
    return model.eval()


def draw_shard(train_y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Indices of a class-skewed shard: class proportions ~ Dirichlet(ALPHA), sampled with replacement."""
    labels = train_y.numpy()
    proportions = rng.dirichlet(np.full(len(LABELS), ALPHA))
    weights = proportions[labels] / np.bincount(labels, minlength=len(LABELS))[labels]
    picked = rng.choice(len(labels), size=SHARD_SIZE, replace=True, p=weights / weights.sum())
    return torch.from_numpy(np.sort(picked))


def fine_tune(base: nn.Sequential, x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Sequential:
    """A copy of the base after FINETUNE_STEPS Adam steps on a shard. Batch norm stays in eval mode
    (its running statistics are the base's, which a skewed shard would otherwise bias); dropout is on."""
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=FINETUNE_LR)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    step = 0
    while step < FINETUNE_STEPS:
        for idx in _batches(len(y), gen):
            if step == FINETUNE_STEPS:
                break
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
    return model.eval()


@torch.no_grad()
def predict(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x).argmax(dim=1)


def export_onnx(model: nn.Sequential, path: Path) -> None:
    """Eval-mode export with a dynamic batch dimension. The TorchScript exporter (`dynamo=False`) takes
    ~0.05 s a model and prints nothing but a DeprecationWarning, silenced here; the default dynamo one
    takes ~2-5 s a model here and logs progress lines, for a graph this small it gains nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (torch.zeros(2, *INPUT_SHAPE),),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )


def save_outputs(out: Path, spec: dict[str, Any], members: list[nn.Sequential], splits: Splits, onnx: bool) -> float:
    """Write everything; → seconds spent exporting ONNX."""
    (out / "members").mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    for i, member in enumerate(members):
        state = {k: v.detach().contiguous() for k, v in member.state_dict().items()}
        save_file(state, out / "members" / f"member-{i}.safetensors")
    np.save(out / "calibration.npy", splits.calib_x.numpy())
    np.save(out / "eval_x.npy", splits.eval_x.numpy())
    np.save(out / "eval_y.npy", splits.eval_y.numpy())
    if not onnx:
        return 0.0
    (out / "onnx").mkdir(exist_ok=True)
    start = time.perf_counter()
    for i, member in enumerate(members):
        export_onnx(member, out / "onnx" / f"member-{i}.onnx")
    return time.perf_counter() - start


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).float().mean())


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "out", help="output folder (created)")
    p.add_argument("--k", type=int, default=3, help="number of members")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, the training and the shards")
    p.add_argument("--no-onnx", action="store_true", help="do not export the members to ONNX")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    splits = load_splits(args.seed)
    print(f"splits: train {len(splits.train_y)}, calibration {len(splits.calib_y)}, eval {len(splits.eval_y)}")

    base = train_base(splits, args.seed)
    print(
        f"base: calibration accuracy {accuracy(predict(base, splits.calib_x), splits.calib_y):.3f}, "
        f"eval accuracy {accuracy(predict(base, splits.eval_x), splits.eval_y):.3f}"
    )

    rng = np.random.default_rng(args.seed)
    members: list[nn.Sequential] = []
    preds: list[torch.Tensor] = []
    for i in range(args.k):
        shard = draw_shard(splits.train_y, rng)
        member = fine_tune(base, splits.train_x[shard], splits.train_y[shard], args.seed + 1 + i)
        members.append(member)
        preds.append(predict(member, splits.eval_x))
        histogram = np.bincount(splits.train_y[shard].numpy(), minlength=len(LABELS)).tolist()
        print(
            f"member-{i}: shard classes {histogram}, "
            f"calibration accuracy {accuracy(predict(member, splits.calib_x), splits.calib_y):.3f}, "
            f"eval accuracy {accuracy(preds[-1], splits.eval_y):.3f}"
        )
    for i in range(args.k):
        for j in range(i + 1, args.k):
            print(f"disagreement member-{i} / member-{j} on eval: {float((preds[i] != preds[j]).float().mean()):.3f}")

    onnx_s = save_outputs(args.out, make_spec(base), members, splits, onnx=not args.no_onnx)
    if not args.no_onnx:
        print(f"onnx export: {onnx_s:.1f} s for {args.k} members")
    print(f"wrote {args.out}/ in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
