"""The serving path with real processes on loopback: gateway, k = 3 member workers, one COIN worker."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from tests.integration.conftest import call_worker, images_of, parse_sse, request_body, running, with_plan

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
SSE = {"Accept": "text/event-stream"}


def _infer(url: str, body: dict, headers: dict | None = None, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/fashion/infer", json=body, headers=headers, timeout=timeout)


def test_json_answer_has_one_output_per_member_and_the_ensemble(service):
    response = _infer(service.url, request_body(2))
    assert response.status_code == 200
    data = response.json()
    assert [o["name"] for o in data["outputs"]] == ["member-0", "member-1", "member-2", "ensemble"]
    assert all(o["shape"] == [2, 10] and o["datatype"] == "FP32" for o in data["outputs"])
    params = data["parameters"]
    assert set(params) == {
        "seq",
        "resolution",
        "planes",
        "exact_members",
        "decoded_members",
        "approximate",
        "elapsed_ms",
    }
    assert params["resolution"] == 1 and params["planes"] is None  # the float32 resolution
    assert params["approximate"] == (params["decoded_members"] != [])
    assert sorted(params["exact_members"] + params["decoded_members"]) == ["member-0", "member-1", "member-2"]
    assert response.headers["x-request-id"]


def test_sse_stream_goes_coarse_then_refined_then_one_final_with_increasing_ids(service):
    response = _infer(service.url, request_body(1), SSE)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    events = parse_sse(response.text)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "coarse" and kinds[-1] == "final" and kinds.count("final") == 1
    assert set(kinds[1:-1]) <= {"refined"}
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert [e["data"]["parameters"]["seq"] for e in events] == [e["id"] for e in events]
    assert events[0]["data"]["parameters"]["resolution"] == 0 and events[0]["data"]["parameters"]["approximate"]


def test_request_id_is_echoed(service):
    response = _infer(service.url, request_body(1), {"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_paused_member_is_decoded_and_the_final_comes_within_the_deadline(service):
    """1. SIGSTOP member-1 (a real straggler).
    2. Send a JSON request with deadline_ms = 1500.
    Result: the final answers long before the deadline, member-1 decoded from the coded replica,
    marked approximate; the other members are exact."""
    service.signal("member-1", signal.SIGSTOP)
    try:
        start = time.perf_counter()
        response = _infer(service.url, request_body(1, {"deadline_ms": 1500}))
        elapsed_ms = (time.perf_counter() - start) * 1000
    finally:
        service.signal("member-1", signal.SIGCONT)
    params = response.json()["parameters"]
    assert response.status_code == 200
    assert params["decoded_members"] == ["member-1"] and params["approximate"] is True
    assert params["exact_members"] == ["member-0", "member-2"]
    assert elapsed_ms < 1500 + 100


def test_paused_member_and_coded_replica_end_at_the_deadline(service):
    """1. SIGSTOP member-1 and the coded replica: nothing can decode member-1.
    2. Send an SSE request with deadline_ms = 600.
    Result: a coarse and refined events for nobody (member-1 never has an answer), then exactly one
    `error` at the deadline (plus a small slack), naming member-1."""
    service.signal("member-1", signal.SIGSTOP)
    service.signal("coded-coin-0", signal.SIGSTOP)
    try:
        start = time.perf_counter()
        response = _infer(service.url, request_body(1, {"deadline_ms": 600}), SSE)
        elapsed_ms = (time.perf_counter() - start) * 1000
    finally:
        service.signal("member-1", signal.SIGCONT)
        service.signal("coded-coin-0", signal.SIGCONT)
    events = parse_sse(response.text)
    assert [e["event"] for e in events] == ["error"]
    assert "deadline_ms 600 passed before ['member-1'] had an answer" in events[0]["data"]["error"]
    assert 600 <= elapsed_ms < 600 + 150


def test_late_member_replaces_its_decoded_answer_with_a_refined_event(coded_bundle):
    """1. member-1 answers 300 ms late; member-0 and member-2 take 800 ms per resolution after the
       first (a slow model), the coded replica 1500 ms.
    2. Stream one request.
    Result: the coarse event decodes member-1; a later `refined` event carries member-1's real
    answer (no longer decoded); the final is exact."""
    slow = {"COINSERVE_WORKER_FAULT_STEP_DELAY_MS": "800"}
    slower = {"COINSERVE_WORKER_FAULT_STEP_DELAY_MS": "1500"}
    late = {"COINSERVE_WORKER_FAULT_DELAY": "const:300"}
    env = {"member-1": late, "member-0": slow, "member-2": slow, "coded-coin-0": slower}
    with running(coded_bundle, worker_env=env) as service:
        events = parse_sse(_infer(service.url, request_body(1), SSE).text)
    decoded = [e["data"]["parameters"].get("decoded_members", []) for e in events]
    assert events[0]["event"] == "coarse" and decoded[0] == ["member-1"]
    replaced = [e for e, d in zip(events, decoded, strict=True) if e["event"] == "refined" and d == []]
    assert replaced, [e["event"] for e in events]
    assert events[-1]["event"] == "final" and events[-1]["data"]["parameters"]["approximate"] is False


def test_resuming_with_last_event_id_replays_nothing_twice_and_loses_nothing(service):
    """1. POST /v1/requests; read the event stream until the first event, then hang up.
    2. Reconnect with Last-Event-ID set to that event's id.
    Result: the two reads together hold every id from 1 to the final exactly once."""
    created = httpx.post(f"{service.url}/v1/requests", json=request_body(1), timeout=10)
    assert created.status_code == 202
    url = service.url + created.json()["events_url"]
    first: list[dict] = []
    with httpx.stream("GET", url, timeout=10) as response:
        buffer = ""
        for chunk in response.iter_text():
            buffer += chunk
            first = parse_sse(buffer)
            if first:
                break
    rest = parse_sse(httpx.get(url, headers={"Last-Event-ID": str(first[0]["id"])}, timeout=10).text)
    ids = [e["id"] for e in first[:1] + rest]
    assert ids == list(range(1, len(ids) + 1))
    assert rest[-1]["event"] == "final"
    again = parse_sse(httpx.get(url, timeout=10).text)  # a fresh subscriber gets the whole retained stream
    assert [e["id"] for e in again] == ids


def test_client_disconnect_cancels_the_replica_work(coded_bundle, tmp_path):
    """1. Serve a 9-resolution plan; member-0 computes each resolution after the first 300 ms late.
    2. Stream a request and hang up right after the coarse event.
    Result: member-0's work counter stops rising: at most one more resolution is computed, where
    the full request would have computed eight more."""
    bundle = with_plan(coded_bundle, [1, 2, 3, 4, 5, 6, 7, 8], tmp_path)
    env = {"member-0": {"COINSERVE_WORKER_FAULT_STEP_DELAY_MS": "300"}}
    with running(bundle, worker_env=env) as service:
        before = service.worker_metric("member-0", "coinserve_worker_rows_computed_total")
        with httpx.stream(
            "POST", f"{service.url}/v2/models/fashion/infer", json=request_body(1), headers=SSE, timeout=10
        ) as r:
            for chunk in r.iter_text():
                if "event: coarse" in chunk:
                    break
        time.sleep(3.0)  # long enough for eight more resolutions had nobody cancelled
        after = service.worker_metric("member-0", "coinserve_worker_rows_computed_total")
        cancelled = service.worker_metric("member-0", 'coinserve_worker_requests_total{outcome="cancelled"}')
    assert after - before <= 2
    assert cancelled >= 1


def test_stop_margin_ends_the_request_early(service):
    data = _infer(service.url, request_body(1, {"stop_margin": 0.001}), SSE)
    events = parse_sse(data.text)
    assert events[-1]["event"] == "final"
    assert events[-1]["data"]["parameters"]["resolution"] == 0  # confident already at 4 planes


def test_the_served_coarse_answer_is_the_integer_reference(service, coded_bundle):
    """The replica's coarse resolution runs on int8 kernels and equals, bit for bit, the plain numpy
    integer reference of that resolution (models/int8.py); the final one is float32."""
    from models.bitplanes import RefinementPlan
    from models.bundle import open_bundle
    from models.int8 import IntResolution

    bundle = open_bundle(coded_bundle)
    plan = RefinementPlan.from_dict(bundle.manifest["refinement"])
    assert plan.grid is not None  # coinserve train chose an integer plan on validation
    worker = service.child("member-0")
    meta = httpx.get(f"{worker.url}/v2/models/member-0", timeout=5).json()["parameters"]
    assert meta["kernels"][0].startswith("int8/") and meta["kernels"][-1] == "float32"
    assert meta["int8_engine"]["engine"] in meta["int8_engine"]["measured_ms"]
    images = images_of(5, seed=11)
    answers = call_worker(worker, images, final_only=False).answers
    assert [a.resolution for a in answers] == [0, 1]
    served = answers[0].probs.astype(np.float32)
    resolution = IntResolution(bundle.build_model("member-0"), plan.planes[0], plan.grid, "x86")
    expected = torch.softmax(torch.from_numpy(resolution.reference_logits(images)), dim=1).numpy()
    assert np.array_equal(served, expected)


def test_stop_margin_stops_the_replicas_too(service):
    """The gateway passes stop_margin down: a replica confident at its coarse resolution ends its stream
    there ("stopped") and never computes the float32 one (issue 17: saved work is real)."""
    names = [c.name for c in service.cluster.children if c.name != "gateway"]
    final_rows = 'coinserve_worker_rows_computed_total{resolution="1"}'
    before = {n: service.worker_metric(n, final_rows) for n in names}
    events = parse_sse(_infer(service.url, request_body(1, {"stop_margin": 0.001}), SSE).text)
    assert events[-1]["event"] == "final" and events[-1]["data"]["parameters"]["resolution"] == 0
    time.sleep(0.3)  # a float32 step, had one started, has finished by now
    assert {n: service.worker_metric(n, final_rows) for n in names} == before
    answers = call_worker(service.child("member-0"), images_of(1), final_only=False, stop_margin=0.001).answers
    assert [a.stopped for a in answers] == [True]
    assert service.worker_metric("member-0", 'coinserve_worker_requests_total{outcome="stopped"}') >= 2


def test_members_subset_answers_only_those_members(service):
    data = _infer(service.url, request_body(1, {"members": ["member-2", "member-0"]})).json()
    assert [o["name"] for o in data["outputs"]] == ["member-0", "member-2", "ensemble"]
    assert data["parameters"]["decoded_members"] == []


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": []}, 400, "exactly one tensor"),
        (request_body(1, {"bogus": 1}), 400, "unknown parameters: ['bogus']"),
        (request_body(1, {"deadline_ms": "soon"}), 400, "parameters.deadline_ms must be a finite number"),
        (request_body(1, {"deadline_ms": -5}), 400, "parameters.deadline_ms must be in"),
        (request_body(1, {"min_resolution": 7}), 400, "parameters.min_resolution must be an integer in 0..1"),
        (request_body(1, {"stop_margin": 2}), 400, "parameters.stop_margin must be in (0, 1]"),
        (request_body(1, {"members": ["member-9"]}), 400, "parameters.members: unknown"),
        (
            {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
            400,
            "inputs[0].shape must be",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "INT8", "data": [0] * 784}]},
            400,
            "datatype must be 'FP32'",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "FP32", "data": [0] * 783}]},
            400,
            "holds 783 values",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(service, body, status, message):
    response = _infer(service.url, body)
    assert response.status_code == status
    assert message in response.json()["error"]


def test_non_json_body_and_unknown_group_are_refused(service):
    bad = httpx.post(f"{service.url}/v2/models/fashion/infer", content=b"{nope", timeout=10)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    unknown = httpx.post(f"{service.url}/v2/models/other/infer", json=request_body(1), timeout=10)
    assert unknown.status_code == 404 and unknown.json() == {
        "error": "no model group 'other'; this gateway serves 'fashion'"
    }


def test_health_and_metadata(service):
    assert httpx.get(f"{service.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{service.url}/v2/health/ready").json() == {"ready": True, "down": []}
    meta = httpx.get(f"{service.url}/v2/models/fashion").json()
    assert meta["parameters"]["members"] == ["member-0", "member-1", "member-2"]
    assert meta["parameters"]["coded_replicas"] == [{"name": "coded-coin-0", "row": 0}]
    assert httpx.get(f"{service.url}/v2/models").json()["models"][0]["name"] == "fashion"
    metrics = httpx.get(f"{service.url}/metrics").text
    for name in (
        "coinserve_requests_total",
        "coinserve_time_to_final_seconds",
        "coinserve_replica_request_duration_seconds",
    ):
        assert name in metrics


def test_concurrent_requests_all_end_with_one_final(service):
    results: list[int] = []

    def call(seed: int) -> None:
        events = parse_sse(_infer(service.url, request_body(1, seed=seed), SSE).text)
        results.append(sum(e["event"] in ("final", "error") for e in events))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [1] * 16


def test_without_stragglers_answers_are_exact(service):
    """Issue 13: no straggler anywhere, 60 plain JSON calls from 4 clients at once. Under the default
    `patient` policy a member is decoded only once it is late, so (almost) every final is exact; the
    `eager` rule this replaced decoded one member in about 70% of such calls."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [request_body(1, seed=i) for i in range(60)]
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda b: client.post(f"{service.url}/v2/models/fashion/infer", json=b), bodies))
    assert all(r.status_code == 200 for r in responses)
    approximate = [
        r.json()["parameters"]["decoded_members"] for r in responses if r.json()["parameters"]["approximate"]
    ]
    assert len(approximate) <= 2, approximate  # a member may really be late now and then on a busy machine


