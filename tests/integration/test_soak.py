"""The soak, shortened for CI: 20 s at 70% of the measured capacity with SIGSTOP stragglers on every
replica but one, and that one killed with SIGKILL 4 s after its last restart (2 s down) (issue 29: the suite's
budget; it was one minute, every 15 s). The ten-minute run is `coinserve bench soak`
(docs/results/soak.md)."""

from __future__ import annotations

import pytest

from bench.soak import soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_a_short_soak_loses_nothing_and_leaks_nothing(coded_bundle):
    result = soak(coded_bundle, 20.0, load=0.7, kill_every_s=4.0, down_s=2.0, intensity="medium", quiet=True)
    shown = ("sent", "finals", "errors", "lost", "refused", "outcomes", "by_kind", "capacity_req_per_s", "kills")
    summary = {k: result.get(k) for k in shown}  # what a failure needs, not the series (pytest would cut it)
    assert result["sent"] > 1000, summary
    assert result["lost"] == 0, summary
    # Overload refusals (503 + Retry-After at once, deadline requests only) are the documented answer to
    # a loop that lags, and the load generator shares this process and the two cores: a run alone
    # refused 6%, full-suite runs up to 14%. Other errors (504 at a deadline, an error event) must stay
    # the exception, and refusals must not become the rule.
    other_errors = result["errors"] - result["refused"]
    assert other_errors < 0.02 * result["sent"], summary
    assert result["refused"] < 0.25 * result["sent"], summary
    assert result["finals"] > 0.7 * result["sent"], summary
    assert result["kills"] >= 3, summary
    assert result["all_alive_at_end"], summary
    judged = [p for p in result["processes"] if p["judged"]]
    assert len(judged) == 4  # gateway, two members, the coded replica
    # A leak tripwire, not the 10% target: in 20 s the gateway's resident memory moves 2-15%
    # with the load spikes of the kills (allocator high-water marks); a leak of a request's worth
    # of memory per request (~10k requests) would be far beyond 25%. The 10% target is measured
    # over ten minutes by `coinserve bench soak` and reported in docs/results/soak.md.
    assert result["max_growth"] < 0.25, result["processes"]
