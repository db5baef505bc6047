"""The seed paper's streaming simulation, with real worker processes: layered vs one-shot under a deadline.

Setting (after the authors' Matlab scripts, at a smaller scale): Poisson job arrivals; every job is
one coded matrix-vector product A·x; P = 5 heterogeneous worker processes each hold a coded row
block and really compute their share of each layer (integers, models/layered.py), then hold the
result for an exponential time whose mean is the layer's work divided by their speed (speeds drawn
once, seeded). A layer finishes when any K workers have answered; the master decodes it exactly
and checks it against A·x. Jobs run first come, first served; a job's remaining layers are
abandoned once its deadline (counted from arrival) passes. Unlike the authors' code, we enforce
the deadline even when no other job is waiting, which is the stricter reading.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.layered import decode_layer, digits, encode_rows, generator, layer_terms, worker_layer


@dataclass(frozen=True)
class SimConfig:
    workers: int = 5  # N
    needed: int = 3  # K: any K finish a layer
    m: int = 2  # digits per number: L = 2m - 1 layers
    b: int = 4  # bits per digit
    size: int = 120  # A is size × size
    jobs: int = 100
    arrival_rate: float = 0.1  # jobs per slot (Poisson)
    slot_ms: float = 4.0
    seed: int = 900  # the authors' rng(900)


def _worker(
    index: int,
    coded_digits: list[np.ndarray],
    cfg: SimConfig,
    mean_slots_per_product: float,
    tasks: Any,
    results: Any,
    current: Any,
) -> None:
    rng = np.random.default_rng(cfg.seed + 17 * index)
    coded = sum((1 << ((cfg.m - 1 - i) * cfg.b)) * c for i, c in enumerate(coded_digits))
    terms = layer_terms(cfg.m)
    while True:
        task = tasks.get()
        if task is None:
            return
        token, ell, x, layered = task
        if layered:
            out, products = worker_layer(coded_digits, digits(x, cfg.m, cfg.b), ell, cfg.m, cfg.b), len(terms[ell])
        else:
            out, products = coded @ x, cfg.m**2
        hold = rng.exponential(mean_slots_per_product * products) * cfg.slot_ms / 1000
        end = time.perf_counter() + hold
        while time.perf_counter() < end:  # a straggler, abandoned as soon as K others have answered
            if current.value != token:
                break
            time.sleep(min(0.001, max(0.0, end - time.perf_counter())))
        else:
            results.put((token, index, out))


@dataclass
class SimResult:
    deadline_slots: float
    layered: bool
    layer_success: list[float]  # fraction of jobs whose layer ℓ finished before the deadline
    exact_layers: int
    checked_layers: int


def simulate(
    cfg: SimConfig, deadlines: list[float], layered_modes: tuple[bool, ...] = (True, False)
) -> list[SimResult]:
    rng = np.random.default_rng(cfg.seed)
    limit = (1 << (cfg.m * cfg.b)) - 1
    a = rng.integers(-limit, limit + 1, size=(cfg.size, cfg.size))
    xs = rng.integers(-limit, limit + 1, size=(cfg.jobs, cfg.size))
    speeds = rng.uniform(0.2, 1.0, size=cfg.workers)  # μ_p ∝ U(0, 1), kept away from 0
    mean_slots = 0.25 / speeds  # per product (a quarter of the job at m = 2)
    g = generator(cfg.workers, cfg.needed)
    ctx = mp.get_context("fork")
    current = ctx.Value("q", -1, lock=False)
    tasks = [ctx.Queue() for _ in range(cfg.workers)]
    results: Any = ctx.Queue()
    # Coding is linear, so each significance digit of A is encoded on its own: worker n holds
    # [Σ_k G[n, k] A_i^(k) for each digit i], and its layer products stay exact small integers.
    per_digit = [encode_rows(d, g) for d in digits(a, cfg.m, cfg.b)]  # [digit][worker]
    procs = [
        ctx.Process(
            target=_worker,
            args=(n, [per_digit[i][n] for i in range(cfg.m)], cfg, mean_slots[n], tasks[n], results, current),
            daemon=True,
        )
        for n in range(cfg.workers)
    ]
    for p in procs:
        p.start()
    try:
        return [
            _run(cfg, a, xs, g, deadline, layered, tasks, results, current, np.random.default_rng(cfg.seed + 1))
            for deadline in deadlines
            for layered in layered_modes
        ]
    finally:
        for q in tasks:
            q.put(None)
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


def _run(
    cfg: SimConfig,
    a: np.ndarray,
    xs: np.ndarray,
    g: np.ndarray,
    deadline: float,
    layered: bool,
    tasks: list[Any],
    results: Any,
    current: Any,
    rng: np.random.Generator,
) -> SimResult:
    slot = cfg.slot_ms / 1000
    arrivals = np.cumsum(rng.exponential(1 / cfg.arrival_rate, size=cfg.jobs)) * slot
    n_layers = 2 * cfg.m - 1 if layered else 1
    done = np.zeros((cfg.jobs, n_layers), dtype=bool)
    exact = checked = 0
    start = time.perf_counter()
    token = 0
    for job in range(cfg.jobs):
        due = start + arrivals[job]
        while time.perf_counter() < due:
            time.sleep(max(0.0, min(0.001, due - time.perf_counter())))
        cutoff = due + deadline * slot
        x = xs[job]
        running = np.zeros(cfg.size, dtype=np.int64)
        for ell in range(n_layers):
            token += 1
            current.value = token
            for q in tasks:
                q.put((token, ell, x, layered))
            got: dict[int, np.ndarray] = {}
            while len(got) < cfg.needed and time.perf_counter() < cutoff:
                try:
                    tok, n, out = results.get(timeout=max(1e-4, min(0.005, cutoff - time.perf_counter())))
                except queue.Empty:
                    continue
                if tok == token:
                    got[n] = out
            if len(got) < cfg.needed:
                break  # deadline: this and every later layer of the job fail
            running = running + decode_layer(g, got)
            done[job, ell] = True
            checked += 1
            exact += int(np.array_equal(running, _reference(a, x, ell, cfg, layered)))
        current.value = -1
    return SimResult(deadline, layered, done.mean(axis=0).round(4).tolist(), exact, checked)


def _reference(a: np.ndarray, x: np.ndarray, ell: int, cfg: SimConfig, layered: bool) -> np.ndarray:
    if not layered:
        return a @ x
    a_d, x_d = digits(a, cfg.m, cfg.b), digits(x, cfg.m, cfg.b)
    terms = [t for layer in layer_terms(cfg.m)[: ell + 1] for t in layer]
    return sum((1 << ((2 * cfg.m - 2 - i - j) * cfg.b)) * (a_d[i] @ x_d[j]) for i, j in terms)