def test_answers_agree_with_the_members_run_offline(service, coded_bundle):
    import torch

    from models.bundle import open_bundle
    from models.data import load_split

    bundle = open_bundle(coded_bundle)
    images = torch.from_numpy(load_split("test").images[:4])
    data = _infer(service.url, request_body(4)).json()
    exact = set(data["parameters"]["exact_members"])
    for output in data["outputs"]:
        if output["name"] in exact:
            offline = torch.softmax(bundle.build_model(output["name"])(images), 1).detach().numpy().ravel()
            assert max(abs(a - b) for a, b in zip(output["data"], offline, strict=True)) < 1e-6


def test_the_coded_replica_computes_nothing_while_every_member_answers_in_time(service):
    """Redundancy that costs nothing when it is not needed (issue 27):
    1. SIGSTOP the coded replica, so that any call it is sent waits in its socket;
    2. send 20 JSON requests: every member answers in time (none is decoded);
    3. SIGCONT.
    Result: the coded replica computes none of the 20: its calls are held by the gateway until a
    member would be late and never sent, or (one in 50, sent at once to keep its latency measured)
    cancelled, and the worker drops a cancelled call before its step starts."""
    coded = "coded-coin-0"
    rows = "coinserve_worker_rows_computed_total"
    before = service.worker_metric(coded, rows), _coded_calls(service)
    service.signal(coded, signal.SIGSTOP)
    try:
        with httpx.Client(timeout=30) as client:
            url = f"{service.url}/v2/models/fashion/infer"
            answers = [client.post(url, json=request_body(1, seed=i)) for i in range(20)]
    finally:
        service.signal(coded, signal.SIGCONT)
    assert all(a.status_code == 200 and a.json()["parameters"]["decoded_members"] == [] for a in answers)
    time.sleep(1.0)  # whatever it was sent has been read and dropped (or computed) by now
    calls = {k: d for k, v in _coded_calls(service).items() if (d := v - before[1].get(k, 0))}
    assert service.worker_metric(coded, rows) == before[0]
    assert set(calls) <= {"cancelled"} and calls.get("cancelled", 0) <= 1, calls


def _coded_calls(service) -> dict[str, float]:
    """The coded replica's calls by outcome so far."""
    text = httpx.get(f"{service.child('coded-coin-0').url}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        if line.startswith("coinserve_worker_requests_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def test_a_json_client_that_hangs_up_cancels_its_request(coded_bundle):
    """1. Every replica holds its replies 3 s (fault delay); a plain JSON request without a deadline.
    2. The client gives up after 0.5 s.
    Result: the gateway notices within its watch delay and ends the request (client_gone), instead
    of keeping it, and its replica calls, for the 3 s."""
    env = {"COINSERVE_WORKER_FAULT_DELAY": "const:3000"}
    with running(coded_bundle, env=env) as service:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{service.url}/v2/models/fashion/infer", json=request_body(1), timeout=0.5)
        gone = 'coinserve_requests_total{endpoint="infer",outcome="client_gone"}'
        deadline = time.monotonic() + 1.5
        while _gateway_metric(service, gone) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gateway_metric(service, gone) == 1
        assert time.monotonic() < deadline  # well before the replicas' 3 s


def _gateway_metric(service, sample: str) -> float:
    for line in httpx.get(f"{service.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
