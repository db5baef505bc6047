"""Bounded-wait dynamic batching over the refinement engine, one resolution per step.

Each resolution of a request is its own step in the one compute thread. A request's first step
(resolution `start`, or the final one for a plain JSON call) waits at most `max_wait_ms` for company
(or until `max_batch` rows); after it, the request's next resolution joins the refinement queue. The
scheduler always runs waiting first steps before any refinement, so refinement never pushes back
anyone's first answer; refinements run when no first step waits, coarsest resolution first, oldest
first, batched with others at the same resolution. A step is not started for a request nobody needs
any more (`cancelled`: its client went away, the gateway has its final, decoded it, or cancelled
it; `expires`: the deadline the gateway sent with it has passed), and with `stop_margin` a request
whose every row's top-1 minus top-2 probability exceeds the margin at a coarse resolution stops
there (its last result says `stopped`): the work counter stops rising. Every result of a step
reaches the event loop at once (`on_results`), so the channel answers one frame per step.

Only live resolutions are computed (workers/costs.py, issue 31): a coarse resolution measured no
cheaper than the float32 pass is skipped, so a refining request starts at the next live one (the
float32 pass when none is) and never stops at one that is not live; a job that asked for coarse
resolutions explicitly (`coarse`) still gets every one, marked `slower` where it was not live. While
the batcher is idle it times one pass at a time (`probe_idle_s` after the last work), keeping the
costs current; a request waits behind at most that one pass.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.refine import RefinementEngine
from workers.costs import ResolutionCosts

logger = logging.getLogger(__name__)
WARM_ROUNDS = 3  # passes per resolution and batch size before the worker says it is ready


@dataclass(frozen=True)
class Result:
    index: int
    planes: int | None
    probs: np.ndarray  # (B, C) float32
    final: bool
    stopped: bool = False  # the request's last result: confident at this coarse resolution (stop_margin)
    slower: bool = False  # a coarse resolution computed because the job asked for it, though not live


@dataclass(eq=False)
class Job:
    images: torch.Tensor  # (B, *the bundle's input shape)
    start: int  # first resolution wanted
    final_only: bool  # only the float32 resolution (a plain JSON call)
    stop_margin: float | None = None  # stop once every row's top-1 minus top-2 probability exceeds it
    expires: float | None = None  # time.monotonic() past which no step of it is started (its deadline)
    owner: Any = None  # who reads its results (the channel connection that submitted it)
    call: int = 0  # the owner's id of it
    cancelled: bool = False  # read by the scheduler and the compute thread before every step
    next_index: int = -1  # the resolution of its next step (set on submit)
    arrived: float = 0.0  # time.monotonic() of submit: the first step's wait for company counts from here
    done: bool = False  # left the batcher: its last result given, or dropped
    coarse: bool = False  # asked for every coarse resolution explicitly, live or not

    @property
    def rows(self) -> int:
        return len(self.images)


StepResults = list[tuple[Job, Result]]


class Batcher:
    """Runs jobs' steps one at a time; `on_results` gets every result of a step at once, on the event
    loop (one call per step, not per job), and `on_failure` the jobs of a step whose forward pass
    raised.

    By default a step runs in one compute thread, so that the event loop keeps reading frames
    (cancels, pings) while it runs. `threaded=False` runs it on the event loop itself: measured at
    concurrency 32 on 2 cores the worker's CPU per request was the same either way (182-185 against
    184 µs: the hand-off is per step, not per request), so the thread stays."""

    def __init__(
        self,
        engine: RefinementEngine,
        max_batch: int,
        max_wait_ms: float,
        on_results: Callable[[StepResults], None] = lambda results: None,
        on_failure: Callable[[list[Job], Exception], None] = lambda jobs, exc: None,
        on_compute: Callable[[int, int], None] = lambda rows, index: None,
        step_delay_s: float = 0.0,
        on_cpu: Callable[[float], None] = lambda seconds: None,
        on_dropped: Callable[[Job], None] = lambda job: None,
        threaded: bool = True,
        measured: bool = True,
        probe_idle_s: float = 0.05,
        probe_every_s: float = 2.0,
        pass_delay: dict[int, float] | None = None,
    ) -> None:
        self.engine = engine
        self.on_results = on_results
        self.on_failure = on_failure
        self.on_dropped = on_dropped  # a job that left without its last result: cancelled or expired
        self.on_cpu = on_cpu  # CPU seconds of each forward step, measured in the compute thread
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.on_compute = on_compute
        self.step_delay_s = step_delay_s  # fault injection: a slow model, before every resolution after the first
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward") if threaded else None
        self._first: deque[Job] = deque()  # jobs whose first step has not run, in arrival order
        self._refine: deque[Job] = deque()  # jobs waiting for a refinement step, oldest step first
        self._wake = asyncio.Event()  # set whenever a job is submitted
        self._task: asyncio.Task[None] | None = None
        self.outstanding = 0  # submitted and not yet done
        self.compute_s = 0.0  # CPU seconds of the compute thread in forward steps (thread time)
        self.sizes = sorted({1, *(1 << p for p in range(max_batch.bit_length()) if 1 << p <= max_batch)})
        self.costs = ResolutionCosts(engine.kernels, self.sizes, measured)
        self.on_costs: Callable[[], None] = lambda: None  # the live resolutions or their ratios changed
        # Idle timing passes: the first after a random part of `probe_every_s` (workers started
        # together do not time each other's passes), then `probe_idle_s` after the last work until
        # every (resolution, batch) has its window of timings, then every `probe_every_s`.
        self.probe_idle_s, self.probe_every_s = probe_idle_s, probe_every_s
        self._probe_not_before = time.monotonic() + random.uniform(0, probe_every_s)
        self.pass_delay = pass_delay or {}  # fault injection: a slow kernel, seconds added to each pass
        self._sample: torch.Tensor | None = None  # rows the timing passes run on (set by warm_up)
        self._engines: list[str] = []  # int8 engines re-timed when idle (several reproduce the reference)

    def submit(self, job: Job) -> None:
        self.outstanding += 1
        if job.final_only:
            job.next_index = self.engine.plan.resolutions - 1
        else:
            job.next_index = job.start if job.coarse else self.costs.first_live[job.start]
        job.arrived = time.monotonic()
        self._first.append(job)
        self._wake.set()

    def _retire(self, job: Job) -> None:
        if not job.done:
            job.done = True
            self.outstanding -= 1

    def wait_s(self) -> float:
        """Wait for company only while other requests are being served: a lone request is answered at
        once. Measured through the gateway at concurrency 32: waiting 2 ms lifts throughput from 327 to
        396 req/s; waiting always would cost every lone request 2 ms."""
        return self.max_wait_s if self.outstanding > 1 else 0.0

    def warm_up(self, sample: torch.Tensor, rounds: int = WARM_ROUNDS) -> list[float]:
        """Run every resolution at batch 1 and at every power of two up to `max_batch` (rows of
        `sample`, repeated as needed), `rounds` times each, in the thread that will serve them (an
        int8 resolution's first pass on a new thread costs 50-60 ms, measured on 2 cores: a cold
        first call ran past the gateway's first patience). Returns each resolution's fastest
        batch-1 time in milliseconds (forward and softmax, as a step computes it). Every timing is
        also the first of the resolution costs (workers/costs.py), which decide what is live until
        the idle timing passes replace them. Blocking: call it before `start`, off the event loop."""
        rows = sample.repeat((self.max_batch + len(sample) - 1) // len(sample), *([1] * (sample.dim() - 1)))
        self._sample = rows[: self.max_batch]

        def run() -> list[float]:
            if self.engine.engine_choice.get("measured_ms"):  # "auto": the choice is re-timed when idle
                self._engines = list(self.engine.int8_candidates(rows[:4]))
            best = []
            for index in range(self.engine.plan.resolutions):
                times = []
                for size in self.sizes:
                    for round_ in range(rounds):
                        ms = self._timed(index, size)
                        if round_:  # the first pass of a size is cold: not a cost
                            self.costs.record((index, size), ms)
                        if size == 1:
                            times.append(ms)
                best.append(round(min(times), 3))
            self.costs.decide()
            return best

        return run() if self.executor is None else self.executor.submit(run).result()

    def _forward(self, images: torch.Tensor, index: int) -> torch.Tensor:
        """Probabilities of one resolution: the pass a step and a timing pass both run."""
        if self.pass_delay:
            time.sleep(self.pass_delay.get(index, 0.0))  # fault injection: this kernel is slower
        return torch.softmax(self.engine.forward(images, index), dim=1)

    def _timed(self, key: int | str, size: int) -> float:
        """Milliseconds of one pass of a resolution (or of an int8 engine's first integer
        resolution) at `size` rows, in the calling thread: the compute thread."""
        assert self._sample is not None
        images = self._sample[:size]
        started = time.perf_counter()
        if isinstance(key, str):
            self.engine.int8_candidates(images)[key].forward(images)
        else:
            self._forward(images, key).numpy()
        return (time.perf_counter() - started) * 1000

    def _probe(self) -> bool:
        """One timing pass (in the compute thread) and what it changes; True if the report changed.
        An int8 engine measurably faster than the current one takes over here."""
        probe = self.costs.next_probe(self._engines if len(self._engines) > 1 else [])
        ms = self._timed(*probe)
        if isinstance(probe[0], str):
            self.costs.record_engine(probe[0], ms)
            faster = self.costs.faster_engine(self.engine.int8_engine)
            if faster is not None:
                self.engine.use_engine(faster)
                self.costs.kernels = list(self.engine.kernels)
                self.costs.forget(sorted(self.engine.integer))
        else:
            self.costs.record(probe, ms)
        return self.costs.decide()

    def _probe_due_s(self) -> float:
        """Seconds of idleness before the next timing pass."""
        filling = any(len(s) < s.maxlen for s in self.costs.samples.values() if s.maxlen)
        wait = self.probe_idle_s if filling else self.probe_every_s
        return max(wait, self._probe_not_before - time.monotonic())

    async def _idle(self) -> None:
        """Wait for work; while none comes, time one pass at a time (a job that arrives meanwhile
        waits for that pass only)."""
        loop = asyncio.get_running_loop()
        while self._sample is not None and self.probe_every_s > 0:
            timer = loop.call_later(self._probe_due_s(), self._wake.set)
            await self._wake.wait()
            timer.cancel()
            if self._first or self._refine:
                return
            self._wake.clear()
            changed = self._probe() if self.executor is None else await loop.run_in_executor(self.executor, self._probe)
            if changed:
                self.on_costs()
            if self._first or self._refine:
                return
        await self._wake.wait()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    def _is_wanted(self, job: Job, now: float) -> bool:
        if job.expires is not None and now >= job.expires:
            job.cancelled = True
        return not job.cancelled

    def _drop_cancelled(self, jobs: deque[Job]) -> None:
        """Jobs nobody needs any more leave before their next step is started: cancelled (the
        gateway has its final, decoded it, or the client left) or past their deadline."""
        now = time.monotonic()
        if not all(self._is_wanted(job, now) for job in jobs):
            live = [job for job in jobs if not job.cancelled]
            for job in jobs:
                if job.cancelled:
                    self._retire(job)
                    self.on_dropped(job)
            jobs.clear()
            jobs.extend(live)

    @staticmethod
    def _take(jobs: deque[Job], index: int, max_rows: int) -> list[Job]:
        """Jobs whose next step is `index`, in order, up to `max_rows` rows (at least one job)."""
        taken: list[Job] = []
        rows = 0
        for job in list(jobs):
            if job.next_index == index and (not taken or rows + job.rows <= max_rows):
                taken.append(job)
                rows += job.rows
                if rows >= max_rows:
                    break
        for job in taken:
            jobs.remove(job)
        return taken

    async def _collect(self) -> tuple[int, list[Job]]:
        """The next step to run: (resolution, jobs). First steps before refinements."""
        while True:
            self._drop_cancelled(self._first)
            self._drop_cancelled(self._refine)
            if self._first:
                await self._company()
                self._drop_cancelled(self._first)
                if self._first:
                    index = self._first[0].next_index
                    return index, self._take(self._first, index, self.max_batch)
                continue
            if self._refine:
                index = min(job.next_index for job in self._refine)
                return index, self._take(self._refine, index, self.max_batch)
            self._wake.clear()
            await self._idle()

    async def _company(self) -> None:
        """Let the oldest first step wait for company: until `wait_s` after it arrived, or full rows."""
        oldest = self._first[0]
        until = oldest.arrived + self.wait_s()
        while (left := until - time.monotonic()) > 0:
            rows = sum(job.rows for job in self._first if job.next_index == oldest.next_index and not job.cancelled)
            if rows >= self.max_batch:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except TimeoutError:
                return

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            index, jobs = await self._collect()
            try:
                if self.step_delay_s and self._is_refinement(jobs, index):
                    await self._slow_step(jobs)
                if self.executor is None:
                    results = self._step(jobs, index)
                    await asyncio.sleep(0)  # what came in meanwhile (cancels) is read before results go out
                else:
                    results = await loop.run_in_executor(self.executor, self._step, jobs, index)
            except Exception as exc:  # a bug in a forward pass must not kill the batcher
                logger.exception("forward pass failed")
                for job in jobs:
                    self._retire(job)
                self.on_failure(jobs, exc)
                continue
            for job in jobs:
                if job.cancelled:
                    self._retire(job)
                    self.on_dropped(job)
            next_live = self.costs.next_live
            for job, result in results:
                if result.final or result.stopped:
                    self._retire(job)
                else:
                    job.next_index = index + 1 if job.coarse else next_live[index]
                    self._refine.append(job)
            if results:
                self.on_results(results)

    def _is_refinement(self, jobs: list[Job], index: int) -> bool:
        last = self.engine.plan.resolutions - 1
        return any(index > (last if job.final_only else job.start) for job in jobs)

    def _step(self, jobs: list[Job], index: int) -> StepResults:
        """One resolution for the jobs still wanted, and their results (in the compute thread, or on
        the event loop when the batcher is not threaded)."""
        last = self.engine.plan.resolutions - 1
        live = [job for job in jobs if not job.cancelled]
        if not live:
            return []
        images = torch.cat([job.images for job in live]) if len(live) > 1 else live[0].images
        started = time.thread_time()
        probs_t = self._forward(images, index)
        seconds = time.thread_time() - started
        self.compute_s += seconds
        self.on_cpu(seconds)
        probs = probs_t.numpy()
        self.on_compute(len(images), index)
        self.costs.observe_rows(len(images))
        results, offset = [], 0
        planes = self.engine.plan.planes_at(index)
        live_here = self.costs.live[index]  # a coarse answer not cheaper than going on is never a stop
        for job in live:
            mine = probs[offset : offset + job.rows]
            offset += job.rows
            stopped = live_here and index < last and job.stop_margin is not None and _confident(mine, job.stop_margin)
            results.append((job, Result(index, planes, mine, index == last, stopped, not live_here)))
        return results

    async def _slow_step(self, jobs: list[Job]) -> None:
        """The injected extra compute time of a slow model, given up as soon as no job needs the step
        (a real worker stops computing what nobody will read)."""
        end = time.monotonic() + self.step_delay_s
        while any(not job.cancelled for job in jobs) and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.005))


def _confident(probs: np.ndarray, margin: float) -> bool:
    """Every row's top-1 minus top-2 probability exceeds `margin` (the gateway's rule, per member)."""
    if probs.shape[1] < 2:
        return True
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    return bool(np.all(top2[:, 1] - top2[:, 0] > margin))
