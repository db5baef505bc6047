"""KServe's own client library against a running gateway; run by tests/integration/test_kserve_clients.py
inside kserve's venv (bench/peers/venvs.py), never imported by pytest: kserve's generated gRPC code
registers the same protobuf names as Triton's client, which the test process already holds.

    python kserve_client.py REST_URL GRPC_ADDRESS IMAGES.npy

Prints one JSON object: per call, what the library made of the answer (or the error it raised).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig
from kserve.protocol.infer_type import RequestedOutput, to_http_parameters


def request(images: np.ndarray, binary: bool, model_name: str = "fashion", request_id: str = "") -> InferRequest:
    tensor = InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images, binary_data=binary)
    outputs = [RequestedOutput("ensemble", {"binary_data": binary}), RequestedOutput("member-0")]
    return InferRequest(model_name, [tensor], request_id=request_id or None, request_outputs=outputs)


def summary(response: InferResponse) -> dict[str, Any]:
    parameters = response.parameters or {}
    out = {
        "id": response.id,
        "model_name": response.model_name,
        "outputs": {o.name: o.as_numpy().tolist() for o in response.outputs},
        "parameters": to_http_parameters(parameters),  # the library's own reading of them
    }
    if not isinstance(parameters, dict):  # gRPC: which field of KServe's InferParameter each one filled
        out["fields"] = {name: p.WhichOneof("parameter_choice") for name, p in parameters.items()}
    return out


async def rest(url: str, images: np.ndarray, binary: bool, **kwargs: Any) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    try:
        return summary(await client.infer(url, request(images, binary, **kwargs), model_name="fashion"))
    except httpx.HTTPStatusError as exc:
        return {"status": exc.response.status_code, "error": exc.response.json().get("error")}
    finally:
        await client.close()


async def grpc_call(address: str, images: np.ndarray, binary: bool = True, **kwargs: Any) -> dict[str, Any]:
    """binary: the tensor as `raw_input_contents`; else as typed `contents.fp32_contents`."""
    import grpc

    async with InferenceGRPCClient(address) as client:
        try:
            return summary(await client.infer(request(images, binary=binary, **kwargs)))
        except grpc.RpcError as exc:
            return {"code": exc.code().name, "error": exc.details()}


async def main(url: str, address: str, images: np.ndarray) -> dict[str, Any]:
    return {
        "rest_json": await rest(url, images, binary=False, request_id="kserve-json"),
        "rest_binary": await rest(url, images, binary=True, request_id="kserve-binary"),
        "rest_fresh_id": await rest(url, images, binary=False),
        "rest_other_model": await rest(url, images, binary=False, model_name="digits"),
        "rest_out_of_range": await rest(url, images * 255, binary=True),
        "grpc": await grpc_call(address, images, request_id="kserve-grpc"),
        "grpc_typed": await grpc_call(address, images, binary=False, request_id="kserve-grpc-typed"),
        "grpc_out_of_range": await grpc_call(address, -images),
    }


if __name__ == "__main__":
    rest_url, grpc_address, path = sys.argv[1:4]
    print(json.dumps(asyncio.run(main(rest_url, grpc_address, np.load(path)))))
