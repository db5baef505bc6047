"""The tail report's statistics on synthetic raw files: pooling, block-bootstrap intervals, paired
ratios, the issue-13 verdicts and the patience choice (no processes, seconds)."""

from __future__ import annotations

import numpy as np

from bench.tail_report import BLOCK, calm_approximate, patience_choice, pooled_rows, summary, verdicts

SETTINGS = {"requests_per_trial": 1000, "trials": 2, "patience_quantile": 0.99, "pareto": [0.2, "medium"]}


def run(mode, intensity, latency_ms, trial=0, q=None, approximate=None, correct=None, touched=None, outcome=None):
    n = len(latency_ms)
    return {
        "mode": mode,
        "patience_quantile": q,
        "load": 0.2,
        "intensity": intensity,
        "trial": trial,
        "pauses": [],
        "requests": {
            "sent_at": list(np.arange(n) / 50.0),
            "latency_ms": list(latency_ms),
            "first_ms": list(latency_ms),
            "status": [200] * n,
            "outcome": outcome or ["final"] * n,
            "approximate": approximate or [False] * n,
            "decoded_members": ["" for _ in range(n)],
            "correct": correct or [True] * n,
            "image": list(range(n)),
            "touched": touched or [False] * n,
            "decoded_while_paused": [False] * n,
        },
    }


def latencies(seed, scale=10.0, n=1000):
    return list(np.random.default_rng(seed).exponential(scale, n) + 5.0)


def raw_of(*runs):
    return {"settings": SETTINGS, "runs": list(runs)}


def test_pooled_row_joins_trials_and_leaves_errors_out_of_the_latencies():
    outcome = ["final"] * 990 + ["http_503"] * 10
    rows = pooled_rows(raw_of(run("coded", "none", latencies(0), 0, 0.99), run("coded", "none", latencies(1), 1, 0.99,
                                                                                outcome=outcome)))  # fmt: skip
    (row,) = rows
    assert (row.requests, row.errors, row.trials, len(row.first_ms)) == (2000, 10, 2, 1990)
    assert set(np.unique(row.block)) == set(range(2 * 1000 // BLOCK))


def test_p999_interval_covers_the_true_quantile():
    rows = pooled_rows(raw_of(*(run("wait-all", "medium", latencies(s, 10.0), t) for t, s in enumerate((3, 4)))))
    (line,) = summary(rows, SETTINGS)
    true_p999 = 5.0 + 10.0 * np.log(1000)  # exponential(10) + 5
    low, high = line["p999_ci_ms"]
    assert low < true_p999 < high
    assert low < line["p999_ms"] < high


def test_ratio_between_identical_rows_is_exactly_one():
    same = latencies(5)
    rows = pooled_rows(raw_of(run("wait-all", "medium", same), run("coded", "medium", same, q=0.99)))
    coded = next(line for line in summary(rows, SETTINGS) if line["mode"] == "coded")
    assert coded["gap_cut_vs_wait_all"] == [1.0, 1.0, 1.0]  # paired draws: the same blocks on both sides


def test_verdicts_pass_and_fail_on_the_measured_values():
    slow_tail = [500.0 if i % 50 == 0 else x for i, x in enumerate(latencies(6, 10.0))]  # one in every block
    rows = pooled_rows(
        raw_of(
            run("wait-all", "medium", slow_tail),
            run("coded", "medium", latencies(6, 10.0), q=0.99),
            run("coded-eager", "medium", latencies(7, 5.0)),
            run("coded", "none", latencies(8, 10.0), q=0.99, approximate=[True] * 20 + [False] * 980),
        )
    )
    checks = {(c["check"], c["point"]): c["verdict"] for c in verdicts(rows, SETTINGS)}
    assert checks[("coded cut of p99.9 − p50 against wait-all", "20%, medium")] == "pass"
    assert checks[("coded p99.9 / coded-eager p99.9", "20%, medium")] == "**fail**"
    assert checks[("coded served accuracy − wait-all's (points)", "20%, medium")] == "pass"
    assert checks[("coded answers approximate without stragglers", "20%, none")] == "**fail**"  # 2% > 1%
    assert checks[("coded p99.9 with stragglers / straggler-free", "20%, medium")] == "pass"


def test_patience_choice_takes_the_fastest_eligible_quantile():
    wrong = [False] * 10 + [True] * 990
    rows = pooled_rows(
        raw_of(
            run("wait-all", "medium", latencies(9, 20.0)),
            run("coded", "medium", latencies(10, 5.0), q=0.9, correct=wrong),  # fast but inaccurate
            run("coded", "medium", latencies(11, 8.0), q=0.99),
            run("coded", "medium", latencies(12, 12.0), q=0.999),
        )
    )
    table, chosen = patience_choice(rows, SETTINGS)
    assert chosen == 0.99
    assert [line["eligible"] for line in table] == ["no", "yes", "yes"]


def test_calm_share_falls_back_to_untouched_requests():
    approximate = [True] * 10 + [False] * 990
    touched = [True] * 10 + [False] * 990  # every approximate answer was touched by a pause
    rows = pooled_rows(raw_of(run("coded", "medium", latencies(13), q=0.9, approximate=approximate, touched=touched)))
    share, source = calm_approximate(rows, rows[0])
    assert share == 0.0 and source.startswith("untouched")
