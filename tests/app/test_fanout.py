"""Fan-out logic against scripted replicas (a unit test double; the real thing is in tests/integration)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from app.channel import Call, Options as CallOptions, StepAnswer
from app.errors import ReplicaError
from app.fanout import Fanout
from app.group import Group
from app.metrics import GatewayMetrics
from app.settings import GatewaySettings
from app.updates import Options, Update
from models.coding import coefficients, encode
from protocol.spec import InputSpec, ModelSpec

MEMBERS = ["m0", "m1", "m2"]
PROBS = np.random.default_rng(0).dirichlet(np.ones(10), size=(3, 1))  # (k, B, C)
CODED = encode(PROBS, coefficients(3, 1))[0]


def _spec(classes: int, labels: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec("g", InputSpec("input", (1, 28, 28)), classes, labels)


class ScriptedChannel:
    """One replica's channel: each call is answered with (delay_s, resolution[, stopped]) steps on loop
    timers, or fails with `fail`; a final-only call to a replica with a `final:NAME` script gets that
    one instead. Records calls and cancels as the real channel would see them."""

    def __init__(self, replicas: ScriptedReplicas, name: str) -> None:
        self.replicas, self.name = replicas, name

    def submit(self, call: Call, images: bytes, options: CallOptions) -> None:
        replicas = self.replicas
        replicas.calls.append((self.name, not options.final_only))
        key = f"hedge:{call.member}" if self.name == "hedge" else call.member
        if options.final_only and f"final:{key}" in replicas.script:
            key = f"final:{key}"
        call.channel = self  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        if key in replicas.fail:
            error = ReplicaError(call.member, "connection", replicas.fail[key])
            replicas.timers[id(call)] = [loop.call_soon(self._fail, call, error)]
            return
        at, timers = 0.0, []
        for delay, resolution, *stopped in replicas.script.get(key, [(3600, 0)]):
            at += delay
            timers.append(loop.call_later(at, self._answer, call, resolution, bool(stopped and stopped[0])))
        replicas.timers[id(call)] = timers
        replicas.final_steps[id(call)] = len(timers)

    def _answer(self, call: Call, resolution: int, stopped: bool) -> None:
        replicas = self.replicas
        probs = CODED if call.member == "c" else PROBS[MEMBERS.index(call.member)]
        replicas.final_steps[id(call)] -= 1
        last = replicas.final_steps[id(call)] == 0 or stopped
        final = resolution == 1
        if last or final or stopped:
            call.done = True
        call.sink.answered(call, StepAnswer(probs.copy(), resolution, final or (last and not stopped), stopped))
        if final or stopped:
            for timer in replicas.timers.pop(id(call), []):
                timer.cancel()

    def _fail(self, call: Call, error: ReplicaError) -> None:
        call.done = True
        call.sink.failed(call, error)

    def cancel(self, call: Call) -> None:
        call.done = True
        for timer in self.replicas.timers.pop(id(call), []):
            timer.cancel()
        self.replicas.cancelled.append(f"hedge:{call.member}" if self.name == "hedge" else call.member)


class ScriptedReplicas:
    """Stands in for app.replicas.Replicas: `pick` gives each replica's scripted channel."""

    def __init__(
        self, script: dict[str, list[tuple[float, int]]], fail: dict[str, str] | None = None, **settings: Any
    ) -> None:
        self.script, self.fail = script, fail or {}
        self.settings = GatewaySettings(upstream_timeout_s=2, **settings)
        self.cancelled: list[str] = []
        self.calls: list[tuple[str, bool]] = []  # (replica, streamed)
        self.timers: dict[int, list[asyncio.TimerHandle]] = {}
        self.final_steps: dict[int, int] = {}
        self.skipped: set[str] = set()
        self.unresponsive: set[str] = set()
        self.is_hedge_usable = True

    def pick(self, name: str) -> ScriptedChannel:
        return ScriptedChannel(self, name)


def _fanout(replicas: ScriptedReplicas, hedge: bool = False) -> Fanout:
    coded = {} if hedge else {"c": 0}
    urls = {n: "tcp://x:1" for n in [*MEMBERS, "c"]}
    group = Group(
        "g", MEMBERS, coded, coefficients(3, 1), 2, [4, None], _spec(10), urls, "tcp://hedge:1" if hedge else None
    )
    return Fanout(group, replicas, GatewayMetrics(), replicas.settings)  # type: ignore[arg-type]


