"""Ray Serve serving the bundle's k members, as Ray's docs recommend for model composition: one
deployment per member (the same forward pass as coinserve's workers, bench/peers/member.py) and an
ingress deployment that asks all k through deployment handles and answers with every member's
probabilities. Run inside the Ray venv (bench/peers/venvs.py) by bench/peers/bench.py:

    python -m bench.peers.ray_app BUNDLE PORT PIDS_JSON [--extra member-0]

Settings, and why: every member deployment has `max_ongoing_requests` 64 (one dynamic batch's worth,
the coinserve worker's `max_batch`) and batches with `@serve.batch(max_batch_size=64,
batch_wait_timeout_s=0.002)` (the worker's 2 ms); the ingress allows 512 ongoing requests (the
gateway's `max_concurrent_requests`); the HTTP proxy's `request_timeout_s` is 30 s (the gateway's
upstream timeout). `--extra NAME` gives that member a second replica (k + 1 model processes, as
coinserve has with its coded replica); Ray's router then spreads that member's calls over both.
Ray gets `num_cpus=2`, every deployment `num_cpus=0` (they share the two cores, as coinserve's
processes do). Once up, it writes {"members": {NAME: [PID, ...]}, "ingress": [PID]} to PIDS_JSON:
the processes holding the models, for the benchmark's SIGSTOP schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def build(bundle: str, names: list[str], extra: str | None) -> Any:
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0})
    class MemberModel:
        def __init__(self, bundle: str, name: str) -> None:
            from bench.peers.member import Member

            self.member = Member(bundle, name)

        def pid(self) -> int:
            return os.getpid()

        @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
        async def __call__(self, batch: list[np.ndarray]) -> list[np.ndarray]:
            sizes = [len(images) for images in batch]
            probs = self.member(np.concatenate(batch))
            return list(np.split(probs, np.cumsum(sizes)[:-1]))

    @serve.deployment(max_ongoing_requests=512, ray_actor_options={"num_cpus": 0})
    class Ingress:
        def __init__(self, *handles: Any) -> None:
            self.handles = dict(zip(names, handles, strict=True))

        def pid(self) -> int:
            return os.getpid()

        async def __call__(self, request: Request) -> JSONResponse:
            body = await request.json()
            tensor = body["inputs"][0]
            images = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
            answers = await asyncio.gather(*(h.remote(images) for h in self.handles.values()))
            outputs = [
                {"name": name, "datatype": "FP32", "shape": list(p.shape), "data": p.ravel().tolist()}
                for name, p in zip(self.handles, answers, strict=True)
            ]
            mean = np.mean(answers, axis=0)
            outputs.append(
                {"name": "ensemble", "datatype": "FP32", "shape": list(mean.shape), "data": mean.ravel().tolist()}
            )
            answer: dict[str, Any] = {"model_name": "fashion", "outputs": outputs}
            if "id" in body:
                answer["id"] = body["id"]
            return JSONResponse(answer)

    members = [
        MemberModel.options(name=name, num_replicas=2 if name == extra else 1).bind(bundle, name) for name in names
    ]
    return Ingress.bind(*members)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle")
    parser.add_argument("port", type=int)
    parser.add_argument("pids", type=Path)
    parser.add_argument("--extra", default=None)
    args = parser.parse_args()
    import ray
    from ray import serve

    names = [m["name"] for m in json.loads((Path(args.bundle) / "manifest.json").read_text())["members"]]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port, "request_timeout_s": 30})
    serve.run(build(args.bundle, names, args.extra), name="fashion", route_prefix="/v2/models/fashion/infer")
    # Each replica's pid, asked through its deployment's handle (Ray's router spreads the calls over a
    # deployment's replicas: ask until every replica has answered).
    pids: dict[str, Any] = {"members": {}, "ingress": []}
    for member in [*names, "Ingress"]:
        handle = serve.get_deployment_handle(member, app_name="fashion")
        want = 2 if member == args.extra else 1
        seen: list[int] = []
        for _ in range(200):
            pid = handle.pid.remote().result()
            if pid not in seen:
                seen.append(pid)
            if len(seen) == want:
                break
        if member == "Ingress":
            pids["ingress"] = seen
        else:
            pids["members"][member] = seen
    args.pids.write_text(json.dumps(pids))
    stop = False

    def handler(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop:
        time.sleep(0.2)
    serve.shutdown()
    ray.shutdown()
    sys.exit(0)


if __name__ == "__main__":
    main()
