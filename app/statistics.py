"""Triton's statistics extension for the served group: counts and cumulative durations, kept as plain
numbers and updated once per request when it ends (app/lifecycle.py), read by
`GET /v2/models/{m}/stats` and gRPC `ModelStatistics` (issue 28).

What each of Triton's durations is here (every time is `time.perf_counter()`, in ns):
- `compute_input`: arrival → the request handed to the fan-out: reading the body, parsing and
  checking it (protocol/v2.py, app/validation.py), admission's deadline check.
- `queue`: handed → its replica calls sent (app/fanout.py `Run.dispatched`). The gateway keeps no
  queue (a request over the limits is refused, 429), so this is the fan-out's own set-up: short.
  Waiting in a worker's batcher is inside `compute_infer`: the gateway cannot see it apart.
- `compute_infer`: calls sent → the update that ends the request (its last needed answer arrived,
  or a missing member was decoded): the workers' queueing, forward passes and the channel.
- `compute_output`: that update → its response rendered (the default JSON body every log stores).
  A request that asks for other outputs or binary ones is rendered again by its surface; that second
  rendering is not counted.
- `success`: arrival → rendered, so success.ns is the sum of the four above.
- `fail`: arrival → the error, for a request that was admitted and then failed: refused after
  admission (bad input: 400), or ended by an error (deadline, replicas, client gone, shutdown).
Queue and compute times are counted for successes only, as Triton does. `inference_count` counts
images (a request's batch rows), `execution_count` group executions (one fan-out per request:
the workers may merge several into one forward pass, which their own /metrics count).
"""

from __future__ import annotations

import time
from typing import Any

_NS = 1e9


class Statistics:
    """Counters of one model version. Plain attributes: one request updates them on the event loop."""

    def __init__(self) -> None:
        self.success = self.fail = 0
        self.success_s = self.fail_s = 0.0
        self.queue_s = self.input_s = self.infer_s = self.output_s = 0.0
        self.inferences = 0
        self.last_end: float | None = None  # perf_counter() of the last request's end

    def succeeded(self, arrival: float, handed: float, dispatched: float, answered: float, rows: int) -> None:
        """A request answered: the four stamps (perf_counter) of its stages, then now (rendered)."""
        now = time.perf_counter()
        self.success += 1
        self.success_s += now - arrival
        self.input_s += handed - arrival
        self.queue_s += dispatched - handed
        self.infer_s += answered - dispatched
        self.output_s += now - answered
        self.inferences += rows
        self.last_end = now

    def failed(self, arrival: float) -> None:
        now = time.perf_counter()
        self.fail += 1
        self.fail_s += now - arrival
        self.last_end = now

    def model_stats(self, name: str, version: str) -> dict[str, Any]:
        """One entry of Triton's `model_stats`, as its HTTP extension renders it (gRPC parses the same)."""
        success = self.success
        last = 0 if self.last_end is None else int((time.time() - (time.perf_counter() - self.last_end)) * 1000)
        return {
            "name": name,
            "version": version,
            "last_inference": last,  # ms since the epoch, 0 before the first
            "inference_count": self.inferences,
            "execution_count": success,
            "inference_stats": {
                "success": _duration(success, self.success_s),
                "fail": _duration(self.fail, self.fail_s),
                "queue": _duration(success, self.queue_s),
                "compute_input": _duration(success, self.input_s),
                "compute_infer": _duration(success, self.infer_s),
                "compute_output": _duration(success, self.output_s),
                "cache_hit": _duration(0, 0.0),  # no response cache
                "cache_miss": _duration(0, 0.0),
            },
            "batch_stats": [],  # batches form in the workers (workers/batcher.py), not here
            "memory_usage": [],
        }


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": max(0, round(seconds * _NS))}
