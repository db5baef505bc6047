"""Per-request orchestration: fan out, decode, refine, honour the deadline, cancel what is not needed.

`Fanout.execute` is a coroutine run by the request's owner task (app/lifecycle.py): it hands every
intermediate `Update` to `emit` (`coarse` once every member has an answer (real, low resolution, or
decoded), `refined` whenever an answer improves) and returns exactly one terminal `Update`: a
`final` (every answer at the float32 resolution, the stop margin reached, no call left that could
improve an answer, or the deadline with the best answers so far) or an `error`. The deadline is a
timeout inside this coroutine, counted from the request's arrival; every replica call it started
is cancelled in `finally`. No bytes, no HTTP.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.admission import ReplicaLoad
from app.decoding import Answer
from app.errors import ReplicaError
from app.group import Group
from app.hedging import LatencyTracker
from app.metrics import GatewayMetrics
from app.patience import Patience
from app.replicas import HEDGE, ReplicaHealth
from app.status import Activity
from app.upstream import ReplicaClient
from protocol.v2 import ProtocolError, encode_binary_request, parse_response


@dataclass(frozen=True)
class Options:
    deadline_ms: float | None = None
    min_resolution: int = 0
    stop_margin: float | None = None
    members: list[str] | None = None
    stream: bool = False  # the client watches refinements (SSE)


@dataclass
class Update:
    event: str  # coarse | refined | final | error
    seq: int
    elapsed_ms: float
    answers: dict[str, Answer] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    error: str | None = None
    status: int = 200

    @property
    def resolution(self) -> int:
        return min((a.resolution for a in self.answers.values()), default=0)

    def exact_members(self, final_resolution: int) -> list[str]:
        return [
            m
            for m in self.members
            if m in self.answers and self.answers[m].real and self.answers[m].resolution == final_resolution
        ]

    def decoded_members(self) -> list[str]:
        return [m for m in self.members if m in self.answers and not self.answers[m].real]

    def ensemble(self) -> np.ndarray:
        ensemble: np.ndarray = np.mean([self.answers[m].probs for m in self.members], axis=0)
        return ensemble


_DONE = object()


class Fanout:
    def __init__(
        self, group: Group, client: ReplicaClient, metrics: GatewayMetrics, health: ReplicaHealth | None = None
    ) -> None:
        self.group = group
        self.client = client
        self.metrics = metrics
        self.health = health
        self.decoder = group.decoder()
        self.latency = LatencyTracker(quantile=group.hedge_quantile)
        self.load = ReplicaLoad()
        self.activity = Activity()  # what the console shows: recent calls, decode counts
        self.clock = time.perf_counter  # the request bookkeeping's clock (a test steps it)
        settings = client.settings
        self.patient = settings.decode_policy == "patient"
        self.patience = Patience(
            settings.patience_quantile,
            settings.patience_margin_ms / 1000,
            settings.patience_initial_ms / 1000,
            on_change=lambda member, s: metrics.patience.labels(member).set(s),
        )

    async def execute(
        self,
        images: np.ndarray,
        options: Options,
        arrival: float,
        emit: Callable[[Update], Awaitable[None]],
        request_id: str | None = None,
    ) -> Update:
        """Run one request to its terminal update; `arrival` is its `time.perf_counter()` at arrival."""
        members = options.members or self.group.members
        coded = list(self.group.coded) if members == self.group.members else []
        refine = options.stream or options.deadline_ms is not None or options.stop_margin is not None
        parameters: dict[str, Any] = {
            "stream": refine,
            "final_only": not refine,
            "min_resolution": options.min_resolution,
        }
        if options.stop_margin is not None:  # each replica stops where its own answer is that confident
            parameters["stop_margin"] = options.stop_margin
        body, header_length = encode_binary_request(images, parameters, self.group.spec.input.name, request_id)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        call = _Call(self, body, header_length, len(images), refine, queue)
        hedge = self.group.hedge_url is not None and not refine and (self.health is None or self.health.is_hedge_usable)
        skipped = self.skipped()
        tasks = {
            name: asyncio.create_task(
                call.hedged(name) if hedge and name in self.group.members else call.reported(name)
            )
            for name in [*members, *coded]
            if name not in skipped
        }
        run = _Run(self, members, options, arrival, images, request_id, call)
        for name in skipped:
            run.failures[name] = ReplicaError(name, "unreachable", "not in use; waiting for a health check")
        try:
            return await run.loop(queue, tasks, emit)
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)

    def skipped(self) -> set[str]:
        """Replicas no call goes to: open circuits and identity mismatches (app/replicas.py)."""
        return self.health.skipped if self.health is not None else set()


class _Call:
    """The replica calls of one request; answers and failures go to the request's queue."""

    def __init__(
        self,
        fanout: Fanout,
        body: bytes,
        header_length: int,
        batch: int,
        lines: bool,
        queue: asyncio.Queue[tuple[str, Any]],
    ) -> None:
        self.fanout = fanout
        self.group = fanout.group
        self.body, self.header_length, self.batch, self.lines = body, header_length, batch, lines
        self.queue = queue
        self.stopped: set[str] = set()  # replicas whose stream ended at a coarse resolution (stop_margin)
        self.record = True  # latencies feed hedging and patience (not for a follow-up final-only call)

    async def once(self, name: str, url: str) -> None:
        """One call: every answer goes to the queue; raises ReplicaError if the call fails."""
        start = time.perf_counter()
        load = self.fanout.load
        load.started(name)
        ok = False
        replica = name if url == self.group.urls.get(name) else HEDGE  # as the console lists it
        try:
            async for line in self.fanout.client.stream(name, url, name, self.body, self.header_length, self.lines):
                try:
                    probs, params = parse_response(line, self.group.classes, self.batch)
                except ProtocolError as exc:
                    raise ReplicaError(name, "garbage", str(exc)) from exc
                resolution = params.get("resolution")
                if type(resolution) is not int or not 0 <= resolution < self.group.resolutions:
                    raise ReplicaError(name, "garbage", f"resolution {resolution!r} is not in the plan")
                if params.get("stopped") is True:
                    self.stopped.add(name)
                self.queue.put_nowait((name, Answer(probs, resolution, real=True)))
            ok = True
        except ReplicaError as exc:
            self.fanout.metrics.replica_errors.labels(name, exc.kind).inc()
            self.fanout.activity.error(replica)
            if exc.kind == "unreachable" and self.fanout.health is not None and url == self.group.urls.get(name):
                self.fanout.health.mark_unreachable(name)
            raise
        except asyncio.CancelledError:  # its answer was no longer needed (decoded, final, deadline, client gone)
            self.fanout.activity.cut(replica, time.perf_counter() - start)
            raise
        finally:
            load.finished(name, completed=ok)
        elapsed = time.perf_counter() - start
        self.fanout.metrics.replica_latency.labels(name).observe(elapsed)
        self.fanout.activity.call(replica, elapsed)
        if replica == name and self.record:
            self.fanout.latency.record(name, elapsed)
            if name in self.group.members:
                self.fanout.patience.record(name, elapsed)

    async def reported(self, name: str) -> None:
        try:
            await self.once(name, self.group.urls[name])
        except ReplicaError as exc:
            self.queue.put_nowait((name, exc))
        else:
            self.queue.put_nowait((name, _DONE))

    async def hedged(self, name: str) -> None:
        """The Tail-at-Scale hedge: if the member has not answered by the p95 of its recent latency,
        send the same call to the hedging replica; the first answer wins, the loser is cancelled."""
        assert self.group.hedge_url is not None
        primary = asyncio.ensure_future(self.once(name, self.group.urls[name]))
        calls = {primary}
        try:
            done, _ = await asyncio.wait(calls, timeout=self.fanout.latency.hedge_delay_s(name))
            if not done or primary.exception() is not None:
                self.fanout.metrics.hedges.inc()
                calls.add(asyncio.ensure_future(self.once(name, self.group.hedge_url)))
            errors: list[BaseException] = []
            pending = set(calls)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is None:
                        self.queue.put_nowait((name, _DONE))
                        return
                    errors.append(error)
            self.queue.put_nowait((name, errors[-1]))
        finally:
            for task in calls:
                task.cancel()
            await asyncio.gather(primary, *calls, return_exceptions=True)