async def execute(fanout: Fanout, options: Options, emit: Any = None, arrival: float | None = None) -> Update:
    """Run one request to its terminal update (the lifecycle's part, without a log)."""
    done: asyncio.Future[Update] = asyncio.get_running_loop().create_future()
    images = np.zeros((1, 1, 28, 28), np.float32)
    start = fanout.clock() if arrival is None else arrival
    fanout.start(images, options, start, done.set_result, emit)
    return await done


async def _events(
    client: ScriptedReplicas, options: Options, hedge: bool = False
) -> list[tuple[str, list[str], float]]:
    out = []

    def emit(u: Update) -> None:
        assert u.event in ("coarse", "refined")
        out.append((u.event, u.decoded_members(), u.elapsed_ms))

    u = await execute(_fanout(client, hedge), options, emit)
    out.append((u.event, u.decoded_members() if u.event != "error" else [u.error or ""], u.elapsed_ms))
    return out


FAST = [(0.0, 0), (0.01, 1)]


@pytest.mark.anyio
async def test_every_replica_answering_gives_coarse_refined_final_exact():
    client = ScriptedReplicas({"m0": FAST, "m1": FAST, "m2": FAST, "c": [(0.05, 0), (0.05, 1)]})
    events = await _events(client, Options(stream=True))
    assert [e[0] for e in events][0] == "coarse" and events[-1][0] == "final"
    assert events[-1][1] == []


@pytest.mark.anyio
async def test_a_silent_member_is_decoded_and_its_call_cancelled():
    client = ScriptedReplicas({"m0": FAST, "m2": FAST, "c": FAST})
    events = await _events(client, Options(stream=True))
    assert events[0] == ("coarse", ["m1"], events[0][2])
    assert events[-1][0] == "final" and events[-1][1] == ["m1"]
    assert client.cancelled == ["m1"]


@pytest.mark.anyio
async def test_deadline_without_an_answer_for_every_member_is_one_error():
    client = ScriptedReplicas({"m0": FAST, "m2": FAST})
    events = await _events(client, Options(deadline_ms=100))
    assert [e[0] for e in events] == ["error"]
    assert "deadline_ms 100 passed before ['m1'] had an answer" in events[0][1][0]
    assert 100 <= events[0][2] < 150
    assert sorted(client.cancelled) == ["c", "m1"]


@pytest.mark.anyio
async def test_deadline_with_low_resolution_answers_is_an_approximate_final():
    slow = [(0.0, 0), (5.0, 1)]
    client = ScriptedReplicas({"m0": slow, "m1": slow, "m2": slow, "c": slow})
    events = await _events(client, Options(deadline_ms=80, stream=True))
    assert [e[0] for e in events] == ["coarse", "final"]
    assert 80 <= events[-1][2] < 130


@pytest.mark.anyio
async def test_replicas_that_all_fail_end_quickly_with_a_503():
    client = ScriptedReplicas({}, fail={n: "refused" for n in [*MEMBERS, "c"]})
    events = await _events(client, Options())
    assert [e[0] for e in events] == ["error"]
    assert "too few coded outputs" in events[0][1][0] and events[0][2] < 50


@pytest.mark.anyio
async def test_stop_margin_finishes_at_a_low_resolution():
    slow = [(0.0, 0), (5.0, 1)]
    client = ScriptedReplicas({"m0": slow, "m1": slow, "m2": slow, "c": slow})
    events = await _events(client, Options(stop_margin=1e-6, stream=True))
    assert [e[0] for e in events] == ["final"] and events[0][2] < 100


@pytest.mark.anyio
async def test_a_silent_member_is_hedged_after_the_initial_delay_and_the_loser_cancelled():
    one = [(0.0, 1)]
    client = ScriptedReplicas({"m0": one, "m2": one, "hedge:m1": one})
    events = await _events(client, Options(), hedge=True)
    assert [e[0] for e in events] == ["final"] and events[0][1] == []  # m1 answered for real, by the hedge
    assert 20 <= events[0][2] < 60  # the 20 ms initial hedge delay
    assert client.cancelled == ["m1"]


@pytest.mark.anyio
async def test_a_failing_member_is_hedged_at_once():
    one = [(0.0, 1)]
    client = ScriptedReplicas({"m0": one, "m2": one, "hedge:m1": one}, fail={"m1": "refused"})
    events = await _events(client, Options(), hedge=True)
    assert [e[0] for e in events] == ["final"] and events[0][2] < 15


