from __future__ import annotations

import pytest

from workers.faults import FaultInjector, Verdict, parse_delay
from workers.settings import FaultSettings


def test_faults_are_off_by_default():
    assert not FaultSettings().enabled


@pytest.mark.parametrize(("spec", "kind"), [("const:5", "const"), ("exp:20", "exp"), ("pareto:5:1.5", "pareto")])
def test_delay_specs_parse(spec, kind):
    assert parse_delay(spec)[0] == kind


@pytest.mark.parametrize("spec", ["slow", "exp", "exp:-1", "pareto:5", "const:x"])
def test_bad_delay_specs_are_refused(spec):
    with pytest.raises(ValueError, match="fault delay"):
        parse_delay(spec)


def test_delays_are_seeded_and_have_the_configured_scale():
    a = FaultInjector(FaultSettings(delay="exp:10", seed=1))
    b = FaultInjector(FaultSettings(delay="exp:10", seed=1))
    draws = [a.sample_delay_s() for _ in range(2000)]
    assert draws[:5] == [b.sample_delay_s() for _ in range(5)]
    assert 0.009 < sum(draws) / len(draws) < 0.011
    assert FaultInjector(FaultSettings(delay="pareto:5:1.5")).sample_delay_s() >= 0.005


def test_error_and_garbage_rates_split_the_verdicts():
    injector = FaultInjector(FaultSettings(error_rate=0.2, garbage_rate=0.3, seed=3))
    verdicts = [injector.verdict() for _ in range(5000)]
    assert 0.17 < verdicts.count(Verdict.ERROR) / 5000 < 0.23
    assert 0.27 < verdicts.count(Verdict.GARBAGE) / 5000 < 0.33


def test_pause_windows_hold_replies_only_inside_them():
    injector = FaultInjector(FaultSettings(pause_every_s=100, pause_s=50))
    assert 49 < injector.pause_remaining_s() <= 50  # the window opens at start
    injector.started -= 60
    assert injector.pause_remaining_s() == 0.0
