"""What each resolution of a bundle model costs against its float32 pass, at every batch size a
worker serves, measured as a worker measures it (issue 31): the worker's own engine, warm-up and
timing pass (workers/batcher.py), the median of `--repeats` passes per (resolution, batch). Run it
under `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` to cap PyTorch's int8 and float32 kernels
at AVX2 on a newer CPU (docs/refinement.md, "Where refinement pays").

    python -m bench.resolution_costs --bundle bundles/default [--json docs/results/resolution_costs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from models.machine import machine
from workers.settings import WorkerSettings
from workers.state import WorkerMetrics, load


def measure(bundle: Path, model: str, repeats: int) -> dict[str, Any]:
    state = load(WorkerSettings(bundle=bundle, model=model), WorkerMetrics())
    served = state.models[model]
    batcher = served.batcher
    last = served.engine.plan.resolutions - 1
    rows = []
    for size in batcher.sizes:
        ms = [statistics.median(batcher._timed(i, size) for _ in range(repeats)) for i in range(last + 1)]
        rows.append({"batch": size, "ms": [round(m, 4) for m in ms], "ratio": [round(m / ms[last], 3) for m in ms]})
    return {"model": model, "kernels": served.engine.kernels, "int8_engine": served.engine.engine_choice, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--model", default="member-0")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    report = {
        "machine": machine(),
        "isa_caps": caps,
        "bundle": str(args.bundle),
        **measure(args.bundle, args.model, args.repeats),
    }
    print(f"{args.bundle} {args.model} on {report['kernels']} (caps {caps or 'none'}):")
    for row in report["rows"]:
        print(f"  batch {row['batch']:3d}: ms {row['ms']}  coarse/float32 {row['ratio'][:-1]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
