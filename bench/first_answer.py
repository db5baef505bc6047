"""Where the time to the first complete answer goes (issue 17): one request at a time, no stragglers,
on a real cluster, the same images on every arm, arms interleaved request by request.

    python -m bench.first_answer [--bundle bundles/wide] [--requests 400] [--json PATH]

Arms: `json` (a plain call: the float32 resolution only), `sse-final` (the same over SSE,
`min_resolution` = the final one: what SSE itself costs), `sse` (coarse then refined: the time to
the first event, whose coarse resolution is the integer one) and `sse-final-event` (the same
request's terminal event). Reported: p50 and p99 per arm, and the ratios coded+refine's first
event / JSON, with the SSE surface's own share (sse-final / json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from app import launcher
from bench.loadgen import json_body, percentiles, send_one
from models.data import load_split
from models.machine import machine


async def _run(url: str, bodies: dict[str, list[bytes]], count: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"json": [], "sse-final": [], "sse": [], "sse-final-event": []}
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            for arm in ("json", "sse-final", "sse"):
                sample = await send_one(session, url, bodies[arm][i], arm != "json", time.perf_counter())
                if sample.outcome != "final":
                    raise RuntimeError(f"{arm} request {i}: {sample.outcome}")
                out[arm].append(sample.first_ms)
                if arm == "sse":
                    out["sse-final-event"].append(sample.final_ms)
    return out


def measure(bundle: Path, count: int) -> dict[str, Any]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    final = len(manifest["refinement"]["planes"])
    images = load_split("test").images[:count]
    bodies = {
        "json": [json_body(images[i : i + 1]) for i in range(count)],
        "sse-final": [json_body(images[i : i + 1], {"min_resolution": final}) for i in range(count)],
        "sse": [json_body(images[i : i + 1]) for i in range(count)],
    }
    port = launcher.free_port()
    cluster = launcher.start(bundle, port)
    try:
        launcher.wait_ready(cluster, timeout_s=180)
        url = f"http://127.0.0.1:{port}/v2/models/{manifest['name']}/infer"
        asyncio.run(_run(url, bodies, min(50, count)))  # warm-up
        times = asyncio.run(_run(url, bodies, count))
    finally:
        cluster.stop()
    rows = {
        arm: dict(zip(("p50_ms", "p99_ms"), (round(v, 3) for v in percentiles(t, (50, 99))), strict=True))
        for arm, t in times.items()
    }
    p50 = {arm: r["p50_ms"] for arm, r in rows.items()}
    return {
        "machine": machine(),
        "bundle": str(bundle),
        "requests": count,
        "arms": rows,
        "first_event_vs_json_p50": round(p50["sse"] / p50["json"], 3),
        "sse_surface_vs_json_p50": round(p50["sse-final"] / p50["json"], 3),
        "first_event_vs_sse_final_p50": round(p50["sse"] / p50["sse-final"], 3),
        "raw_ms": {arm: [round(v, 3) for v in t] for arm, t in times.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = measure(args.bundle, args.requests)
    print(json.dumps({k: v for k, v in report.items() if k != "raw_ms"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
