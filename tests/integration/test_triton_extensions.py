"""Triton's model configuration, statistics and repository extensions (issue 28) as Triton's own
clients from PyPI (`tritonclient.http`, `tritonclient.grpc`), unmodified, read them from the real
gateway: the group's config, statistics whose counts move by exactly the requests sent, the
repository index, and load/unload refused with a clear error."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from tests.integration.conftest import Public, images_of
from tests.integration.test_triton_http import OUTPUTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
STAGES = ["queue", "compute_input", "compute_infer", "compute_output"]
INDEX = [{"name": "fashion", "version": "1", "state": "READY"}]


@pytest.fixture(scope="module")
def http(public: Public) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{public.service.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def grpc(public: Public) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(url=f"127.0.0.1:{public.service.grpc_port}")
    yield c
    c.close()


def http_infer(client: httpclient.InferenceServerClient, n: int) -> None:
    tensor = httpclient.InferInput("input", [n, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(images_of(n))
    client.infer("fashion", [tensor])


def grpc_infer(client: grpcclient.InferenceServerClient, n: int) -> None:
    tensor = grpcclient.InferInput("input", [n, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(images_of(n))
    client.infer("fashion", [tensor])


def http_stats(client: httpclient.InferenceServerClient) -> dict:
    (stats,) = client.get_inference_statistics("fashion")["model_stats"]
    return stats


def grpc_stats(client: grpcclient.InferenceServerClient) -> dict:
    """The gRPC statistics as plain numbers (protobuf's JSON writes uint64 as strings)."""
    (stats,) = client.get_inference_statistics("fashion", as_json=True)["model_stats"]
    durations = {k: {f: int(v.get(f, 0)) for f in ("count", "ns")} for k, v in stats["inference_stats"].items()}
    counts = {k: int(stats.get(k, 0)) for k in ("last_inference", "inference_count", "execution_count")}
    return {**stats, **counts, "inference_stats": durations}


def moved(before: dict, after: dict) -> dict:
    """How far each count moved, and whether every duration of a moved count grew."""
    b, a = before["inference_stats"], after["inference_stats"]
    return {
        "success": a["success"]["count"] - b["success"]["count"],
        "fail": a["fail"]["count"] - b["fail"]["count"],
        "inference_count": after["inference_count"] - before["inference_count"],
        "execution_count": after["execution_count"] - before["execution_count"],
        **{stage: a[stage]["count"] - b[stage]["count"] for stage in STAGES},
    }


def test_http_model_config_describes_the_group(http):
    config = http.get_model_config("fashion")
    assert config["name"] == "fashion" and config["max_batch_size"] == 64
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("input", "TYPE_FP32", [1, 28, 28])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        (n, "TYPE_FP32", [10]) for n in OUTPUTS
    ]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert parameters["members"] == "member-0,member-1,member-2" and parameters["classes"] == "10"
    assert "workers/batcher.py" in parameters["dynamic_batching"]
    assert http.get_model_config("fashion", "1") == config
    with pytest.raises(InferenceServerException, match="no version '2'") as refused:
        http.get_model_config("fashion", "2")
    assert refused.value.status() == "404"


def test_grpc_model_config_is_the_http_one_in_tritons_messages(grpc, http):
    config = grpc.get_model_config("fashion", "1").config  # tritonclient's own ModelConfig class
    assert isinstance(config, model_config_pb2.ModelConfig)
    assert config.name == "fashion" and config.max_batch_size == 64 and config.version_policy.latest.num_versions == 1
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32 and list(config.input[0].dims) == [1, 28, 28]
    assert [o.name for o in config.output] == OUTPUTS and config.WhichOneof("scheduling_choice") == "dynamic_batching"
    expected = {k: v["string_value"] for k, v in http.get_model_config("fashion")["parameters"].items()}
    assert {k: v.string_value for k, v in config.parameters.items()} == expected
    with pytest.raises(InferenceServerException) as refused:
        grpc.get_model_config("nope")
    assert refused.value.status() == "StatusCode.NOT_FOUND"


def test_http_statistics_move_by_exactly_the_requests_sent(http):
    before = http_stats(http)
    for _ in range(3):
        http_infer(http, 2)
    wrong = httpclient.InferInput("input", [1, 5], "FP32")
    wrong.set_data_from_numpy(np.ones((1, 5), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):  # admitted, then refused: a failure
        http.infer("fashion", [wrong])
    after = http_stats(http)
    assert moved(before, after) == {
        "success": 3,
        "fail": 1,
        "inference_count": 6,
        "execution_count": 3,
        **dict.fromkeys(STAGES, 3),
    }
    spent = {k: after["inference_stats"][k]["ns"] - before["inference_stats"][k]["ns"] for k in ["success", *STAGES]}
    assert spent["success"] > 0 and spent["compute_infer"] > 0
    assert sum(spent[s] for s in STAGES) <= spent["success"]  # the stages partition each request's time
    assert after["last_inference"] >= before["last_inference"] and after["last_inference"] > 0


def test_grpc_statistics_move_by_exactly_the_requests_sent(grpc):
    before = grpc_stats(grpc)
    for n in (1, 4):
        grpc_infer(grpc, n)
    after = grpc_stats(grpc)
    assert moved(before, after) == {
        "success": 2,
        "fail": 0,
        "inference_count": 5,
        "execution_count": 2,
        **dict.fromkeys(STAGES, 2),
    }
    assert after["name"] == "fashion" and after["version"] == "1"


def test_statistics_of_every_model_and_of_unknown_ones(http, grpc, public):
    assert [s["name"] for s in http.get_inference_statistics()["model_stats"]] == ["fashion"]
    assert [s.name for s in grpc.get_inference_statistics().model_stats] == ["fashion"]
    assert http.get_inference_statistics("fashion", "1")["model_stats"][0]["version"] == "1"
    with pytest.raises(InferenceServerException, match="no model group 'nope'"):
        http.get_inference_statistics("nope")
    with pytest.raises(InferenceServerException) as refused:
        grpc.get_inference_statistics("fashion", "2")
    assert refused.value.status() == "StatusCode.NOT_FOUND"
    reply = httpx.get(f"{public.service.url}/v2/models/fashion/versions/2/stats", timeout=5)
    assert reply.status_code == 404 and reply.json() == {
        "error": "no version '2' of model group 'fashion'; its version is '1'"
    }


def test_repository_index_lists_the_group_ready(http, grpc, public):
    assert http.get_model_repository_index() == INDEX
    assert grpc.get_model_repository_index(as_json=True) == {"models": INDEX}
    url = f"{public.service.url}/v2/repository/index"
    assert httpx.post(url, json={"ready": True}, timeout=5).json() == INDEX
    refused = httpx.post(url, json={"ready": "yes"}, timeout=5)
    assert refused.status_code == 400 and "ready" in refused.json()["error"]


@pytest.mark.parametrize("action", ["load", "unload"])
def test_load_and_unload_are_refused_saying_why(http, grpc, action):
    with pytest.raises(InferenceServerException, match="loads its one model group") as over_http:
        getattr(http, f"{action}_model")("fashion")
    assert over_http.value.status() == "400" and f"cannot {action} model 'fashion'" in over_http.value.message()
    with pytest.raises(InferenceServerException, match="restart the gateway") as over_grpc:
        getattr(grpc, f"{action}_model")("other")
    assert over_grpc.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert grpc.get_model_repository_index(as_json=True) == {"models": INDEX}  # still served
