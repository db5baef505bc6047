"""What PyTorch's int8 engines could give successive refinement on this CPU (groundwork for issue 17):
the default CNN shape (16/32 channels, 128 hidden) and a 4× wider one (64/128, 512), batch 64, random
weights, best of 100 timed passes after 20 warm-up ones, 2 threads: float32 (as is and channels_last) against
eager-mode post-training int8 (QuantStub → conv/linear → DeQuantStub, per-channel weights) on each
engine PyTorch offers here. Not a served path yet: no bit-plane truncation, no exactness check.

    python -m bench.int8_probe [--json docs/results/int8_probe.json]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

from models.machine import machine

SHAPES = {"default": (16, 32, 128), "wide": (64, 128, 512)}


def cnn(c1: int, c2: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    ).eval()  # fmt: skip


class Quantised(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.quant, self.model, self.dequant = QuantStub(), model, DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.dequant(self.model(self.quant(x)))
        return out


def best_ms(fn: Callable[[], object], repeats: int = 100) -> float:
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best * 1000, 3)


def probe(batch: int = 64) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.rand(batch, 1, 28, 28)
    out: dict[str, Any] = {}
    for name, shape in SHAPES.items():
        model = cnn(*shape)
        last = cnn(*shape).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        last.load_state_dict(model.state_dict())
        x_last = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            row = {
                "float32": best_ms(lambda model=model: model(x)),  # type: ignore[misc]
                "float32_channels_last": best_ms(lambda last=last, x_last=x_last: last(x_last)),  # type: ignore[misc]
            }
            for engine in [e for e in ("x86", "onednn", "fbgemm") if e in torch.backends.quantized.supported_engines]:
                torch.backends.quantized.engine = engine
                q = Quantised(cnn(*shape))
                q.model.load_state_dict(model.state_dict())
                q.eval().qconfig = get_default_qconfig(engine)  # type: ignore[assignment]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prepared = prepare(q)
                    prepared(x)
                    quantised = convert(prepared)
                row[f"int8_{engine}"] = best_ms(lambda quantised=quantised: quantised(x))  # type: ignore[misc]
        best32 = min(row["float32"], row["float32_channels_last"])
        row["best_int8_vs_best_float32"] = round(min(v for k, v in row.items() if k.startswith("int8_")) / best32, 3)
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    report = {"machine": {**machine(), "torch": torch.__version__, "threads": 2}, "batch": 64, "shapes": probe()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
