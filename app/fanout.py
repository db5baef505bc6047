"""Per-request orchestration: fan out, decode, refine, honour the deadline, cancel what is not needed.

`Fanout.start` sends one request's replica calls (app/channel.py: one entry each in this tick's
frame to each worker) and returns its `Run`, which lives on callbacks and loop timers, not tasks:
each answer or failure a channel delivers, the deadline timer, the patience timer (a member
becomes late) and the hedge timers re-evaluate the request. It hands every intermediate `Update`
to `on_update` (only when someone reads them: `Options.stream`), `coarse` once every member has an
answer (real, low resolution, or decoded), `refined` whenever an answer improves, and ends with
exactly one terminal `Update` to `on_end`: a `final` (every answer at the float32 resolution, the
stop margin reached, no call left that could improve an answer, or the deadline with the best
answers so far) or an `error`. Ending cancels every call still in flight, so the workers drop
what nobody needs before they compute it (the coded replica's call once every member has answered,
a decoded member's call). No bytes, no HTTP.

Decoding costs about as much as parsing a request, so it is done only when its result is read: a
member is decoded for the final only once it is late (patient policy), and for the `coarse` and
`refined` events only when someone watches them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from app.channel import Call, Options as CallOptions, StepAnswer
from app.decoding import Answer
from app.errors import ReplicaError
from app.group import Group
from app.hedging import LatencyTracker
from app.measures import Activity, ReplicaLoad
from app.metrics import GatewayMetrics
from app.patience import Patience
from app.replicas import HEDGE, Replicas
from app.settings import GatewaySettings
from app.updates import Options, Update
from protocol.channel import Welcome

logger = logging.getLogger(__name__)
PROBE_EVERY = 50  # one coded call in this many is not held back: its latency keeps the hold honest
CODED_INITIAL_S = 0.002  # the coded replicas' fastest time per call before 50 of their calls have been timed


class Fanout:
    def __init__(
        self,
        group: Group,
        replicas: Replicas,
        metrics: GatewayMetrics,
        settings: GatewaySettings,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.group = group
        self.replicas = replicas
        self.metrics = metrics
        self.settings = settings
        self.clock = clock  # the request bookkeeping's clock (a test steps it)
        self.decoder = group.decoder()
        self.latency = LatencyTracker(quantile=group.hedge_quantile)
        self.load = ReplicaLoad()
        self.activity = Activity()  # what the console shows: recent calls, decode counts
        self.patient = settings.decode_policy == "patient"
        self.patience = Patience(
            settings.patience_quantile,
            settings.patience_margin_ms / 1000,
            settings.patience_initial_ms / 1000,
            on_change=lambda member, s: metrics.patience.labels(member).set(s),
        )
        names = [*group.members, *group.coded, HEDGE]
        self.replica_latency = {n: metrics.replica_latency.labels(n) for n in names}  # bound once
        self.coded_calls = 0
        # The coded replicas' time per call (from its send to its answer): what a held call still
        # needs once its hold ends. Starts small: a held call is seldom sent.
        self.coded_latency = LatencyTracker(quantile=0.1, initial_s=CODED_INITIAL_S)
        self._errors: dict[tuple[str, str], Any] = {}
        # Replicas that serve a coarse resolution (measured cheaper than float32, issue 31); until
        # a replica reports, it is assumed to. None serving one: a stream's answers are all finals.
        self._coarse_live: dict[str, bool] = {}
        self.coarse_served = True
        replicas.on_welcome = self._welcomed
        replicas.on_resolutions = self._resolutions

    def _welcomed(self, name: str, welcome: Welcome) -> None:
        """A member's worker connected: its first patience comes from what its warm-up measured."""
        if name in self.group.members and name in welcome.models:
            index = welcome.models.index(name)
            if index < len(welcome.warm_ms):
                self.patience.warmed(name, welcome.warm_ms[index])
        self._resolutions(name, dict(zip(welcome.models, welcome.resolutions, strict=False)))

    def _resolutions(self, name: str, reports: dict[str, Any]) -> None:
        """A replica's worker measured its resolutions again: the gauges follow (issue 31)."""
        report = reports.get(name)
        if report is None:
            return
        live = set(report.get("live", ()))
        self._coarse_live[name] = any(index in live for index in range(self.group.resolutions - 1))
        self.coarse_served = any(self._coarse_live.get(n, True) for n in (*self.group.members, *self.group.coded))
        for index, ratio in enumerate(report.get("typical", ())):
            if ratio is not None:
                self.metrics.resolution_cost_ratio.labels(name, str(index)).set(ratio)
            self.metrics.resolution_live.labels(name, str(index)).set(1 if index in live else 0)

    def error_counter(self, replica: str, kind: str) -> Any:
        child = self._errors.get((replica, kind))
        if child is None:
            child = self._errors[(replica, kind)] = self.metrics.replica_errors.labels(replica, kind)
        return child

    def start(
        self,
        images: np.ndarray,
        options: Options,
        arrival: float,
        on_end: Callable[[Update], None],
        on_update: Callable[[Update], None] | None = None,
    ) -> Run:
        """Start one request; `arrival` is its `clock()` reading when it arrived. `on_end` gets its
        terminal update exactly once (it may be called before this returns, when no call can go)."""
        run = Run(self, images, options, arrival, on_end, on_update)
        run.begin()
        return run

    def skipped(self) -> set[str]:
        """Replicas no call goes to: no connected endpoint, or an identity mismatch (app/replicas.py)."""
        return self.replicas.skipped


