"""Many gateways, one stream (issue 19): two gateways over the same workers and a real Redis.

    python -m bench.redis_streams --json docs/results/redis_streams.json     (about 2 minutes)
    python -m bench.redis_streams --quick                                    (small runs of each)
    python -m bench.redis_streams --only resume|kill|overhead ...

- `resume` (1,000 requests): each detached request is POSTed to a random gateway, followed on a
  random one, cut off after a random number of its events (0 .. past its end) and resumed with
  Last-Event-ID on the *other*, then read once more from the start. Counted: events lost (an id
  missing from what the client put together), duplicated (an id twice), streams ending with
  exactly one terminal event, resumes equal to the log's tail byte for byte, 204 on a reconnect
  after the end.
- `kill`: open-loop Poisson detached requests to gateway A (50/s, client-chosen ids, each slowed by
  a worker fault so that many run at once) until A is SIGKILLed; every id is followed on B to its
  end: exactly one terminal event each, and those A was running end with `gateway lost` within
  lease + 1 s of the kill.
- `overhead`: gateway A with the Redis store, B with the in-memory one, same workers, rounds
  interleaved: p50 time to the first event one request at a time (POST then follow), and detached
  requests completed per second at concurrency 16.

Raw rows go into the JSON next to each summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson

from app import launcher
from bench.loadgen import json_body, percentiles
from bench.redis_server import RedisServer, redis_server
from models.data import load_split
from models.machine import machine


async def read_events(
    session: aiohttp.ClientSession, url: str, after: int = 0, stop_after: int | None = None
) -> tuple[int, list[tuple[int, str, bytes]]]:
    """(status, [(id, event, data)]) from `after`; hangs up after `stop_after` events if given."""
    headers = {"Last-Event-ID": str(after)} if after else {}
    events: list[tuple[int, str, bytes]] = []
    async with session.get(url, headers=headers) as response:
        if response.status != 200:
            await response.read()
            return response.status, events
        fields: dict[str, bytes] = {}
        async for raw in response.content:
            line = raw.rstrip(b"\r\n")
            if not line:
                if b"event" in fields:
                    events.append((int(fields[b"id"]), fields[b"event"].decode(), fields[b"data"]))  # type: ignore[index]
                    if events[-1][1] in ("final", "error") or (stop_after is not None and len(events) >= stop_after):
                        break
                fields = {}
            elif not line.startswith(b":"):
                key, _, value = line.partition(b":")
                fields[key] = value.lstrip(b" ")  # type: ignore[index]
    return 200, events


async def one(session: aiohttp.ClientSession, gateways: list[str], body: bytes, rng: random.Random) -> dict[str, Any]:
    started = time.perf_counter()
    posted_on = rng.randrange(2)
    async with session.post(
        f"{gateways[posted_on]}/v1/requests", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        created = await response.json()
        if response.status != 202:
            return {"status": response.status, "error": created.get("error")}
    path = created["events_url"]
    first_on = rng.randrange(2)
    cut = rng.randrange(0, 6)  # events before hanging up (0: none read; past the terminal event: all of them)
    _, head = await read_events(session, gateways[first_on] + path, stop_after=cut) if cut else (200, [])
    after = head[-1][0] if head else 0
    status, tail = await read_events(session, gateways[1 - first_on] + path, after=after)
    _, full = await read_events(session, gateways[rng.randrange(2)] + path)
    got = head + tail
    ids = [e[0] for e in got]
    last = full[-1][0] if full else 0
    ended = bool(head) and head[-1][1] in ("final", "error")
    return {
        "posted_on": posted_on,
        "first_on": first_on,
        "cut_after": len(head),
        "resume_status": status,  # 204 when the first reader already had the terminal event
        "ids": ids,
        "lost": len(set(range(1, last + 1)) - set(ids)),
        "duplicates": len(ids) - len(set(ids)),
        "terminals": sum(1 for e in got if e[1] in ("final", "error")),
        "terminal_last": bool(got) and got[-1][1] in ("final", "error"),
        "resume_matches": got == full,
        "resume_ok": status == (204 if ended else 200),
        "ms": round((time.perf_counter() - started) * 1000, 3),
    }


async def drive(gateways: list[str], bodies: list[bytes], concurrency: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = [{} for _ in bodies]
    order = iter(range(len(bodies)))
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4 * concurrency), timeout=timeout) as s:

        async def client() -> None:
            for i in order:
                rows[i] = await one(s, gateways, bodies[i], random.Random(rng.random()))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return rows


@contextmanager
def cluster_with_redis(
    bundle: Path, lease_s: float, worker_env: dict[str, str] | None = None, second_store: str | None = None
) -> Iterator[tuple[launcher.Cluster, RedisServer, launcher.Child, launcher.Child]]:
    """Redis, the workers, gateway A and gateway B over the same workers, every one ready. With
    `second_store` ('memory'), B keeps its logs in its own memory instead (the overhead comparison)."""
    with redis_server() as redis:
        env = {"COINSERVE_STREAM_STORE": redis.url, "COINSERVE_STREAM_LEASE_S": str(lease_s), **(worker_env or {})}
        cluster = launcher.start(bundle, launcher.free_port(), env=env)
        try:
            a = next(c for c in cluster.children if c.name == "gateway")
            extra = {"COINSERVE_STREAM_STORE": second_store} if second_store else None
            b = launcher.add_gateway(cluster, launcher.free_port(), env=extra)
            launcher.wait_ready(cluster, timeout_s=180)
            yield cluster, redis, a, b
        finally:
            cluster.stop()


def resume_scenario(bundle: Path, requests: int, concurrency: int, lease_s: float, seed: int = 0) -> dict[str, Any]:
    """Must reach 1: posted, followed and resumed across the two gateways."""
    images = load_split("test").images[:requests]
    # coarse answers asked for (issue 31): streams of several events to cut and resume, whatever the
    # workers measure their coarse resolutions to cost on this machine
    bodies = [json_body(images[i : i + 1], {"coarse": True}) for i in range(requests)]
    with cluster_with_redis(bundle, lease_s) as (_, _, a, b):
        started = time.perf_counter()
        rows = asyncio.run(drive([a.url, b.url], bodies, concurrency, seed))
        seconds = time.perf_counter() - started
    done = [r for r in rows if "ids" in r]
    summary = {
        "requests": requests,
        "accepted": len(done),
        "refused": requests - len(done),
        "lost_events": sum(r["lost"] for r in done),
        "duplicate_events": sum(r["duplicates"] for r in done),
        "streams_with_one_terminal_last": sum(1 for r in done if r["terminals"] == 1 and r["terminal_last"]),
        "resumes_matching_the_log": sum(1 for r in done if r["resume_matches"]),
        "resumes_with_the_right_status": sum(1 for r in done if r["resume_ok"]),
        "resumed_after_the_terminal": sum(1 for r in done if r["resume_status"] == 204),
        "cut_after_counts": {
            str(k): sum(1 for r in done if r["cut_after"] == k) for k in sorted({r["cut_after"] for r in done})
        },
        "events_per_stream_p50_max": [float(np.median([len(r["ids"]) for r in done])), max(len(r["ids"]) for r in done)]
        if done
        else None,
        "seconds": round(seconds, 2),
        "request_ms_p50_p99": [round(v, 1) for v in percentiles([r["ms"] for r in done], (50, 99))] if done else None,
    }
    return {"settings": {"requests": requests, "concurrency": concurrency}, "summary": summary, "rows": rows}


async def _kill_run(
    a: launcher.Child, b: launcher.Child, bodies: list[bytes], rate: float, kill_at_s: float, seed: int
) -> tuple[float, list[dict[str, Any]]]:
    """Open-loop Poisson POSTs to A (client-chosen ids) until A is SIGKILLed at `kill_at_s`; every
    id is followed on B to its end. Returns (kill time, rows)."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    followers: list[asyncio.Task[None]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    killed = 0.0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def follow_on_b(row: dict[str, Any]) -> None:
            url = f"{b.url}/v1/requests/{row['id']}/events"
            for _ in range(200):  # until the log exists on B (or, after A's death, surely never will)
                status, events = await read_events(session, url)
                if status != 404 or (killed and time.perf_counter() > killed + 5):
                    break
                await asyncio.sleep(0.05)
            row["b_status"] = status
            row["events"] = [(seq, name) for seq, name, _ in events]
            row["terminal_at"] = time.perf_counter() if events else None
            row["terminal_data"] = events[-1][2].decode() if events else None

        async def post(row: dict[str, Any], body: bytes) -> None:
            try:
                async with session.post(
                    f"{a.url}/v1/requests", data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    row["a_status"] = response.status
                    await response.read()
            except (aiohttp.ClientError, OSError) as exc:
                row["a_status"] = f"exception:{type(exc).__name__}"
            await follow_on_b(row)

        t0 = time.perf_counter()
        i = 0
        while (now := time.perf_counter() - t0) < kill_at_s:
            body = orjson.loads(bodies[i % len(bodies)])
            row = {"id": f"kill-{seed}-{i}", "sent_s": round(now, 4)}
            body["id"] = row["id"]
            rows.append(row)
            followers.append(asyncio.create_task(post(row, orjson.dumps(body))))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        os.kill(a.process.pid, signal.SIGKILL)
        killed = time.perf_counter()
        await asyncio.gather(*followers)
    return killed, rows


def kill_scenario(
    bundle: Path, rate: float, kill_at_s: float, lease_s: float, step_delay_ms: float, seed: int = 0
) -> dict[str, Any]:
    """Must reach 2: gateway A SIGKILLed under `rate` detached requests/s; each of its requests, each
    slowed to about `step_delay_ms` per refinement step so that many are running at the kill, must end
    on B with exactly one terminal event within lease + 1 s of the kill."""
    images = load_split("test").images[:200]
    bodies = [json_body(images[i : i + 1]) for i in range(len(images))]
    slow = {"COINSERVE_WORKER_FAULT_STEP_DELAY_MS": str(step_delay_ms)}
    with cluster_with_redis(bundle, lease_s, worker_env=slow) as (_, _, a, b):
        killed, rows = asyncio.run(_kill_run(a, b, bodies, rate, kill_at_s, seed))
    accepted = [r for r in rows if r.get("a_status") == 202 or r.get("b_status") in (200, 204)]
    one_terminal = [
        r
        for r in accepted
        if sum(1 for _, n in r["events"] if n in ("final", "error")) == 1 and r["events"][-1][1] in ("final", "error")
    ]
    lost = [
        r
        for r in accepted
        if r["events"] and r["events"][-1][1] == "error" and "gateway lost" in (r["terminal_data"] or "")
    ]
    after_kill = [(r["terminal_at"] - killed) for r in lost]
    return {
        "settings": {"rate_per_s": rate, "kill_at_s": kill_at_s, "lease_s": lease_s, "step_delay_ms": step_delay_ms},
        "summary": {
            "posted": len(rows),
            "accepted": len(accepted),
            "accepted_202_but_unknown_on_b": sum(
                1 for r in rows if r.get("a_status") == 202 and r.get("b_status") == 404
            ),
            "with_exactly_one_terminal_last": len(one_terminal),
            "ended_final": sum(1 for r in accepted if r["events"] and r["events"][-1][1] == "final"),
            "ended_gateway_lost": len(lost),
            "gateway_lost_s_after_kill_max": round(max(after_kill), 3) if after_kill else None,
            "gateway_lost_s_after_kill_p50": round(float(np.median(after_kill)), 3) if after_kill else None,
            "within_lease_plus_1s": sum(1 for t in after_kill if t <= lease_s + 1.0),
        },
        "rows": rows,
    }


async def _detached_loop(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> list[tuple[float, float]]:
    """Closed loop of POST + follow on one gateway: [(ms to the first event, ms to the terminal)]."""
    out: list[tuple[float, float]] = []
    end = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2 * concurrency), timeout=timeout) as s:

        async def client(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                started = time.perf_counter()
                async with s.post(
                    f"{url}/v1/requests", data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}
                ) as r:
                    created = await r.json()
                    if r.status != 202:
                        raise RuntimeError(f"POST {r.status}: {created}")
                first = None
                async with s.get(url + created["events_url"]) as r:
                    async for line in r.content:
                        if first is None and line.startswith(b"event: "):
                            first = (time.perf_counter() - started) * 1000
                        if line.startswith((b"event: final", b"event: error")):
                            break
                out.append((first or float("nan"), (time.perf_counter() - started) * 1000))
                i += concurrency

        await asyncio.gather(*(client(k) for k in range(concurrency)))
    return out


