from __future__ import annotations

import asyncio

import pytest
import torch

from models.bitplanes import RefinementPlan
from models.networks import MLPConfig, build_mlp
from models.refine import RefinementEngine
from workers.batcher import Batcher, Job


def _engine() -> RefinementEngine:
    torch.manual_seed(0)
    return RefinementEngine(build_mlp(MLPConfig(hidden=(8,))).eval(), RefinementPlan((2, 4)))


async def _results(job: Job) -> list:
    out = []
    while (item := await job.results.get()) is not None:
        out.append(item)
    return out


@pytest.mark.anyio
async def test_concurrent_requests_share_a_forward_pass_and_get_their_own_rows():
    computed: list[tuple[int, int]] = []
    batcher = Batcher(_engine(), max_batch=64, max_wait_ms=20, on_compute=lambda rows, i: computed.append((rows, i)))
    await batcher.start()
    try:
        jobs = [Job(torch.rand(n, 1, 28, 28), start=0, final_only=False) for n in (1, 2, 3)]
        for job in jobs:
            batcher.submit(job)
        results = await asyncio.gather(*(_results(j) for j in jobs))
    finally:
        await batcher.stop()
    assert computed == [(6, 0), (6, 1), (6, 2)]
    for job, res in zip(jobs, results, strict=True):
        assert [r.index for r in res] == [0, 1, 2] and res[-1].final
        expected = torch.softmax(batcher.engine.forward(job.images, 2), 1).numpy()
        assert res[-1].probs.shape == (job.rows, 10)
        assert abs(res[-1].probs - expected).max() < 1e-6


@pytest.mark.anyio
async def test_final_only_requests_compute_only_the_float32_resolution():
    computed: list[int] = []
    batcher = Batcher(_engine(), max_batch=64, max_wait_ms=0, on_compute=lambda rows, i: computed.append(i))
    await batcher.start()
    try:
        job = Job(torch.rand(1, 1, 28, 28), start=0, final_only=True)
        batcher.submit(job)
        assert [r.index for r in await _results(job)] == [2]
    finally:
        await batcher.stop()
    assert computed == [2]


@pytest.mark.anyio
async def test_a_cancelled_job_stops_the_next_resolutions():
    computed: list[int] = []
    batcher = Batcher(
        _engine(), max_batch=64, max_wait_ms=0, on_compute=lambda rows, i: computed.append(i), step_delay_s=0.2
    )
    await batcher.start()
    try:
        job = Job(torch.rand(1, 1, 28, 28), start=0, final_only=False)
        batcher.submit(job)
        first = await job.results.get()
        assert first is not None and first.index == 0
        job.cancelled = True
        await asyncio.sleep(0.5)
    finally:
        await batcher.stop()
    assert computed == [0]


def test_lone_requests_do_not_wait_for_company():
    batcher = Batcher(_engine(), max_batch=64, max_wait_ms=5)
    batcher.outstanding = 1
    assert batcher.wait_s() == 0.0
    batcher.outstanding = 3
    assert batcher.wait_s() == 0.005
