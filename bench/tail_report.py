"""The tail benchmark's figures, computed from the raw per-request file alone (bench.tail writes it;
`python -m bench.tail --from-raw PATH` recomputes everything): pooled rows per (mode, patience,
load, intensity) with block-bootstrap 95% intervals, the issue-13 verdicts, the patience choice, the
page (tail.md) and the plots (latency CCDFs, p99.9 against load, served accuracy against p99.9).

Intervals: requests are cut into blocks of BLOCK consecutive requests per trial (about 1 s: a pause
and the queue behind it stay inside one or two blocks), and the (trial, block) keys are resampled
with replacement, B times. Every row is resampled with the SAME draws, so that a ratio between two
rows of one point (same arrivals, same straggler schedule) is paired, and its interval is that of
the ratio over the draws.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from models.evaluate import markdown_table
from models.machine import FLAGS

MODE_ORDER = ("wait-all", "hedge", "coded", "coded-eager", "coded+refine")  # as bench.tail.MODES
BLOCK = 50  # requests per bootstrap block
B = 1000  # bootstrap draws
STATS = ("p50", "p99", "p999", "final_p999", "accuracy", "approximate")
SPLITS_NOTE = {
    "test": "Test split (images and seeds): the reported figures. The patience quantile is chosen on the "
    "validation run (`--split validation`, tail_validation.md), never here (DESIGN §5).",
    "validation": "Validation split (images carved out of train, other straggler and arrival seeds): the "
    "run on which the patience quantile is chosen; the reported figures come from `--split test`.",
}


def read_raw(path: Path) -> dict[str, Any]:
    with gzip.open(path, "rb") as f:
        raw: dict[str, Any] = orjson.loads(f.read())
    return raw


@dataclass
class Row:
    """Every trial of one (mode, patience_quantile, load, intensity) pooled; `ok` requests only in
    the arrays, `boot[stat]` the statistic over the B shared draws."""

    mode: str
    patience_quantile: float | None
    load: float
    intensity: str
    requests: int = 0
    errors: int = 0
    trials: int = 0
    first_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    final_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(0))
    approximate: np.ndarray = field(default_factory=lambda: np.zeros(0))
    touched: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    while_paused: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    block: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    point: dict[str, float] = field(default_factory=dict)
    boot: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, float | None, float, str]:
        return (self.mode, self.patience_quantile, self.load, self.intensity)

    @property
    def name(self) -> str:
        q = f" q={self.patience_quantile:g}" if self.patience_quantile is not None else ""
        return f"{self.mode}{q}"


def statistics(first: np.ndarray, final: np.ndarray, correct: np.ndarray, approx: np.ndarray) -> dict[str, float]:
    if len(first) == 0:
        return dict.fromkeys(STATS, float("nan"))
    p50, p99, p999 = np.percentile(first, [50, 99, 99.9])
    return {
        "p50": float(p50),
        "p99": float(p99),
        "p999": float(p999),
        "final_p999": float(np.percentile(final, 99.9)),
        "accuracy": float(np.mean(correct)),
        "approximate": float(np.mean(approx)),
    }


def pooled_rows(raw: dict[str, Any]) -> list[Row]:
    rows: dict[tuple[Any, ...], Row] = {}
    per_trial = raw["settings"]["requests_per_trial"]
    blocks_per_trial = -(-per_trial // BLOCK)
    parts: dict[tuple[Any, ...], list[dict[str, np.ndarray]]] = {}
    for run in raw["runs"]:
        key = (run["mode"], run["patience_quantile"], run["load"], run["intensity"])
        row = rows.setdefault(key, Row(*key))
        r = run["requests"]
        ok = np.array([o == "final" for o in r["outcome"]], bool)
        row.requests += len(ok)
        row.errors += int((~ok).sum())
        row.trials += 1
        index = np.arange(len(ok))[ok]
        parts.setdefault(key, []).append(
            {
                "first_ms": np.asarray(r["first_ms"], float)[ok],
                "final_ms": np.asarray(r["latency_ms"], float)[ok],
                "correct": np.array([bool(c) for c in r["correct"]], float)[ok],
                "approximate": np.asarray(r["approximate"], float)[ok],
                "touched": np.asarray(r["touched"], bool)[ok],
                "while_paused": np.asarray(r["decoded_while_paused"], bool)[ok],
                "block": run["trial"] * blocks_per_trial + index // BLOCK,
            }
        )
    for key, row in rows.items():
        for name in ("first_ms", "final_ms", "correct", "approximate", "touched", "while_paused", "block"):
            setattr(row, name, np.concatenate([p[name] for p in parts[key]]))
        row.point = statistics(row.first_ms, row.final_ms, row.correct, row.approximate)
    universe = max(raw["settings"]["trials"], max((r.trials for r in rows.values()), default=1)) * blocks_per_trial
    bootstrap(list(rows.values()), universe)
    order = {mode: i for i, mode in enumerate(MODE_ORDER)}
    return sorted(
        rows.values(),
        key=lambda r: (r.intensity == "none", r.intensity, r.load, order.get(r.mode, 9), r.patience_quantile or 0),
    )


def bootstrap(rows: list[Row], universe: int, seed: int = 13) -> None:
    """Every row's statistics over the same B draws of (trial, block) keys."""
    draws = np.random.default_rng(seed).integers(0, universe, size=(B, universe))
    for row in rows:
        members = [np.flatnonzero(row.block == b) for b in range(universe)]
        out = np.empty((B, len(STATS)))
        for i, draw in enumerate(draws):
            idx = np.concatenate([members[b] for b in draw])
            s = statistics(row.first_ms[idx], row.final_ms[idx], row.correct[idx], row.approximate[idx])
            out[i] = [s[name] for name in STATS]
        row.boot = {name: out[:, j] for j, name in enumerate(STATS)}


def interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return (float("nan"), float("nan"))
    low, high = np.percentile(finite, [2.5, 97.5])
    return (float(low), float(high))


@dataclass(frozen=True)
class Estimate:
    """A figure, its 95% interval and how many requests it rests on."""

    value: float
    low: float
    high: float
    requests: int

    def text(self, digits: int = 1, suffix: str = "") -> str:
        if not np.isfinite(self.value):
            return "—"
        f = f"{{:.{digits}f}}"
        if self.low == self.high == self.value:
            return f"{f.format(self.value)}{suffix}"
        return f"{f.format(self.value)}{suffix} [{f.format(self.low)}, {f.format(self.high)}]"


def answered(*rows: Row) -> int:
    return sum(len(r.first_ms) for r in rows)


def gap(row: Row) -> tuple[float, np.ndarray]:
    return row.point["p999"] - row.point["p50"], row.boot["p999"] - row.boot["p50"]


def ratio(top: tuple[float, np.ndarray], bottom: tuple[float, np.ndarray], requests: int) -> Estimate:
    with np.errstate(divide="ignore", invalid="ignore"):
        value = top[0] / bottom[0] if bottom[0] > 0 else float("nan")
        low, high = interval(top[1] / bottom[1])
    return Estimate(value, low, high, requests)


def stat(row: Row, name: str, scale: float = 1.0) -> Estimate:
    low, high = interval(row.boot[name] * scale)
    return Estimate(row.point[name] * scale, low, high, len(row.first_ms))


def find(rows: list[Row], mode: str, load: float, intensity: str, q: float | None = None) -> Row | None:
    return next(
        (
            r
            for r in rows
            if (r.mode, r.load, r.intensity) == (mode, load, intensity) and (q is None or r.patience_quantile == q)
        ),
        None,
    )


def coded_row(rows: list[Row], settings: dict[str, Any], load: float, intensity: str) -> Row | None:
    return find(rows, "coded", load, intensity, settings["patience_quantile"])


