from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from models.bitplanes import RefinementPlan
from models.networks import MLPConfig, build_mlp
from models.refine import RefinementEngine
from workers.batcher import Batcher, Job, StepResults


def _engine() -> RefinementEngine:
    torch.manual_seed(0)
    return RefinementEngine(build_mlp(MLPConfig(hidden=(8,))).eval(), RefinementPlan((2, 4)))


def _deliver(results: StepResults) -> None:
    """The batcher's one call per step, routed to each job's queue (the channel does this per connection)."""
    for job, result in results:
        job.owner.put_nowait(result)
        if result.final or result.stopped:
            job.owner.put_nowait(None)


def _dropped(job: Job) -> None:
    job.owner.put_nowait(None)


def _batcher(**options) -> Batcher:
    return Batcher(_engine(), on_results=_deliver, on_dropped=_dropped, **options)


def _job(images: torch.Tensor, **options) -> Job:
    return Job(images, owner=asyncio.Queue(), **options)


async def _results(job: Job) -> list:
    out = []
    while (item := await job.owner.get()) is not None:
        out.append(item)
    return out


@pytest.mark.anyio
async def test_concurrent_requests_share_a_forward_pass_and_get_their_own_rows():
    computed: list[tuple[int, int]] = []
    batcher = _batcher(max_batch=64, max_wait_ms=20, on_compute=lambda rows, i: computed.append((rows, i)))
    await batcher.start()
    try:
        jobs = [_job(torch.rand(n, 1, 28, 28), start=0, final_only=False) for n in (1, 2, 3)]
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
    batcher = _batcher(max_batch=64, max_wait_ms=0, on_compute=lambda rows, i: computed.append(i))
    await batcher.start()
    try:
        job = _job(torch.rand(1, 1, 28, 28), start=0, final_only=True)
        batcher.submit(job)
        assert [r.index for r in await _results(job)] == [2]
    finally:
        await batcher.stop()
    assert computed == [2]


@pytest.mark.anyio
async def test_a_cancelled_job_stops_the_next_resolutions():
    computed: list[int] = []
    batcher = _batcher(max_batch=64, max_wait_ms=0, on_compute=lambda rows, i: computed.append(i), step_delay_s=0.2)
    await batcher.start()
    try:
        job = _job(torch.rand(1, 1, 28, 28), start=0, final_only=False)
        batcher.submit(job)
        first = await job.owner.get()
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


class _Held:
    """A batcher whose compute thread is held inside its first step until `release()`: whatever is
    submitted meanwhile waits in its queues, so the order of the steps after it is the scheduler's."""

    def __init__(self) -> None:
        self.computed: list[tuple[int, int]] = []
        self._release = threading.Event()
        # the test holds the compute thread while the event loop goes on
        self.batcher = _batcher(max_batch=64, max_wait_ms=0, on_compute=self._on_compute)

    def _on_compute(self, rows: int, index: int) -> None:
        self.computed.append((rows, index))
        if len(self.computed) == 1:
            self._release.wait(5)

    async def __aenter__(self) -> _Held:
        await self.batcher.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        await self.batcher.stop()

    async def hold(self, job: Job) -> None:
        """Submit `job` and wait until its first step is running (and held)."""
        self.batcher.submit(job)
        while not self.computed:
            await asyncio.sleep(0.001)

    def release(self) -> None:
        self._release.set()


def _one(rows: int = 1, final_only: bool = False, stop_margin: float | None = None) -> Job:
    return _job(torch.rand(rows, 1, 28, 28), start=0, final_only=final_only, stop_margin=stop_margin)


@pytest.mark.anyio
async def test_first_resolutions_of_waiting_requests_run_before_refinements_of_older_ones():
    """While request A's first step runs, B and C arrive: their first steps go before A's refinements,
    and the refinements then run as batches of the same resolution (issue 17)."""
    async with _Held() as held:
        a = _one()
        await held.hold(a)
        later = [_one(), _one()]
        for job in later:
            held.batcher.submit(job)
        held.release()
        results = await asyncio.gather(*(_results(j) for j in [a, *later]))
    assert held.computed == [(1, 0), (2, 0), (3, 1), (3, 2)]
    assert all([r.index for r in res] == [0, 1, 2] for res in results)


@pytest.mark.anyio
async def test_a_plain_call_goes_before_refinements_too():
    async with _Held() as held:
        stream = _one(2)
        await held.hold(stream)
        plain = _one(final_only=True)
        held.batcher.submit(plain)
        held.release()
        await asyncio.gather(_results(stream), _results(plain))
    assert held.computed == [(2, 0), (1, 2), (2, 1), (2, 2)]