class _Run:
    """The state of one request while its replica calls come in."""

    def __init__(
        self,
        fanout: Fanout,
        members: list[str],
        options: Options,
        started: float,
        images: np.ndarray | None = None,
        request_id: str | None = None,
        call: _Call | None = None,
    ) -> None:
        self.fanout = fanout
        self.images, self.request_id, self.call = images, request_id, call
        self.asked_final: set[str] = set()  # replicas asked again for their float32 answer
        self.group = fanout.group
        self.members = members
        self.options = options
        self.started = started
        self.real: dict[str, Answer] = {}
        self.coded: dict[str, Answer] = {}
        self.failures: dict[str, ReplicaError] = {}
        self.pending: set[str] = set()
        self.seq = 0
        self.last: dict[str, tuple[int, bool]] | None = None
        self.dispatched = self.fanout.clock()  # when the replica calls went out: patience counts from here

    def _update(
        self, event: str, answers: dict[str, Answer] | None = None, error: str | None = None, status: int = 200
    ) -> Update:
        self.seq += 1
        elapsed = (self.fanout.clock() - self.started) * 1000
        return Update(event, self.seq, round(elapsed, 3), answers or {}, self.members, error, status)

    def _accept(self, name: str, item: Any) -> None:
        if item is _DONE:
            self.pending.discard(name)
        elif isinstance(item, ReplicaError):
            self.pending.discard(name)
            self.failures[name] = item
        else:
            book = self.coded if name in self.group.coded else self.real
            if name not in book or item.key > book[name].key:
                book[name] = item

    def _is_final(self, answers: dict[str, Answer]) -> bool:
        if any(a.resolution < self.group.resolutions - 1 for a in answers.values()):
            margin = self.options.stop_margin
            if margin is None:
                return False
            top2 = np.sort(np.mean([a.probs for a in answers.values()], axis=0), axis=1)[:, -2:]
            return bool(np.all(top2[:, 1] - top2[:, 0] >= margin))
        return True

    async def loop(
        self,
        queue: asyncio.Queue[tuple[str, Any]],
        tasks: dict[str, asyncio.Task[None]],
        emit: Callable[[Update], Awaitable[None]],
    ) -> Update:
        self.pending = set(tasks)
        if self.options.deadline_ms is not None:
            remaining = self.started + self.options.deadline_ms / 1000 - self.fanout.clock()
        else:
            remaining = self.fanout.client.settings.upstream_timeout_s
        answers: dict[str, Answer] = {}
        if not self.pending:  # every replica's circuit is open: fail now, not at the time-out
            return self._failed()
        # The deadline is a plain wait with a time-out, never a cancellation: a cancellation that
        # races an arriving answer can be swallowed (asyncio.wait_for), and the request would run on
        # past its deadline.
        deadline = self.fanout.clock() + max(remaining, 0.0)
        wake_at: float | None = None  # when the next member becomes late (patient policy)
        getter: asyncio.Future[tuple[str, Any]] | None = None
        try:
            while (left := deadline - self.fanout.clock()) > 0:
                getter = getter or asyncio.ensure_future(queue.get())
                timeout = left if wake_at is None else max(0.0, min(deadline, wake_at) - self.fanout.clock())
                done, _ = await asyncio.wait({getter}, timeout=timeout)
                if done:  # else a member's patience ran out (it is late now) or the deadline came
                    name, item = getter.result()
                    getter = None
                    self._accept(name, item)
                # One reading of the clock for both questions below: a member whose patience runs out
                # between two readings would be neither late nor waited for, and the request would
                # wait for an answer that never comes (issue 27).
                now = self.fanout.clock()
                answers = self.fanout.decoder.answers(self.real, self.coded, self.members)
                if len(answers) == len(self.members):
                    if not self.pending and not self._ask_final(answers, tasks):
                        return self._final(answers)  # nothing left that could improve it
                    late = self._late(now)
                    usable = (
                        answers
                        if late is None
                        else self.fanout.decoder.answers(self.real, self.coded, self.members, decodable=late)
                    )
                    if len(usable) == len(self.members) and self._is_final(usable):
                        return self._final(usable)
                    update = self._progress(answers)
                    if update is not None:
                        await emit(update)
                elif not self.pending:
                    return self._failed()
                wake_at = self._late_at(now)
        finally:
            if getter is not None:
                getter.cancel()
        return self._at_deadline(answers)

    def _ask_final(self, answers: dict[str, Answer], tasks: dict[str, asyncio.Task[None]]) -> bool:
        """Every call has ended, but replicas that stopped at a coarse resolution (each confident on its
        own) leave the ensemble short of the stop margin (they disagree): ask them for their float32
        answer, once. Returns whether any call went out."""
        if self.call is None or self.images is None or self._is_final(answers):
            return False
        final = self.group.resolutions - 1
        decoding = any(m not in self.real for m in self.members)  # coded answers matter only then
        names = [
            n
            for n in sorted(self.call.stopped - self.asked_final)
            if (
                self.coded[n].resolution < final and decoding
                if n in self.group.coded
                else self.real[n].resolution < final
            )
        ]
        if not names:
            return False
        parameters = {"stream": False, "final_only": True, "min_resolution": 0}
        body, header_length = encode_binary_request(
            self.images, parameters, self.group.spec.input.name, self.request_id
        )
        again = _Call(self.fanout, body, header_length, len(self.images), False, self.call.queue)
        again.record = False
        for name in names:
            self.asked_final.add(name)
            self.pending.add(name)
            tasks[f"{name} (final)"] = asyncio.create_task(again.reported(name))
        self.fanout.metrics.final_asks.inc(len(names))
        return True

    def _late(self, now: float) -> set[str] | None:
        """Members whose answers may be decoded for the final at `now`: all (None) under the eager
        policy; under the patient one, those that are late: their call has run past their patience, or
        has ended without the answer (failed, or never sent: an open circuit)."""
        if not self.fanout.patient:
            return None
        elapsed = now - self.dispatched
        budget = self.fanout.patience.budget_s
        return {m for m in self.members if m not in self.pending or elapsed >= budget(m)}

    def _late_at(self, now: float) -> float | None:
        """When the next member that lacks its own final answer and is not late at `now` becomes late
        (None: no such member, or the eager policy): the loop wakes then to decode it. Members late
        at `now` are `_late(now)`'s; every other one is here, whatever the clock reads later."""
        if not self.fanout.patient:
            return None
        elapsed = now - self.dispatched
        final = self.group.resolutions - 1
        budgets = [
            self.fanout.patience.budget_s(m)
            for m in self.members
            if m in self.pending and not (m in self.real and self.real[m].resolution == final)
        ]
        ahead = [b for b in budgets if b > elapsed]
        return self.dispatched + min(ahead) if ahead else None

    def _final(self, answers: dict[str, Answer]) -> Update:
        """The final; members whose calls it cuts short are recorded at the time they were cut (a
        lower bound of their latency, so that a node that slowed down for good raises its patience)."""
        if self.fanout.patient:
            elapsed = self.fanout.clock() - self.dispatched
            for m, answer in answers.items():
                if not answer.real and m in self.pending:
                    self.fanout.patience.record(m, elapsed)
        return self._update("final", answers)

    def _progress(self, answers: dict[str, Answer]) -> Update | None:
        keys = {m: a.key for m, a in answers.items()}
        if self.last is None:
            self.last = keys
            return self._update("coarse", answers)
        if any(keys[m] > self.last[m] for m in keys):
            self.last = keys
            return self._update("refined", answers)
        return None

    def _failed(self) -> Update:
        missing = [m for m in self.members if m not in self.real]
        why = "; ".join(str(e) for e in self.failures.values()) or "no reply"
        return self._update(
            "error", error=f"no answer for {missing} and too few coded outputs to decode them ({why})", status=503
        )

    def _at_deadline(self, answers: dict[str, Answer]) -> Update:
        if len(answers) == len(self.members):
            return self._update("final", answers)
        if self.options.deadline_ms is None:
            limit = self.fanout.client.settings.upstream_timeout_s
            return self._update(
                "error", error=f"replicas did not answer within the {limit:g} s upstream timeout", status=504
            )
        missing = [m for m in self.members if m not in answers]
        return self._update(
            "error", error=f"deadline_ms {self.options.deadline_ms:g} passed before {missing} had an answer", status=504
        )


def response_parameters(update: Update, group: Group) -> dict[str, Any]:
    exact = update.exact_members(group.resolutions - 1)
    return {
        "seq": update.seq,
        "resolution": update.resolution,
        "planes": group.planes[update.resolution] if update.answers else None,
        "exact_members": exact,
        "decoded_members": update.decoded_members(),
        "approximate": len(exact) != len(update.members),
        "elapsed_ms": update.elapsed_ms,
    }