def summary(rows: list[Row], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per row: the pooled figures with their intervals, as the page shows them."""
    out = []
    for r in rows:
        wait = find(rows, "wait-all", r.load, r.intensity)
        cut = ratio(gap(wait), gap(r), len(wait.first_ms) + len(r.first_ms)) if wait and wait is not r else None
        drop = None
        if wait and wait is not r:
            d = (r.boot["accuracy"] - wait.boot["accuracy"]) * 100
            drop = Estimate((r.point["accuracy"] - wait.point["accuracy"]) * 100, *interval(d), 0)
        approx = r.approximate.astype(bool)
        out.append(
            {
                "mode": r.mode,
                "patience_quantile": r.patience_quantile,
                "load": r.load,
                "intensity": r.intensity,
                "requests": r.requests,
                "answered": len(r.first_ms),
                "errors": r.errors,
                "p50_ms": round(r.point["p50"], 2),
                "p99_ms": round(r.point["p99"], 2),
                "p999_ms": round(r.point["p999"], 2),
                "p999_ci_ms": [round(x, 2) for x in interval(r.boot["p999"])],
                "gap_ms": round(gap(r)[0], 2),
                "gap_ci_ms": [round(x, 2) for x in interval(gap(r)[1])],
                "gap_cut_vs_wait_all": None if cut is None else triple(cut, 2),
                "final_p999_ms": round(r.point["final_p999"], 2),
                "served_accuracy": round(r.point["accuracy"], 4),
                "accuracy_vs_wait_all_points": None if drop is None else triple(drop, 3),
                "approximate_fraction": round(r.point["approximate"], 4),
                "approximate_untouched_fraction": round(float(approx[~r.touched].mean()), 4)
                if (~r.touched).any()
                else None,
                "approximate_while_paused_fraction": round(float(r.while_paused[approx].mean()), 4)
                if approx.any()
                else None,
            }
        )
    return out


def triple(est: Estimate, digits: int) -> list[float]:
    return [round(est.value, digits), round(est.low, digits), round(est.high, digits)]


def row_markdown(line: dict[str, Any], row: Row, rows: list[Row]) -> dict[str, Any]:
    cut = line["gap_cut_vs_wait_all"]
    acc = line["accuracy_vs_wait_all_points"]
    return {
        "mode": row.mode,
        "q": "—" if row.patience_quantile is None else f"{row.patience_quantile:g}",
        "load": f"{row.load:.0%}",
        "stragglers": row.intensity,
        "requests": f"{row.requests:,}",
        "errors": row.errors,
        "answered (figures rest on)": f"{len(row.first_ms):,}",
        "p50 ms": f"{line['p50_ms']:.1f}",
        "p99 ms": f"{line['p99_ms']:.1f}",
        "p99.9 ms [95%]": stat(row, "p999").text(),
        "p99.9 − p50 ms [95%]": Estimate(line["gap_ms"], *line["gap_ci_ms"], 0).text(),
        "gap cut vs wait-all [95%]": "—" if cut is None else Estimate(*cut, 0).text(2, "×"),
        "final p99.9 ms": f"{line['final_p999_ms']:.1f}",
        "approximate %": f"{line['approximate_fraction'] * 100:.2f}",
        "approx. % untouched": "—"
        if line["approximate_untouched_fraction"] is None
        else f"{line['approximate_untouched_fraction'] * 100:.2f}",
        "approx. while paused %": "—"
        if line["approximate_while_paused_fraction"] is None
        else f"{line['approximate_while_paused_fraction'] * 100:.0f}",
        "served accuracy %": f"{line['served_accuracy'] * 100:.2f}",
        "vs wait-all (points) [95%]": "—" if acc is None else Estimate(*acc, 0).text(2),
    }


def verdicts(rows: list[Row], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Issues 13 and 17's must-reach checks, each with its measured value, interval and request count."""
    out: list[dict[str, Any]] = []

    def add(check: str, point: str, est: Estimate, target: str, ok: bool, digits: int = 2, suffix: str = "") -> None:
        out.append(
            {
                "check": check,
                "point": point,
                "measured [95%]": est.text(digits, suffix),
                "target": target,
                "requests it rests on": f"{est.requests:,}",
                "verdict": "pass" if ok else "**fail**",
            }
        )

    for load, intensity in sorted({(r.load, r.intensity) for r in rows}):
        coded, point = coded_row(rows, settings, load, intensity), f"{load:.0%}, {intensity}"
        here = [r for r in rows if (r.load, r.intensity) == (load, intensity)]
        failed = sum(r.errors for r in here)
        sent = sum(r.requests for r in here)
        add(
            "requests without an answer, every mode", point, Estimate(failed, failed, failed, sent), "0", failed == 0, 0
        )
        if coded is None:
            continue
        if intensity == "none":
            a = stat(coded, "approximate", 100)
            add("coded answers approximate without stragglers", point, a, "≤ 1%", a.value <= 1.0, 2, "%")
            continue
        wait, eager = find(rows, "wait-all", load, intensity), find(rows, "coded-eager", load, intensity)
        if wait is not None:
            d = (coded.boot["accuracy"] - wait.boot["accuracy"]) * 100
            drop = Estimate(
                (coded.point["accuracy"] - wait.point["accuracy"]) * 100, *interval(d), answered(coded, wait)
            )
            add("coded served accuracy − wait-all's (points)", point, drop, "≥ −0.1", drop.value >= -0.1, 3)
            cut = ratio(gap(wait), gap(coded), answered(wait, coded))
            ok = cut.value >= 3.5 and cut.low >= 2.5
            add("coded cut of p99.9 − p50 against wait-all", point, cut, "≥ 3.5×, lower end ≥ 2.5×", ok, 2, "×")
        if eager is not None:
            p999 = (coded.point["p999"], coded.boot["p999"])
            r = ratio(p999, (eager.point["p999"], eager.boot["p999"]), answered(coded, eager))
            add("coded p99.9 / coded-eager p99.9", point, r, "≤ 1.25×", r.value <= 1.25, 2, "×")
    for load, intensity in sorted({(r.load, r.intensity) for r in rows}):  # issue 17: refinement's first answer
        coded, point = coded_row(rows, settings, load, intensity), f"{load:.0%}, {intensity}"
        refine = find(rows, "coded+refine", load, intensity, settings["patience_quantile"])
        if coded is None or refine is None:
            continue
        for name, target, limit in (("p50", "≤ 1.0× (wide preset ≤ 0.7×)", 1.0), ("p999", "≤ 1.1×", 1.1)):
            top, bottom = (refine.point[name], refine.boot[name]), (coded.point[name], coded.boot[name])
            r = ratio(top, bottom, answered(refine, coded))
            label = "p99.9" if name == "p999" else name
            add(f"coded+refine / coded, first complete answer {label}", point, r, target, r.value <= limit, 2, "×")
    stragglers, calm = coded_row(rows, settings, 0.2, "medium"), coded_row(rows, settings, 0.2, "none")
    if stragglers is not None and calm is not None:
        top, bottom = (stragglers.point["p999"], stragglers.boot["p999"]), (calm.point["p999"], calm.boot["p999"])
        r = ratio(top, bottom, answered(stragglers, calm))
        add("coded p99.9 with stragglers / straggler-free", "20%, medium", r, "≤ 1.5× (moonshot 1.2×)", r.value <= 1.5)
    return out


def calm_approximate(rows: list[Row], r: Row) -> tuple[float, str]:
    """`r`'s approximate share without stragglers: from a straggler-free run of the same quantile and
    load when there is one, else among the requests of `r` that no pause touched (a lower bound: the
    patience it ran with was learnt under stragglers)."""
    calm = find(rows, r.mode, r.load, "none", r.patience_quantile)
    if calm is not None:
        return calm.point["approximate"] * 100, f"straggler-free run, {len(calm.first_ms):,} answers"
    untouched = ~r.touched
    if not untouched.any():
        return float("nan"), "no untouched request"
    share = float(r.approximate[untouched].mean()) * 100
    return share, f"untouched requests of this run, {int(untouched.sum()):,}"


def patience_choice(rows: list[Row], settings: dict[str, Any]) -> tuple[list[dict[str, Any]], float | None]:
    """At the Pareto point: each patience quantile's p99.9, accuracy against wait-all, and approximate
    share without stragglers; the choice is the lowest p99.9 among those with ≤ 1% approximate without
    stragglers and served accuracy within 0.1 point of wait-all."""
    if not settings.get("pareto"):
        return [], None
    load, intensity = settings["pareto"]
    wait = find(rows, "wait-all", load, intensity)
    table, eligible = [], []
    for r in sorted((r for r in rows if r.mode == "coded" and (r.load, r.intensity) == (load, intensity)),
                    key=lambda r: r.patience_quantile or 0):  # fmt: skip
        drop = (r.point["accuracy"] - wait.point["accuracy"]) * 100 if wait else float("nan")
        calm, source = calm_approximate(rows, r)
        ok = calm <= 1.0 and drop >= -0.1
        if ok:
            eligible.append(r)
        table.append(
            {
                "patience quantile": f"{r.patience_quantile:g}",
                "p99.9 ms [95%]": stat(r, "p999").text(),
                "served accuracy vs wait-all (points)": f"{drop:+.3f}",
                "approximate %": f"{r.point['approximate'] * 100:.2f}",
                "approximate % without stragglers": f"{calm:.2f} ({source})",
                "answered (figures rest on)": f"{len(r.first_ms):,}",
                "eligible": "yes" if ok else "no",
            }
        )
    chosen = min(eligible, key=lambda r: r.point["p999"]).patience_quantile if eligible else None
    for line in table:
        line["chosen"] = "**yes**" if chosen is not None and line["patience quantile"] == f"{chosen:g}" else ""
    return table, chosen


def write_all(raw: dict[str, Any], json_path: Path, out: Path) -> None:
    """tail.json (settings, per-trial rows, pooled rows with intervals, verdicts) and the page."""
    settings = raw["settings"]
    rows = pooled_rows(raw)
    lines = summary(rows, settings)
    checks = verdicts(rows, settings)
    choice_table, chosen = patience_choice(rows, settings)
    per_trial = [trial_row(run) for run in raw["runs"]]
    stem = json_path.stem
    json_path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "settings": settings,
        "raw": json_path.stem + "_raw.json.gz",
        "bootstrap": {"block_requests": BLOCK, "draws": B},
        "rows": per_trial,
        "pooled": lines,
        "verdicts": checks,
        "patience_choice": {"table": choice_table, "chosen_quantile": chosen},
    }
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    files = plots(rows, settings, out, stem)
    page = page_lines(rows, lines, checks, choice_table, chosen, settings, stem)
    (out / f"{stem}.md").write_text("\n".join([*page, *[f"![{p}]({p})" for p in files]]) + "\n")