@pytest.mark.anyio
async def test_every_member_answered_and_no_call_left_ends_at_once():
    """Every call has ended, some only with a coarse answer: nothing can improve the answers, so the
    final goes out now (approximate), not at the deadline."""
    coarse_only = [(0.0, 0)]
    client = ScriptedReplicas({"m0": coarse_only, "m1": coarse_only, "m2": coarse_only, "c": coarse_only})
    started = time.perf_counter()
    events = await _events(client, Options(deadline_ms=5000, stream=True))
    assert events[-1][0] == "final" and time.perf_counter() - started < 1.0


ONE_SHOT = [(0.0, 1)]  # a plain JSON call: the float32 answer only
STOPPED = [(0.0, 0, True)]  # the replica was confident at the coarse resolution and ended its stream


@pytest.mark.anyio
async def test_replicas_that_stopped_confident_are_asked_for_float32_when_the_ensemble_is_not():
    """Each member stopped at its coarse answer (its own margin), but the ensemble's margin is below
    stop_margin: they are asked once for the float32 answer, which the final then carries."""
    script = {**{n: STOPPED for n in [*MEMBERS, "c"]}, **{f"final:{n}": ONE_SHOT for n in MEMBERS}}
    client = ScriptedReplicas(script)
    fanout = _fanout(client)
    update = await execute(fanout, Options(stop_margin=0.9, stream=True))
    assert update.event == "final" and update.exact_members(1) == MEMBERS
    assert sorted(client.calls) == sorted([(n, True) for n in [*MEMBERS, "c"]] + [(n, False) for n in MEMBERS])
    assert fanout.metrics.final_asks._value.get() == 3


@pytest.mark.anyio
async def test_a_plain_call_asked_again_for_float32_ends_with_the_next_event_number():
    """The same, as a plain JSON call with stop_margin (nobody reads its progress): its final is its
    first event, seq 1. (Found by bench/stop_margin.py on the wide bundle: the unread progress update
    took seq 1, the final came as seq 2 and the event log refused it, "event seq 2 does not follow 0":
    the request failed.)"""
    script = {**{n: STOPPED for n in [*MEMBERS, "c"]}, **{f"final:{n}": ONE_SHOT for n in MEMBERS}}
    update = await execute(_fanout(ScriptedReplicas(script)), Options(stop_margin=0.9))
    assert update.event == "final" and update.seq == 1


@pytest.mark.anyio
async def test_replicas_that_stopped_confident_end_the_request_when_the_ensemble_is_too():
    client = ScriptedReplicas({n: STOPPED for n in [*MEMBERS, "c"]})
    update = await execute(_fanout(client), Options(stop_margin=1e-6, stream=True))
    assert update.event == "final" and update.resolution == 0
    assert all(streamed for _, streamed in client.calls)  # nobody asked again


@pytest.mark.anyio
async def test_patient_waits_for_a_member_that_is_slower_than_the_coded_replica_but_not_late():
    """m2 answers 40 ms after the coded replica: eager decodes it, patient (patience 200 ms) waits and
    serves its exact answer."""
    script = {"m0": ONE_SHOT, "m1": ONE_SHOT, "m2": [(0.04, 1)], "c": [(0.0, 1)]}
    eager = await _events(ScriptedReplicas(script, decode_policy="eager"), Options())
    patient = await _events(ScriptedReplicas(script, patience_initial_ms=200), Options())
    assert eager[-1][:2] == ("final", ["m2"]) and eager[-1][2] < 40
    assert patient[-1][:2] == ("final", []) and patient[-1][2] >= 40


@pytest.mark.anyio
async def test_patient_decodes_a_member_once_it_is_late():
    """m2 never answers: once its patience (50 ms + 5 ms margin before any history) has run out it is
    decoded, and the final says so."""
    script = {"m0": ONE_SHOT, "m1": ONE_SHOT, "c": [(0.0, 1)]}
    events = await _events(ScriptedReplicas(script, patience_initial_ms=50, patience_margin_ms=5), Options())
    assert events[-1][:2] == ("final", ["m2"])
    assert 55 <= events[-1][2] < 55 + 100


