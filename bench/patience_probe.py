"""Validation probe for the decoding policy's defaults (issue 13): no stragglers, closed loop at
concurrency 4 with JSON requests for *validation* images, the default bundle; per setting the
fraction of approximate answers and the latency percentiles.

    python -m bench.patience_probe [--seconds 12] [--json docs/results/patience_validation.json]

The default patience (quantile and margin) is chosen from this run: the lowest latency setting
whose approximate fraction without stragglers is at most 1%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from app import launcher
from bench.loadgen import closed_loop, json_body, percentiles
from models.data import load_split, train_validation
from models.machine import machine

SETTINGS: list[dict[str, str]] = [
    {"COINSERVE_DECODE_POLICY": "eager"},
    {"COINSERVE_PATIENCE_QUANTILE": "0.99", "COINSERVE_PATIENCE_MARGIN_MS": "5"},
    {"COINSERVE_PATIENCE_QUANTILE": "0.99", "COINSERVE_PATIENCE_MARGIN_MS": "10"},
    {"COINSERVE_PATIENCE_QUANTILE": "0.999", "COINSERVE_PATIENCE_MARGIN_MS": "5"},
]


def probe(bundle: Path, env: dict[str, str], seconds: float) -> dict[str, Any]:
    images = train_validation(load_split("train"))[1].images[:64]
    bodies = [json_body(images[i : i + 1]) for i in range(len(images))]
    cluster = launcher.start(bundle, launcher.free_port(), env=env)
    try:
        launcher.wait_ready(cluster)
        url = f"{cluster.children[-1].url}/v2/models/fashion/infer"
        asyncio.run(closed_loop(url, bodies, 4, 3.0))  # warm-up, and the patience's first history
        run = asyncio.run(closed_loop(url, bodies, 4, seconds))
    finally:
        cluster.stop()
    ok = run.ok()
    approximate = sum(1 for s in ok if (s.body or {}).get("parameters", {}).get("approximate"))
    p50, p99, p999 = percentiles([s.final_ms for s in ok])
    return {
        "env": env,
        "requests": len(ok),
        "approximate_pct": round(100 * approximate / max(len(ok), 1), 2),
        "p50_ms": round(p50, 1),
        "p99_ms": round(p99, 1),
        "p999_ms": round(p999, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("bundles/default"))
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for env in SETTINGS:
        rows.append(probe(args.bundle, env, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