def trial_row(run: dict[str, Any]) -> dict[str, Any]:
    r = run["requests"]
    ok = [i for i, o in enumerate(r["outcome"]) if o == "final"]
    first = np.asarray(r["first_ms"], float)[ok]
    s = statistics(
        first,
        np.asarray(r["latency_ms"], float)[ok],
        np.array([bool(r["correct"][i]) for i in ok], float),
        np.array([r["approximate"][i] for i in ok], float),
    )
    keys = ("mode", "patience_quantile", "policy", "load", "rate_per_s", "intensity", "trial", "seed", "split")
    return {
        **{key: run[key] for key in keys},
        "requests": len(r["outcome"]),
        "errors": len(r["outcome"]) - len(ok),
        "pauses": len(run["pauses"]),
        "p50_ms": round(s["p50"], 2),
        "p99_ms": round(s["p99"], 2),
        "p999_ms": round(s["p999"], 2),
        "final_p999_ms": round(s["final_p999"], 2),
        "served_accuracy": round(s["accuracy"], 4),
        "approximate_fraction": round(s["approximate"], 4),
        "decoded_fraction": round(float(np.mean([bool(m) for m in r["decoded_members"]])), 4),
    }


def page_lines(
    rows: list[Row],
    lines: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    choice_table: list[dict[str, Any]],
    chosen: float | None,
    settings: dict[str, Any],
    stem: str,
) -> list[str]:
    m = settings["machine"]
    flags = ", ".join(m.get("cpu_flags") or []) or "none of " + "/".join(FLAGS)
    per_point = settings["trials"] * settings["requests_per_trial"]
    text = [
        "# Tail latency under real stragglers",
        "",
        f"Regenerate: `{settings['command']}`; from the raw requests alone (nothing run): "
        f"`python -m bench.tail --from-raw {settings.get('out', 'docs/results')}/{stem}_raw.json.gz "
        f"--out {settings.get('out', 'docs/results')}`.",
        "",
        SPLITS_NOTE[settings["split"]],
        "",
        f"Machine: {m.get('cpu', 'unknown CPU')} ({flags}), {m['cpus']} CPUs, {m['platform']}, Python "
        f"{m['python']}; run {m['date']}, {settings['seconds']} s. {_kernels(settings.get('replicas'))}"
        "Capacity measured first: "
        f"{settings['capacity_req_per_s']} req/s (coded, closed loop, concurrency 32). k = {settings['k']} members; "
        "every mode runs the same k + 1 replica processes (wait-all's extra one idles; hedge's hosts every "
        f"member). Per point {settings['trials']} trial(s) × {settings['requests_per_trial']:,} open-loop Poisson "
        f"requests = {per_point:,} requests, warm-up discarded. Stragglers: SIGSTOP/SIGCONT of random replica "
        "processes, Pareto durations, one seeded schedule per (split, load, intensity, trial) shared by every "
        "mode; intensities (pauses/s per replica, Pareto scale ms, alpha, cap ms): "
        f"{settings['intensities']}. Gateway policy for `coded` and `coded+refine`: patient, patience = the "
        f"{settings['patience_quantile']:g} quantile of the member's recent latencies + "
        f"{settings['patience_margin_ms']:g} ms; `coded-eager`: decode as soon as k of k + 1 are in. "
        f"CPU hog: {settings['cpu_hog']}. Extra gateway environment: {settings.get('gateway_env') or 'none'} "
        "(capacity itself is measured with the overload guard relaxed, COINSERVE_OVERLOAD_LAG_MS=1000).",
        "",
        "Latencies are times to the first complete answer at the client (JSON: the response; SSE: the first "
        "event); `final` is the terminal event. `gap` = p99.9 − p50; `gap cut` = wait-all's gap / this row's "
        "(higher is better). `approx. % untouched`: approximate share among requests that no pause overlapped; "
        "`approx. while paused`: share of approximate answers whose decoded member was paused (or had resumed "
        f"< {settings['drain_s'] * 1000:.0f} ms before) while the request was in flight. Brackets: 95% block-"
        f"bootstrap intervals ({B} draws of blocks of {BLOCK} consecutive requests, the same draws for every "
        "row, so ratios within a point are paired). `requests` is what each row's figures rest on; a ratio "
        "rests on both rows'.",
        "",
        markdown_table(
            [row_markdown(line, row, rows) for line, row in zip(lines, rows, strict=True)],
            list(row_markdown(lines[0], rows[0], rows)) if rows else [],
        ),  # fmt: skip
        "",
        "## Against the targets (issues 13 and 17)",
        "",
        markdown_table(checks, ["check", "point", "measured [95%]", "target", "requests it rests on", "verdict"]),
        "",
    ]
    if choice_table:
        load, intensity = settings["pareto"]
        verb = "chosen on this validation run" if settings["split"] == "validation" else "as this test run shows it"
        text += [
            f"## Patience quantile, {verb}: {load:.0%} load, {intensity} stragglers",
            "",
            "Rule: the lowest p99.9 among the quantiles with ≤ 1% approximate answers without stragglers "
            "(same load) and served accuracy within 0.1 point of wait-all. "
            + (
                f"Chosen: **{chosen:g}**; the test run takes it as `--patience-quantile {chosen:g}`."
                if settings["split"] == "validation" and chosen is not None
                else f"Quantile used for `coded` in this run: {settings['patience_quantile']:g}; the choice "
                "is made on the validation run, not here."
                if settings["split"] == "test"
                else "No quantile met the rule."
            ),
            "",
            markdown_table(choice_table, list(choice_table[0])),
            "",
        ]
    return text