@pytest.mark.anyio
@pytest.mark.parametrize(("margin", "indices"), [(1e-9, [0]), (1.0, [0, 1, 2])])
async def test_stop_margin_ends_a_confident_request_at_a_coarse_resolution(margin, indices):
    computed: list[int] = []
    batcher = _batcher(max_batch=64, max_wait_ms=0, on_compute=lambda rows, i: computed.append(i))
    await batcher.start()
    try:
        job = _one(3, stop_margin=margin)
        batcher.submit(job)
        results = await _results(job)
    finally:
        await batcher.stop()
    assert [r.index for r in results] == indices == computed
    assert [r.stopped for r in results] == [margin < 1] + [False] * (len(indices) - 1)
    assert results[-1].final == (margin == 1.0)
    assert batcher.compute_s > 0


@pytest.mark.anyio
async def test_a_cancelled_request_waiting_for_a_refinement_is_never_computed():
    async with _Held() as held:
        a = _one()
        await held.hold(a)
        b = _one()
        held.batcher.submit(b)
        a.cancelled = True  # e.g. the gateway decoded it: A's refinements must not start
        held.release()
        results = await _results(b)
    assert [r.index for r in results] == [0, 1, 2]
    assert held.computed == [(1, 0), (1, 0), (1, 1), (1, 2)]


@pytest.mark.anyio
async def test_every_result_of_a_step_reaches_the_loop_in_one_call():
    """One frame per step: the channel gets the whole step's results at once, not a wake-up per job."""
    calls: list[int] = []

    def deliver(results: StepResults) -> None:
        calls.append(len(results))
        _deliver(results)

    async with _Held() as held:
        held.batcher.on_results = deliver
        first = _one(final_only=True)
        await held.hold(first)
        rest = [_one(final_only=True) for _ in range(3)]
        for job in rest:
            held.batcher.submit(job)
        held.release()
        await asyncio.gather(*(_results(j) for j in [first, *rest]))
    assert calls == [1, 3]


@pytest.mark.anyio
async def test_a_request_past_its_deadline_is_never_started():
    async with _Held() as held:
        a = _one(final_only=True)
        await held.hold(a)
        late = _job(torch.rand(1, 1, 28, 28), start=0, final_only=True, expires=time.monotonic() + 0.01)
        held.batcher.submit(late)
        await asyncio.sleep(0.05)
        held.release()
        assert await _results(late) == []
    assert held.computed == [(1, 2)]
    assert late.cancelled and held.batcher.outstanding == 0


@pytest.mark.anyio
async def test_steps_can_run_on_the_event_loop_too():
    batcher = _batcher(max_batch=64, max_wait_ms=0, threaded=False)
    await batcher.start()
    try:
        job = _one(2)
        batcher.submit(job)
        assert [r.index for r in await _results(job)] == [0, 1, 2]
    finally:
        await batcher.stop()
    assert batcher.executor is None


def test_the_warm_up_runs_every_resolution_and_batch_size_in_the_compute_thread(monkeypatch):
    """Issue 29: a resolution's first pass on a new thread is slow (int8 kernels: 50-60 ms), so the
    warm-up runs where steps will run, at batch 1 and every power of two up to max_batch, and says
    what batch 1 took per resolution."""
    batcher = Batcher(_engine(), max_batch=8, max_wait_ms=0)
    seen: list[tuple[int, int, str]] = []
    forward = batcher.engine.forward

    def spy(images: torch.Tensor, index: int) -> torch.Tensor:
        seen.append((len(images), index, threading.current_thread().name))
        return forward(images, index)

    monkeypatch.setattr(batcher.engine, "forward", spy)
    warm = batcher.warm_up(torch.rand(3, 1, 28, 28), rounds=2)
    resolutions = batcher.engine.plan.resolutions
    assert len(warm) == resolutions and all(ms > 0 for ms in warm)
    assert sorted({(rows, index) for rows, index, _ in seen}) == [
        (r, i) for r in (1, 2, 4, 8) for i in range(resolutions)
    ]
    assert len(seen) == 2 * 4 * resolutions
    assert len({thread for _, _, thread in seen}) == 1 and seen[0][2].startswith("forward")  # the compute thread
    assert batcher.executor is not None
    batcher.executor.shutdown()
