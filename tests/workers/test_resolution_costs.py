"""Resolutions chosen by measured cost (issue 31): workers/costs.py and the batcher's use of it.

Slowdowns are real: the `slow_resolution` fault (`pass_delay`) makes every pass of a resolution
take longer, in the compute thread, where steps and timing passes both run."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
import torch

from models.bitplanes import RefinementPlan
from models.networks import MLPConfig, build_mlp
from models.refine import RefinementEngine
from workers.batcher import Batcher, Job, StepResults
from workers.costs import ResolutionCosts
from workers.settings import FaultSettings

SLOW_S = 0.02  # far above the tiny MLP's passes (well under a millisecond)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _deliver(results: StepResults) -> None:
    for job, result in results:
        job.owner.put_nowait(result)
        if result.final or result.stopped:
            job.owner.put_nowait(None)


def _warm_batcher(pass_delay: dict[int, float], **options) -> Batcher:
    """A batcher over a 3-resolution MLP, warmed up (its first costs measured) with these slowdowns."""
    torch.manual_seed(0)
    engine = RefinementEngine(build_mlp(MLPConfig(hidden=(8,))).eval(), RefinementPlan((2, 4)))
    batcher = Batcher(engine, max_batch=4, max_wait_ms=0, on_results=_deliver, pass_delay=pass_delay, **options)
    batcher.warm_up(torch.rand(4, 1, 28, 28), rounds=4)
    return batcher


async def _run(batcher: Batcher, **options) -> list:
    job = Job(torch.rand(1, 1, 28, 28), owner=asyncio.Queue(), **options)
    batcher.submit(job)
    out = []
    while (result := await asyncio.wait_for(job.owner.get(), 10)) is not None:
        out.append(result)
    return out


@pytest.mark.anyio
async def test_a_worker_whose_coarse_resolutions_are_slower_starts_refining_requests_at_float32():
    batcher = _warm_batcher({0: SLOW_S, 1: SLOW_S}, probe_every_s=0)
    await batcher.start()
    try:
        results = await _run(batcher, start=0, final_only=False)
    finally:
        await batcher.stop()
    assert [(r.index, r.final, r.slower) for r in results] == [(2, True, False)]
    assert batcher.costs.report()["live"] == [2]
    assert batcher.costs.reasons[0].startswith("float32 ") and "skipped" in batcher.costs.reasons[0]


@pytest.mark.anyio
async def test_a_request_that_asks_for_coarse_resolutions_gets_them_marked_slower():
    batcher = _warm_batcher({0: SLOW_S, 1: SLOW_S}, probe_every_s=0)
    await batcher.start()
    try:
        results = await _run(batcher, start=0, final_only=False, coarse=True)
    finally:
        await batcher.stop()
    assert [(r.index, r.slower) for r in results] == [(0, True), (1, True), (2, False)]


@pytest.mark.anyio
async def test_stop_margin_never_stops_at_a_coarse_resolution_that_is_not_live():
    """1. resolution 0 is slowed, 1 is not, float32 is slowed more: 1 is live, 0 is not.
    2. an explicit coarse request with a stop margin any answer clears.
    Result: it goes on past resolution 0 (not cheaper than going on) and stops at 1."""
    batcher = _warm_batcher({0: 2 * SLOW_S, 2: SLOW_S}, probe_every_s=0)
    assert batcher.costs.report()["live"] == [1, 2]
    await batcher.start()
    try:
        results = await _run(batcher, start=0, final_only=False, coarse=True, stop_margin=1e-9)
        plain = await _run(batcher, start=0, final_only=False, stop_margin=1e-9)
    finally:
        await batcher.stop()
    assert [(r.index, r.stopped) for r in results] == [(0, False), (1, True)]
    assert [(r.index, r.stopped) for r in plain] == [(1, True)]  # starts at the first live resolution


@pytest.mark.anyio
async def test_coarse_always_serves_every_resolution_whatever_it_costs():
    batcher = _warm_batcher({0: SLOW_S, 1: SLOW_S}, probe_every_s=0, measured=False)
    await batcher.start()
    try:
        results = await _run(batcher, start=0, final_only=False)
    finally:
        await batcher.stop()
    assert [r.index for r in results] == [0, 1, 2]
    assert batcher.costs.report()["policy"] == "always"


@pytest.mark.anyio
async def test_an_idle_worker_re_times_its_resolutions_and_skips_one_that_became_slower():
    """1. warm up with no slowdown: float32 truncation costs about what float32 does, so make the
    float32 pass slow first: every coarse resolution is live. 2. the slowdown moves to resolution 0
    while the batcher is idle. Result: its idle timing passes turn resolution 0 off, and say so."""
    batcher = _warm_batcher({2: SLOW_S}, probe_idle_s=0.001, probe_every_s=0.001)
    assert batcher.costs.report()["live"] == [0, 1, 2]
    changed = asyncio.Event()
    batcher.on_costs = changed.set
    batcher.pass_delay = {0: SLOW_S}
    await batcher.start()
    try:
        while batcher.costs.live[0]:
            changed.clear()
            await asyncio.wait_for(changed.wait(), 20)
        results = await _run(batcher, start=0, final_only=False)
    finally:
        await batcher.stop()
    assert batcher.costs.report()["live"] == [1, 2]
    assert [r.index for r in results] == [1, 2]


def _costs(coarse: list[float], final: list[float]) -> ResolutionCosts:
    costs = ResolutionCosts(["int8/x86", "float32"], [1])
    for c, f in zip(coarse, final, strict=True):
        costs.record((0, 1), c)
        costs.record((1, 1), f)
    costs.decide()
    return costs


def test_a_coarse_pass_must_be_cheaper_by_more_than_the_timing_noise():
    quiet = _costs([0.80, 0.81, 0.80, 0.79, 0.80], [1.00, 1.01, 1.00, 0.99, 1.00])
    noisy = _costs([0.60, 0.80, 1.00, 0.70, 0.90], [0.80, 1.00, 1.20, 0.90, 1.10])
    assert quiet.live == [True, True] and quiet.reasons[0].endswith(": live")
    assert noisy.live == [False, True] and "skipped" in noisy.reasons[0]
    assert noisy.margin > quiet.margin
    assert quiet.report()["batch_1"] == [0.8, 1.0]


def test_another_int8_engine_takes_over_only_when_measurably_faster():
    costs = ResolutionCosts(["int8/x86", "float32"], [1])
    for ms in (1.0, 1.01, 0.99, 1.0, 1.0):
        costs.record_engine("x86", ms)
        costs.record_engine("onednn", ms * 0.98)  # within the noise: no change
        costs.record_engine("fbgemm", ms * 0.6)
    assert costs.faster_engine("x86") == "fbgemm"
    costs.engines.pop("fbgemm")
    assert costs.faster_engine("x86") is None


def test_slow_resolution_fault_reads_as_seconds_per_resolution():
    assert FaultSettings(slow_resolution="0:20,2:1.5").pass_delay_s() == {0: 0.02, 2: 0.0015}
    with pytest.raises(ValueError, match="slow_resolution"):
        FaultSettings(slow_resolution="zero:20")


def test_forgetting_a_resolution_clears_only_its_timings():
    costs = _costs([0.5, 0.5, 0.5], [1.0, 1.0, 1.0])
    costs.forget([0])
    assert costs.samples[(0, 1)] == deque() and len(costs.samples[(1, 1)]) == 3
