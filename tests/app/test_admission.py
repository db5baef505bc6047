from __future__ import annotations

from app.measures import ReplicaLoad


def test_no_calls_in_flight_means_no_wait():
    load = ReplicaLoad(window_s=1.0, min_completions=5)
    assert load.expected_wait_s("m0", now=10.0) == 0.0


def test_wait_is_calls_in_flight_over_recent_throughput():
    """Little's law: 20 calls in flight at a replica completing 100 calls/s wait about 0.2 s."""
    load = ReplicaLoad(window_s=1.0, min_completions=5)
    for i in range(100):
        load.started("m0")
        load.finished("m0", completed=True, now=9.0 + i / 100)
    for _ in range(20):
        load.started("m0")
    assert abs(load.expected_wait_s("m0", now=10.0) - 0.2) < 1e-9  # type: ignore[operator]


def test_a_saturated_replica_keeps_its_littles_law_wait():
    """Completions as fast as it can, each waiting 200 ms in its queue: 20 in flight wait 0.2 s, not
    20 x 200 ms."""
    load = ReplicaLoad(window_s=1.0, min_completions=5)
    for i in range(100):
        load.started("m0")
        load.finished("m0", completed=True, now=9.0 + i / 100, elapsed_s=0.2)
    for _ in range(20):
        load.started("m0")
    assert abs(load.expected_wait_s("m0", now=10.0) - 0.2) < 1e-9  # type: ignore[operator]


def test_a_burst_on_a_rarely_called_replica_waits_its_time_per_call_not_its_demand():
    """A coded replica whose calls are held gets 8 at once when a member is paused: its 5 recent
    completions (5 ms each) say nothing of its capacity; 8 calls wait at most 8 x 5 ms, not 8 / 5 s."""
    load = ReplicaLoad(window_s=1.0, min_completions=5)
    for i in range(5):
        load.started("coded")
        load.finished("coded", completed=True, now=9.5 + i / 10, elapsed_s=0.005)
    for _ in range(8):
        load.started("coded")
    assert abs(load.expected_wait_s("coded", now=10.0) - 0.04) < 1e-9  # type: ignore[operator]


def test_a_replica_with_calls_but_no_recent_completion_gives_no_estimate():
    """A paused straggler: calls pile up, none completes; the deadline and decoding deal with it."""
    load = ReplicaLoad(window_s=1.0, min_completions=5)
    for i in range(10):
        load.started("m0")
        load.finished("m0", completed=True, now=float(i) / 10)
    load.started("m0")
    assert load.expected_wait_s("m0", now=5.0) is None  # the completions are older than the window
    load.started("m1")
    load.finished("m1", completed=False, now=5.0)  # cancelled calls are not completions
    load.started("m1")
    assert load.expected_wait_s("m1", now=5.0) is None


def test_a_request_needs_the_kth_fastest_of_its_replicas():
    """k = 3 members and one coded replica: the request can start once 3 of the 4 can answer, so
    one overloaded (or paused) replica does not hold it back."""
    load = ReplicaLoad(window_s=1.0, min_completions=1)
    for name, in_flight in (("m0", 1), ("m1", 2), ("m2", 50), ("c", 3)):
        for i in range(10):
            load.started(name)
            load.finished(name, completed=True, now=9.5 + i / 100)
        for _ in range(in_flight):
            load.started(name)
    # 10 completions in the last second: X = 10/s; waits 0.1, 0.2, 5.0, 0.3 s
    assert abs(load.expected_start_s(["m0", "m1", "m2", "c"], needed=3, now=10.0) - 0.3) < 1e-9
    assert abs(load.expected_start_s(["m0", "m1", "m2"], needed=3, now=10.0) - 5.0) < 1e-9