def overhead_scenario(bundle: Path, rounds: int, seconds: float, lease_s: float) -> dict[str, Any]:
    """Must reach 3: the Redis store against the in-memory one in the same run (gateway A: Redis,
    gateway B: memory, over the same workers), rounds interleaved: p50 time to the first event one
    request at a time, and detached requests completed per second at concurrency 16."""
    images = load_split("test").images[:500]
    bodies = [json_body(images[i : i + 1]) for i in range(len(images))]
    latency: dict[str, list[float]] = {"redis": [], "memory": []}
    throughput: dict[str, list[float]] = {"redis": [], "memory": []}
    with cluster_with_redis(bundle, lease_s, second_store="memory") as (_, _, a, b):
        urls = {"redis": a.url, "memory": b.url}
        for arm in urls:  # warm-up
            asyncio.run(_detached_loop(urls[arm], bodies, 4, 1.0))
        for r in range(rounds):
            for arm in ("redis", "memory") if r % 2 == 0 else ("memory", "redis"):
                latency[arm] += [first for first, _ in asyncio.run(_detached_loop(urls[arm], bodies, 1, seconds))]
                done = asyncio.run(_detached_loop(urls[arm], bodies, 16, seconds))
                throughput[arm].append(len(done) / seconds)
    p50 = {arm: float(np.median(v)) for arm, v in latency.items()}
    rate = {arm: float(np.median(v)) for arm, v in throughput.items()}
    return {
        "settings": {"rounds": rounds, "seconds": seconds},
        "summary": {
            "first_event_p50_ms": {k: round(v, 3) for k, v in p50.items()},
            "first_event_p50_added_ms": round(p50["redis"] - p50["memory"], 3),
            "first_event_samples": {k: len(v) for k, v in latency.items()},
            "throughput_per_s_median": {k: round(v, 1) for k, v in rate.items()},
            "throughput_per_round": {k: [round(x, 1) for x in v] for k, v in throughput.items()},
            "throughput_ratio": round(rate["redis"] / rate["memory"], 3),
        },
        "raw_first_event_ms": {k: [round(x, 3) for x in v] for k, v in latency.items()},
    }