@pytest.mark.anyio
async def test_patient_streams_a_decoded_answer_early_and_replaces_it_with_the_exact_one():
    """On a stream the decoded answer may go out at once (coarse), the exact one replaces it, and the
    final is exact."""
    script = {"m0": FAST, "m1": FAST, "m2": [(0.04, 0), (0.01, 1)], "c": FAST}
    events = await _events(ScriptedReplicas(script, patience_initial_ms=200), Options(stream=True))
    assert events[0][:2] == ("coarse", ["m2"])
    assert events[-1][:2] == ("final", [])


def test_patience_is_a_quantile_of_recent_calls_plus_the_margin():
    from app.patience import Patience

    changes: list[tuple[str, float]] = []
    patience = Patience(0.9, 0.005, 0.05, on_change=lambda m, s: changes.append((m, s)))
    assert patience.budget_s("m0") == pytest.approx(0.055)  # no history yet
    samples = [ms / 1000 for ms in range(1, 101)]  # the quantile is refreshed every 50 new samples
    for seconds in samples[:49]:
        patience.record("m0", seconds)
    assert patience.budget_s("m0") == pytest.approx(0.055)  # 49 calls are not a history yet
    for seconds in samples[49:]:
        patience.record("m0", seconds)
    assert patience.budget_s("m0") == pytest.approx(float(np.quantile(samples, 0.9)) + 0.005)
    assert changes and changes[-1][0] == "m0"
    assert patience.budget_s("m0", refine=True) == pytest.approx(0.055)  # refining calls keep their own


class SteppedClock:
    """The fan-out's clock: real time plus jumps made by hand, so a member's patience can run out at
    an exact moment (between two readings of the clock)."""

    def __init__(self) -> None:
        self.jumped = 0.0

    def __call__(self) -> float:
        return time.perf_counter() + self.jumped


@pytest.mark.anyio
async def test_a_member_whose_patience_runs_out_while_an_update_is_emitted_is_still_decoded():
    """Issue 27's hang, made deterministic by a stepped clock:
    1. m0 and m1 answer at once; m2 never does (paused by SIGSTOP);
    2. the coded replica's answer comes last (its call stays open): every member has an answer (m2's
       decoded), but m2 is not late yet, so a `coarse` update goes out;
    3. while that update is emitted, m2's patience (50 ms + 5 ms) runs out; no other answer will come.
    Result: m2 is decoded at once, not when the upstream time-out (2 s) ends the wait."""
    clock = SteppedClock()
    script = {"m0": ONE_SHOT, "m1": ONE_SHOT, "c": [(0.01, 1), (3600, 1)]}
    client = ScriptedReplicas(script, patience_initial_ms=50)
    fanout = _fanout(client)
    fanout.clock = clock

    def emit(update: Update) -> None:
        clock.jumped += 0.1  # the patience runs out between two readings of the clock

    started = time.perf_counter()
    update = await execute(fanout, Options(stream=True), emit)
    assert update.event == "final" and update.decoded_members() == ["m2"]
    assert time.perf_counter() - started < 0.5


@pytest.mark.anyio
async def test_a_plain_request_whose_members_answer_in_time_never_calls_the_coded_replica():
    """Patient policy: the coded answer is read only once a member is late, so its call is held back
    (patience 55 ms less the coded replica's latency, 5 ms before any history) and never sent when
    every member answers sooner (issue 27)."""
    replicas = ScriptedReplicas({"m0": ONE_SHOT, "m1": ONE_SHOT, "m2": [(0.01, 1)], "c": ONE_SHOT})
    events = await _events(replicas, Options())
    assert events == [("final", [], events[0][2])]
    assert sorted(name for name, _ in replicas.calls) == ["m0", "m1", "m2"]


@pytest.mark.anyio
async def test_a_held_coded_call_goes_out_when_its_hold_ends_and_decodes_the_late_member():
    replicas = ScriptedReplicas({"m0": ONE_SHOT, "m1": ONE_SHOT, "c": ONE_SHOT})
    events = await _events(replicas, Options())
    assert events[-1][:2] == ("final", ["m2"])
    assert 55 <= events[-1][2] < 55 + 50  # at m2's patience: the coded answer was there by then
    assert sorted(name for name, _ in replicas.calls) == ["c", "m0", "m1", "m2"]


