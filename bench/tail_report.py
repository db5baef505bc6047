"""The tail benchmark's page: docs/results/tail.md with the machine and settings on top, a pooled
summary per (mode, load, intensity), and two plots (latency CDFs; p99.9 against load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import percentiles
from models.evaluate import markdown_table

COLUMNS = (
    "mode", "load", "intensity", "requests", "errors", "p50_ms", "p99_ms", "p999_ms", "gap_ms",
    "gap_vs_wait_all", "final_p999_ms", "decoded_fraction", "served_accuracy",
)  # fmt: skip


def pooled(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every trial of a (mode, load, intensity) point together: percentiles over all its requests."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["load"], r["intensity"]), []).append(r)
    out = []
    for (mode, load, intensity), group in groups.items():
        first = [x for r in group for x in r["first_ms"]]
        final = [x for r in group for x in r["final_ms"]]
        p50, p99, p999 = percentiles(first)
        n = sum(r["requests"] for r in group)
        weights = [r["requests"] - r["errors"] for r in group]
        out.append(
            {
                "mode": mode,
                "load": load,
                "intensity": intensity,
                "requests": n,
                "errors": sum(r["errors"] for r in group),
                "p50_ms": round(p50, 2),
                "p99_ms": round(p99, 2),
                "p999_ms": round(p999, 2),
                "gap_ms": round(p999 - p50, 2),
                "final_p999_ms": round(percentiles(final)[2], 2),
                "decoded_fraction": round(
                    float(np.average([r["decoded_fraction"] for r in group], weights=weights)), 4
                ),
                "served_accuracy": round(float(np.average([r["served_accuracy"] for r in group], weights=weights)), 4),
                "first_ms": first,
            }
        )
    for r in out:
        base = next(
            (b for b in out if b["mode"] == "wait-all" and b["load"] == r["load"] and b["intensity"] == r["intensity"]),
            None,
        )
        r["gap_vs_wait_all"] = round(base["gap_ms"] / r["gap_ms"], 2) if base and r["gap_ms"] > 0 else ""
    return sorted(out, key=lambda r: (r["intensity"], r["load"], r["mode"]))


def _plots(summary: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for intensity in sorted({r["intensity"] for r in summary}):
        loads = sorted({r["load"] for r in summary if r["intensity"] == intensity})
        cdf_load = 0.4 if 0.4 in loads else loads[0]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in summary:
            if r["intensity"] == intensity and r["load"] == cdf_load and r["first_ms"]:
                x = np.sort(r["first_ms"])
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=r["mode"])
        ax.set_xscale("log")
        ax.set_xlabel("time to first complete answer (ms, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"Latency CDF, load {cdf_load:.0%} of capacity, {intensity} stragglers")
        files.append(_save(fig, ax, out / f"tail_cdf_{intensity}.png"))
        if len(loads) > 1:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for mode in sorted({r["mode"] for r in summary}):
                points = sorted(
                    (r["load"], r["p999_ms"]) for r in summary if r["mode"] == mode and r["intensity"] == intensity
                )
                ax.plot([p[0] * 100 for p in points], [p[1] for p in points], marker="o", label=mode)
            ax.set_xlabel("offered load (% of measured capacity)")
            ax.set_ylabel("p99.9 time to first complete answer (ms)")
            ax.set_yscale("log")
            ax.set_title(f"p99.9 against load, {intensity} stragglers")
            files.append(_save(fig, ax, out / f"tail_p999_vs_load_{intensity}.png"))
    return files


def _save(fig: Any, ax: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


VERDICT_COLUMNS = (
    "load", "intensity", "coded_gap_reduction", "meets_3.5x", "coded_p999_ms", "hedge_p999_ms", "beats_hedge",
    "accuracy_drop_points", "within_1_point",
)  # fmt: skip


def verdicts(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per point: coded's gap reduction against wait-all, p99.9 against hedge, accuracy against wait-all."""
    out = []
    for point in sorted({(r["load"], r["intensity"]) for r in summary}):
        by_mode = {r["mode"]: r for r in summary if (r["load"], r["intensity"]) == point}
        coded, wait, hedge = by_mode.get("coded"), by_mode.get("wait-all"), by_mode.get("hedge")
        if not (coded and wait and hedge):
            continue
        reduction = wait["gap_ms"] / coded["gap_ms"] if coded["gap_ms"] > 0 else float("inf")
        drop = (wait["served_accuracy"] - coded["served_accuracy"]) * 100
        out.append(
            {
                "load": point[0],
                "intensity": point[1],
                "coded_gap_reduction": round(reduction, 2),
                "meets_3.5x": "yes" if reduction >= 3.5 else "no",
                "coded_p999_ms": coded["p999_ms"],
                "hedge_p999_ms": hedge["p999_ms"],
                "beats_hedge": "yes" if coded["p999_ms"] < hedge["p999_ms"] else "no",
                "accuracy_drop_points": round(drop, 2),
                "within_1_point": "yes" if round(drop, 2) <= 1.0 else "no",  # 1.0000000000000009 is 1 point
            }
        )
    return out


def write_report(rows: list[dict[str, Any]], settings: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = pooled(rows)
    plots = _plots(summary, out)
    m = settings["machine"]
    lines = [
        "# Tail latency under real stragglers",
        "",
        "Regenerate: `coinserve bench tail` (or `make bench`); quick smoke test: `coinserve bench tail --quick`.",
        "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, run {m['date']} "
        f"({settings['seconds']} s). Capacity measured first: {settings['capacity_req_per_s']} req/s "
        "(coded, closed loop, concurrency 32). k = "
        f"{settings['k']} members; every mode runs k + 1 replica processes. {settings['trials']} trial(s) of "
        f"{settings['requests_per_trial']} open-loop Poisson requests per point, warm-up discarded. "
        "Stragglers: SIGSTOP/SIGCONT of random replica processes, Pareto durations, one seeded schedule "
        f"per (load, intensity, trial) shared by every mode; intensities (pauses/s per replica, Pareto scale ms, "
        f"alpha, cap ms): {settings['intensities']}. CPU hog: {settings['cpu_hog']}.",
        "",
        "Latencies are times to the first complete answer at the client (JSON: the response; SSE: the "
        "coarse event); `final_` is the final event. `gap` = p99.9 − p50; `gap_vs_wait_all` = wait-all's gap "
        "divided by this mode's (higher is better). Percentiles pool every trial of a point.",
        "",
        markdown_table(summary, COLUMNS),
        "",
    ]
    lines += ["## Against the targets", "", markdown_table(verdicts(summary), VERDICT_COLUMNS), ""]
    lines += [f"![{p}]({p})" for p in plots]
    (out / "tail.md").write_text("\n".join(lines) + "\n")