def measure(bundle: Path, requests: int, concurrency: int, lease_s: float, seed: int = 0) -> dict[str, Any]:
    """The resume scenario alone (the suite's smoke test)."""
    report = resume_scenario(bundle, requests, concurrency, lease_s, seed)
    return {"machine": machine(), **report}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path(os.environ.get("COINSERVE_BUNDLE", "bundles/default")))
    parser.add_argument("--only", choices=("resume", "kill", "overhead"), action="append", default=None)
    parser.add_argument("--requests", type=int, default=1000, help="resume: detached requests")
    parser.add_argument("--concurrency", type=int, default=16, help="resume: clients at once")
    parser.add_argument("--lease-s", type=float, default=3.0, help="COINSERVE_STREAM_LEASE_S (the default)")
    parser.add_argument("--rate", type=float, default=50.0, help="kill: detached requests per second")
    parser.add_argument("--kill-at-s", type=float, default=10.0, help="kill: SIGKILL gateway A after this long")
    parser.add_argument("--step-delay-ms", type=float, default=1000.0, help="kill: each request's refinement step")
    parser.add_argument("--rounds", type=int, default=4, help="overhead: interleaved rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="overhead: per arm and round")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="small runs of everything: a smoke test")
    args = parser.parse_args(argv)
    only = args.only or ["resume", "kill", "overhead"]
    report: dict[str, Any] = {
        "machine": machine(),
        "bundle": str(args.bundle),
        "command": " ".join(["python -m bench.redis_streams", *(argv or sys.argv[1:])]),
    }
    if "resume" in only:
        report["resume"] = resume_scenario(
            args.bundle, 40 if args.quick else args.requests, args.concurrency, args.lease_s
        )
        print("resume", json.dumps(report["resume"]["summary"]))
    if "kill" in only:
        report["kill"] = kill_scenario(
            args.bundle, args.rate, 2.0 if args.quick else args.kill_at_s, args.lease_s, args.step_delay_ms
        )
        print("kill", json.dumps(report["kill"]["summary"]))
    if "overhead" in only:
        report["overhead"] = overhead_scenario(
            args.bundle, 2 if args.quick else args.rounds, 1.0 if args.quick else args.seconds, args.lease_s
        )
        print("overhead", json.dumps(report["overhead"]["summary"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