@pytest.mark.anyio
async def test_a_member_failing_sends_the_held_coded_call_at_once():
    replicas = ScriptedReplicas({"m0": ONE_SHOT, "m1": ONE_SHOT, "c": ONE_SHOT}, fail={"m2": "refused"})
    events = await _events(replicas, Options())
    assert events[-1][:2] == ("final", ["m2"]) and events[-1][2] < 30


@pytest.mark.anyio
@pytest.mark.parametrize("options", [Options(stream=True), Options()], ids=["stream", "eager"])
async def test_streams_and_the_eager_policy_call_the_coded_replica_at_once(options):
    policy = {} if options.stream else {"decode_policy": "eager"}
    replicas = ScriptedReplicas({"m0": ONE_SHOT, "m1": ONE_SHOT, "m2": [(0.02, 1)], "c": ONE_SHOT}, **policy)
    await _events(replicas, options)
    assert "c" in [name for name, _ in replicas.calls]


@pytest.mark.anyio
async def test_a_member_that_stopped_answering_its_pings_is_not_waited_for():
    """m2's worker missed its pings (paused): its call still goes, but the request decodes it as soon
    as the coded answer is in, not at its patience (200 ms here)."""
    replicas = ScriptedReplicas({"m0": ONE_SHOT, "m1": ONE_SHOT, "c": ONE_SHOT}, patience_initial_ms=200)
    replicas.unresponsive = {"m2"}
    events = await _events(replicas, Options())
    assert events[-1][:2] == ("final", ["m2"]) and events[-1][2] < 50
    assert "m2" in [name for name, _ in replicas.calls]


def test_a_members_first_patience_comes_from_its_warm_up_never_below_the_initial():
    """Issue 29: a worker's Welcome says what its batch-1 steps took while warming up; until its own
    calls are timed, a member's patience is WARM_FACTOR times that (every resolution for a refining
    call), or the initial patience when that is longer."""
    from app.patience import WARM_FACTOR
    from protocol.channel import Welcome

    replicas = ScriptedReplicas({})
    fanout = _fanout(replicas)
    initial, margin = 0.050, 0.005
    slow = Welcome(1, {}, ["m0"], 784, 10, 64, [[6.0, 9.0]])  # a slow model: 9 ms a float32 step
    fast = Welcome(1, {}, ["m1"], 784, 10, 64, [[0.4, 0.3]])
    replicas.on_welcome("m0", slow)  # type: ignore[attr-defined]
    replicas.on_welcome("m1", fast)  # type: ignore[attr-defined]
    replicas.on_welcome("c", Welcome(1, {}, ["c"], 784, 10, 64, [[99.0, 99.0]]))  # type: ignore[attr-defined]
    assert fanout.patience.budget_s("m0") == pytest.approx(WARM_FACTOR * 0.009 + margin)
    assert fanout.patience.budget_s("m0", refine=True) == pytest.approx(WARM_FACTOR * 0.015 + margin)
    assert fanout.patience.budget_s("m1") == pytest.approx(initial + margin)
    assert fanout.patience.budget_s("m2") == pytest.approx(initial + margin)
    for _ in range(50):  # its own calls, once timed, replace the warm-up's word
        fanout.patience.record("m0", 0.002)
    assert fanout.patience.budget_s("m0") == pytest.approx(0.002 + margin)


@pytest.mark.anyio
async def test_a_stream_holds_its_coded_call_when_no_replica_serves_a_coarse_resolution():
    """Issue 31: every replica reports only its float32 resolution live (its coarse one measured no
    cheaper), so a stream's answers are all finals: its coded call is held as a plain call's and
    never sent when the members answer in time. One replica still serving a coarse resolution, or a
    request asking for coarse answers, sends it at once again."""
    one_shot = {"m0": ONE_SHOT, "m1": ONE_SHOT, "m2": [(0.01, 1)], "c": ONE_SHOT}
    for serving, options, called in [
        (set(), Options(stream=True), False),
        ({"m1"}, Options(stream=True), True),
        (set(), Options(stream=True, coarse=True), True),
    ]:
        replicas = ScriptedReplicas(dict(one_shot))
        fanout = _fanout(replicas)
        for name in [*MEMBERS, "c"]:
            fanout._resolutions(name, {name: {"live": [0, 1] if name in serving else [1], "typical": []}})
        update = await execute(fanout, options)
        assert update.event == "final" and update.decoded_members() == []
        assert ("c" in [name for name, _ in replicas.calls]) is called, (serving, options)