def _ignore(update: Update) -> None:
    pass


class Run:
    """One request while its replica calls come in; the sink of its calls."""

    def __init__(
        self,
        fanout: Fanout,
        images: np.ndarray,
        options: Options,
        arrival: float,
        on_end: Callable[[Update], None],
        on_update: Callable[[Update], None] | None,
    ) -> None:
        self.fanout = fanout
        self.group = group = fanout.group
        self.images = images
        self.payload = np.ascontiguousarray(images, dtype="<f4").tobytes()  # the same bytes to every replica
        self.options = options
        self.started = arrival
        self.on_end = on_end
        self.on_update = on_update if options.stream else None
        self.members = options.members or group.members
        self.coded_names = list(group.coded) if self.members == group.members else []
        self.final_resolution = group.resolutions - 1
        self.real: dict[str, Answer] = {}
        self.coded: dict[str, Answer] = {}
        self.failures: dict[str, ReplicaError] = {}
        self.calls: dict[str, list[Call]] = {}  # slot (member or coded model) → its calls in flight
        self.budgets: dict[str, float] = {}  # member → its patience for this request (patient policy)
        self.held: set[str] = set()  # coded replicas whose call waits for its hold to end (not sent yet)
        self.coded_options = CallOptions()
        self.stopped: set[str] = set()  # replicas that ended at a coarse resolution (stop_margin)
        self.asked_final: set[str] = set()  # replicas asked again for their float32 answer
        self.unrecorded: set[int] = set()  # ids of follow-up calls, whose latency says nothing
        self.seq = 0
        self.last: dict[str, tuple[int, bool]] | None = None
        self.ended = False
        self.dispatched = 0.0
        self.timers: list[asyncio.TimerHandle] = []
        self.wake: asyncio.TimerHandle | None = None
        self.wake_when: float | None = None
        self.hedging = group.hedge_url is not None and not options.refine and fanout.replicas.is_hedge_usable
        self.coarse_slower = False  # a coarse answer asked for explicitly came from a resolution not live

    # start and end -------------------------------------------------------------------------------
    def begin(self) -> None:
        fanout = self.fanout
        skipped = fanout.skipped()
        refine = self.options.refine
        call = CallOptions(
            start=self.options.min_resolution,
            final_only=not refine,
            stop_margin=self.options.stop_margin,
            time_left_ms=self._time_left_ms(),
            coarse=self.options.coarse,
        )
        self.dispatched = fanout.clock()
        if fanout.patient:  # this request's patience per member, as it stands when its calls go out
            self.budgets = {m: fanout.patience.budget_s(m, refine) for m in self.members}
        loop = asyncio.get_running_loop()
        hold_s = self._coded_hold_ms() / 1000 if self.coded_names else 0.0
        for name in self.members:
            if name in skipped:
                self.failures[name] = ReplicaError(name, "unreachable", "not connected; re-dialling")
            else:
                self._send(name, name, call)
        for name in self.coded_names:
            if name in skipped:
                self.failures[name] = ReplicaError(name, "unreachable", "not connected; re-dialling")
            elif hold_s > 0:  # sent only if a member is still missing when the hold ends
                self.held.add(name)
                self.coded_options = call
                self.timers.append(loop.call_later(hold_s, self._guarded, self._send_held, name, call))
            else:
                self._send(name, name, call)
        if not self.calls and not self.held:  # every replica's circuit is open: fail now, not at the time-out
            self._end(self._failed())
            return
        if self.options.deadline_ms is not None:
            left_s = self.started + self.options.deadline_ms / 1000 - fanout.clock()
        else:
            left_s = fanout.settings.upstream_timeout_s
        self.timers.append(loop.call_later(max(left_s, 0.0), self._guarded, self._at_deadline))
        if self.hedging:
            for member in self.members:
                if member in self.calls:
                    delay = fanout.latency.hedge_delay_s(member)
                    self.timers.append(loop.call_later(delay, self._guarded, self._hedge, member))
        self._guarded(self._evaluate)  # a circuit may already have decided it

    def _coded_hold_ms(self) -> float:
        """How long this request's coded calls may be held back: under the patient policy a coded
        answer is read only once a member is late (its patience, or the deadline), so it need start
        only the coded replica's fastest recent latency (its 10th percentile) before that; a request
        whose members all answer sooner never sends it, and no worker computes it (issue 27:
        redundancy that costs nothing when it is not needed). The price is paid only by a request
        with a late member: its decoded answer comes the coded replica's latency less that lead
        after the patience. Not for streams while coarse answers are served (their early decoded
        coarse answers are read; with no replica serving a coarse resolution, issue 31, a stream's
        answers are finals and its coded call is held as a plain call's), nor under the eager
        policy, and one call in PROBE_EVERY goes at once to keep the coded replicas' latency
        measured.

        Measured (docs/serving.md): held to the patience less the coded replica's median latency,
        the coded replica still computed 0.06-0.17 rows per request at 20-80% load and cost 0.1 ms
        of CPU per request at saturation (closed loop: members' latency is long and varied there,
        so many requests outlived the hold)."""
        fanout = self.fanout
        if not fanout.patient or (self.options.stream and (self.options.coarse or fanout.coarse_served)):
            return 0.0
        fanout.coded_calls += 1
        if fanout.coded_calls % PROBE_EVERY == 0:
            return 0.0
        first_late = min(self.budgets.values())
        if self.options.deadline_ms is not None:
            first_late = min(first_late, self.options.deadline_ms / 1000 - (fanout.clock() - self.started))
        coded_s = max(fanout.coded_latency.hedge_delay_s(c) for c in self.coded_names)  # their 10th percentile
        return max(0.0, (first_late - coded_s) * 1000)

    def _send_held(self, name: str, call: CallOptions) -> None:
        """A held coded call's hold has ended, or a member is late: send it now."""
        if name in self.held:
            self.held.discard(name)
            self._send(name, name, replace(call, time_left_ms=self._time_left_ms()))
            self._evaluate()

    def _time_left_ms(self) -> float | None:
        if self.options.deadline_ms is None:
            return None
        return max(1.0, self.options.deadline_ms - (self.fanout.clock() - self.started) * 1000)

    def _send(self, slot: str, replica: str, options: CallOptions, record: bool = True) -> None:
        fanout = self.fanout
        channel = fanout.replicas.pick(replica)
        call = Call(replica, slot, len(self.images), self, fanout.clock())
        if channel is None:
            self._failure(call, ReplicaError(replica, "unreachable", "not connected; re-dialling"))
            return
        try:
            channel.submit(call, self.payload, options)
        except ReplicaError as exc:
            self._failure(call, exc)
            return
        if not record:
            self.unrecorded.add(id(call))
        self.calls.setdefault(slot, []).append(call)
        fanout.load.started(slot)

    def cancel(self, reason: str, status: int = 503) -> None:
        """End the request now with an error (its client went away, the gateway shuts down)."""
        if not self.ended:
            self._end(self._update("error", error=reason, status=status))

    def _end(self, update: Update) -> None:
        if self.ended:
            return
        self.ended = True
        for timer in self.timers:
            timer.cancel()
        if self.wake is not None:
            self.wake.cancel()
        fanout = self.fanout
        now = fanout.clock()
        for slot, calls in self.calls.items():  # no longer needed: the workers drop them
            for call in calls:
                if call.channel is not None:
                    call.channel.cancel(call)
                fanout.activity.cut(call.replica, now - call.started)
                fanout.load.finished(slot, completed=False)
        self.calls = {}
        self.timers = []
        self.wake = None
        on_end, self.on_end, self.on_update = self.on_end, _ignore, None  # no cycle outlives the run
        on_end(update)

    def _guarded(self, callback: Callable[..., None], *args: Any) -> None:
        """Run a callback of this request; a bug in it ends the request (500), never the channel."""
        if self.ended:
            return
        try:
            callback(*args)
        except Exception:
            logger.exception("request failed")
            self._end(self._update("error", error="internal error", status=500))

    # what the channels deliver (CallSink) --------------------------------------------------------
    def answered(self, call: Call, answer: StepAnswer) -> None:
        self._guarded(self._answered, call, answer)

    def failed(self, call: Call, error: ReplicaError) -> None:
        self._guarded(self._failed_call, call, error)

    def _answered(self, call: Call, step: StepAnswer) -> None:
        slot = call.member
        answer = Answer(step.probs, step.resolution, real=True)
        book = self.coded if slot in self.group.coded else self.real
        if slot not in book or answer.key > book[slot].key:
            book[slot] = answer
        if step.stopped:
            self.stopped.add(slot)
        if step.slower:
            self.coarse_slower = True
        if step.final or step.stopped:
            self._call_ended(call, ok=True)
            for other in self.calls.get(slot, [])[:]:  # a hedged pair: the first answer wins
                self._cut(other)
        self._evaluate()

    def _failed_call(self, call: Call, error: ReplicaError) -> None:
        self._failure(call, error)
        self._evaluate()

    def _failure(self, call: Call, error: ReplicaError) -> None:
        self.fanout.error_counter(call.member, error.kind).inc()
        self._call_ended(call, ok=False)
        slot = call.member
        if not self.calls.get(slot):
            self.failures[slot] = error
        if self.hedging and call.replica != HEDGE and slot in self.group.members and slot not in self.real:
            self._hedge(slot)  # a failing member is hedged at once

    def _call_ended(self, call: Call, ok: bool) -> None:
        fanout = self.fanout
        slot = call.member
        calls = self.calls.get(slot)
        if calls is None or call not in calls:
            return
        calls.remove(call)
        if not calls:
            del self.calls[slot]
        elapsed = fanout.clock() - call.started
        fanout.load.finished(slot, completed=ok, elapsed_s=elapsed)
        if not ok:
            fanout.activity.error(call.replica)
            return
        fanout.replica_latency[call.replica].observe(elapsed)
        fanout.activity.call(call.replica, elapsed)
        if call.replica == slot and id(call) not in self.unrecorded:
            if slot in self.group.coded:
                fanout.coded_latency.record(slot, elapsed)
                return
            if self.group.hedge_url is not None:
                fanout.latency.record(slot, elapsed)
            fanout.patience.record(slot, elapsed, self.options.refine)

    def _cut(self, call: Call) -> None:
        calls = self.calls.get(call.member)
        if calls is None or call not in calls:
            return
        calls.remove(call)
        if not calls:
            del self.calls[call.member]
        if call.channel is not None:
            call.channel.cancel(call)
        self.fanout.activity.cut(call.replica, self.fanout.clock() - call.started)
        self.fanout.load.finished(call.member, completed=False)

    def _hedge(self, member: str) -> None:
        """The Tail-at-Scale hedge: a member that has not answered by the p95 of its recent latency
        (or whose call failed) is asked of the hedging replica too; the first answer wins."""
        if member in self.real or any(c.replica == HEDGE for c in self.calls.get(member, [])):
            return
        self.fanout.metrics.hedges.inc()
        self.failures.pop(member, None)
        self._send(member, HEDGE, CallOptions(start=0, final_only=True))

    # deciding ------------------------------------------------------------------------------------
    def _evaluate(self) -> None:
        """What the answers so far allow: the final, a progress event, or a wait (until the next
        answer, a member becoming late, or the deadline)."""
        # One reading of the clock decides both which members are late and when the next one will
        # be: a member whose patience ran out between two readings would be neither, and the request
        # would wait for an answer that never comes (issue 27).
        now = self.fanout.clock()
        members, decoder = self.members, self.fanout.decoder
        lacking = [m for m in members if self._lacks(m)]
        if not lacking:
            self._end(self._final({m: self.real[m] for m in members}, now))  # every member exact
            return
        late = self._late(now)
        if self.held and late is not None and any(m in late for m in lacking):
            for name in sorted(self.held):  # a member is late: the held coded calls are needed now
                self._send_held(name, self.coded_options)
            return
        # A final needs every lacking member decoded (late) or answered at a coarse resolution: until
        # one of them is, there is nothing to decode (the common case: members answering in time).
        if late is None or any(m in late or m in self.real for m in lacking):
            usable = decoder.answers(self.real, self.coded, members, decodable=late)
            if len(usable) == len(members) and self._is_final(usable):
                self._end(self._final(usable, now))
                return
        else:
            usable = {}
        idle = not self.calls and not self.held
        if self.on_update is not None or idle:
            answers = usable if late is None and usable else decoder.answers(self.real, self.coded, members)
            if len(answers) == len(members):
                if idle and not self._ask_final(answers):
                    self._end(self._final(answers, now))  # nothing left that could improve it
                    return
                if self.on_update is not None:  # an unread update must not take an event number
                    update = self._progress(answers)
                    if update is not None:
                        self.on_update(update)
            elif idle:
                self._end(self._failed())
                return
        self._wake_at(self._late_at(now))

    def _lacks(self, member: str) -> bool:
        """No answer of its own at the float32 resolution yet."""
        answer = self.real.get(member)
        return answer is None or answer.resolution < self.final_resolution

    def _is_final(self, answers: dict[str, Answer]) -> bool:
        if any(a.resolution < self.final_resolution for a in answers.values()):
            margin = self.options.stop_margin
            if margin is None:
                return False
            top2 = np.sort(np.mean([a.probs for a in answers.values()], axis=0), axis=1)[:, -2:]
            return bool(np.all(top2[:, 1] - top2[:, 0] >= margin))
        return True

    def _ask_final(self, answers: dict[str, Answer]) -> bool:
        """Every call has ended, but replicas that stopped at a coarse resolution (each confident on its
        own) leave the ensemble short of the stop margin (they disagree): ask them for their float32
        answer, once. Returns whether any call went out."""
        if self._is_final(answers):
            return False
        decoding = any(m not in self.real for m in self.members)  # coded answers matter only then
        names = [
            n
            for n in sorted(self.stopped - self.asked_final)
            if (
                self.coded[n].resolution < self.final_resolution and decoding
                if n in self.group.coded
                else self.real[n].resolution < self.final_resolution
            )
        ]
        for name in names:
            self.asked_final.add(name)
            self._send(name, name, CallOptions(start=0, final_only=True), record=False)
        self.fanout.metrics.final_asks.inc(len(names))
        return bool(names) and bool(self.calls)

    def _late(self, now: float) -> set[str] | None:
        """Members whose answers may be decoded for the final at `now`: all (None) under the eager
        policy; under the patient one, those that are late: their call has run past their patience, has
        ended without the answer (failed, or never sent: an open circuit), or goes to a replica that
        has stopped answering its pings (a paused process: waiting for it only makes every request
        wait its patience)."""
        if not self.fanout.patient:
            return None
        elapsed = now - self.dispatched
        budgets, calls = self.budgets, self.calls
        gone = self.fanout.replicas.unresponsive  # missed its pings: nothing to wait for
        return {m for m in self.members if m not in calls or m in gone or elapsed >= budgets[m]}

    def _late_at(self, now: float) -> float | None:
        """When the next member that lacks its own final answer and is not late at `now` becomes late
        (None: no such member, or the eager policy): the request wakes then to decode it. Members
        late at `now` are `_late(now)`'s; every other one is here, whatever the clock reads later."""
        if not self.fanout.patient:
            return None
        elapsed = now - self.dispatched
        budgets = [self.budgets[m] for m in self.members if m in self.calls and self._lacks(m)]
        ahead = [b for b in budgets if b > elapsed]
        return self.dispatched + min(ahead) if ahead else None

    def _wake_at(self, when: float | None) -> None:
        if when == self.wake_when and self.wake is not None:
            return  # the timer already set for it stands
        if self.wake is not None:
            self.wake.cancel()
            self.wake = None
        self.wake_when = when
        if when is not None:
            delay = max(0.0, when - self.fanout.clock())
            self.wake = asyncio.get_running_loop().call_later(delay, self._guarded, self._wake_up)

    def _wake_up(self) -> None:
        self.wake = None
        self._evaluate()

    # updates -------------------------------------------------------------------------------------
    def _update(
        self, event: str, answers: dict[str, Answer] | None = None, error: str | None = None, status: int = 200
    ) -> Update:
        self.seq += 1
        elapsed = (self.fanout.clock() - self.started) * 1000
        return Update(
            event, self.seq, round(elapsed, 3), answers or {}, self.members, error, status, self.coarse_slower
        )

    def _final(self, answers: dict[str, Answer], now: float) -> Update:
        """The final; members whose calls it cuts short are recorded at the time they were cut (a
        lower bound of their latency, so that a node that slowed down for good raises its patience)."""
        if self.fanout.patient:
            elapsed = now - self.dispatched
            gone = self.fanout.replicas.unresponsive  # not waited for: its cut says nothing of its speed
            for m, answer in answers.items():
                if not answer.real and m in self.calls and m not in gone:
                    self.fanout.patience.record(m, elapsed, self.options.refine)
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

    def _at_deadline(self) -> None:
        answers = self.fanout.decoder.answers(self.real, self.coded, self.members)
        if len(answers) == len(self.members):
            self._end(self._update("final", answers))
        elif self.options.deadline_ms is None:
            limit = self.fanout.settings.upstream_timeout_s
            self._end(
                self._update(
                    "error", error=f"replicas did not answer within the {limit:g} s upstream timeout", status=504
                )
            )
        else:
            missing = [m for m in self.members if m not in answers]
            message = f"deadline_ms {self.options.deadline_ms:g} passed before {missing} had an answer"
            self._end(self._update("error", error=message, status=504))