def plots(rows: list[Row], settings: dict[str, Any], out: Path, stem: str) -> list[str]:
    """Latency CCDFs per straggled point, p99.9 against load per intensity, and the Pareto plot."""
    import matplotlib

    matplotlib.use("Agg")
    files = []
    for load, intensity in sorted({(r.load, r.intensity) for r in rows if r.intensity != "none"}):
        files.append(ccdf_plot(rows, settings, load, intensity, out / f"{stem}_cdf_{intensity}_{load:g}.png"))
    for intensity in sorted({r.intensity for r in rows}):
        if len({r.load for r in rows if r.intensity == intensity}) > 1:
            files.append(load_plot(rows, settings, intensity, out / f"{stem}_p999_vs_load_{intensity}.png"))
    point = settings.get("pareto") or next(((r.load, r.intensity) for r in rows if r.intensity != "none"), None)
    if point is not None:
        files.append(pareto_plot(rows, settings, tuple(point), out / f"{stem}_pareto.png"))
    return files


def ccdf_plot(rows: list[Row], settings: dict[str, Any], load: float, intensity: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    default = settings["patience_quantile"]
    shown = [r for r in rows if r.load == load and r.intensity == intensity and r.patience_quantile in (None, default)]
    shown += [r for r in rows if r.load == load and r.intensity == "none" and r.patience_quantile in (None, default)]
    for r in shown:
        x = np.sort(r.first_ms)
        if len(x) == 0:
            continue
        label = r.name + (" (no stragglers)" if r.intensity == "none" else "")
        tail = 1 - np.arange(len(x)) / len(x)
        ax.plot(x, tail, label=f"{label}, n={len(x):,}", linestyle="--" if r.intensity == "none" else "-")
    title = f"Latency, load {load:.0%} of capacity, {intensity} stragglers ({settings['split']} split)"
    return save_ccdf(fig, ax, "time to first complete answer (ms, log scale)", title, path)


def save_ccdf(fig: Any, ax: Any, xlabel: str, title: str, path: Path) -> str:
    """A 1 − CDF plot's axes (log–log, the p99.9 line) and file."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1e-3, color="grey", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests slower (1 − CDF)")
    ax.set_title(title)
    return save(fig, ax, path)


def load_plot(rows: list[Row], settings: dict[str, Any], intensity: str, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r.name for r in rows if r.intensity == intensity}):
        line = sorted((r for r in rows if r.name == name and r.intensity == intensity), key=lambda r: r.load)
        lows, highs = zip(*(interval(r.boot["p999"]) for r in line), strict=True)
        y = np.array([r.point["p999"] for r in line])
        err = np.array([y - np.array(lows), np.array(highs) - y])
        ax.errorbar([r.load * 100 for r in line], y, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=name)
    ax.set_xlabel("offered load (% of measured capacity)")
    ax.set_ylabel("p99.9 time to first complete answer (ms)")
    ax.set_yscale("log")
    ax.set_title(f"p99.9 against load, {intensity} stragglers, 95% intervals ({settings['split']} split)")
    return save(fig, ax, path)


def pareto_plot(rows: list[Row], settings: dict[str, Any], point: tuple[Any, ...], path: Path) -> str:
    """Served accuracy against p99.9 at one point; accuracy as the paired difference to wait-all
    (the same images and schedule), whose interval is far tighter than that of either accuracy."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    wait = find(rows, "wait-all", point[0], point[1])
    for r in (r for r in rows if (r.load, r.intensity) == point):
        base, boot = (wait.point["accuracy"], wait.boot["accuracy"]) if wait else (0.0, 0.0)
        x, y = r.point["p999"], (r.point["accuracy"] - base) * 100
        xl, xh = interval(r.boot["p999"])
        yl, yh = interval((r.boot["accuracy"] - boot) * 100)
        ax.errorbar(
            [x], [y], xerr=[[max(0, x - xl)], [max(0, xh - x)]], yerr=[[max(0, y - yl)], [max(0, yh - y)]],
            marker="o", capsize=3, label=f"{r.name}, n={len(r.first_ms):,}",
        )  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("p99.9 time to first complete answer (ms, log scale)")
    ax.set_ylabel("served accuracy − wait-all's (points)" if wait else "served accuracy (points)")
    ax.set_title(f"Accuracy against p99.9, load {point[0]:.0%}, {point[1]} stragglers, 95% intervals")
    return save(fig, ax, path)


def save(fig: Any, ax: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _kernels(replicas: dict[str, Any] | None) -> str:
    """'Resolutions on [...] (int8 engine x86, chosen by measurement). ' from the replicas' metadata."""
    if not replicas:
        return ""
    kinds = sorted({str(r.get("kernels")) for r in replicas.values()})
    engines = sorted({(r.get("int8_engine") or {}).get("engine") or "none" for r in replicas.values()})
    return (
        f"Replicas' resolutions on {', '.join(kinds)} "
        f"(int8 engine {', '.join(engines)}, chosen at start-up by measurement). "
    )
