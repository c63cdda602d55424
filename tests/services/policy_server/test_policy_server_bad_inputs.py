"""Client mistakes against the real server: every one is a 4xx (REST) / INVALID_ARGUMENT or NOT_FOUND (gRPC) whose
message names the problem; none changes a session, none is a 5xx, and the server serves normally afterwards."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import orjson
import pytest
from conftest import frames, states, token_for
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from services.protocol import DEFAULT_MODEL_NAME, StepRequest

ASYNC, SYNC = "bad-async", "bad-sync"  # sessions the cases run against; no case may change them
N = 8  # steps per chunk of the tiny model


@dataclass
class Ctx:
    f0: np.ndarray
    s0: np.ndarray
    f: np.ndarray
    a: np.ndarray
    s: np.ndarray


@pytest.fixture(scope="module")
def ctx(policy_server):
    ctx = Ctx(frames(1, 1), states(1, 1), frames(N, 2), np.zeros((N, 4), np.float32), states(N, 2))
    policy_server.step(StepRequest(ASYNC, reset=True, images=ctx.f0, state=ctx.s0))
    policy_server.step(StepRequest(ASYNC))  # chunk 1; the session now waits for chunk 0's frames
    policy_server.step(StepRequest(SYNC, reset=True, mode="sync", images=ctx.f0, state=ctx.s0))
    return ctx


def req(params: dict, tensors: dict | None = None, binary: bool = True) -> InferRequest:
    """A V2 request with exactly these parameters and tensors ({name: (datatype, array)}), unchecked."""
    if token_for(params.get("session_id")) and "session_token" not in params:  # the session's own client
        params = {**params, "session_token": token_for(params["session_id"])}
    inputs = []
    for name, (datatype, array) in (tensors or {}).items():
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return InferRequest(DEFAULT_MODEL_NAME, inputs, request_id="bad", parameters=params)


def reset_params(**extra) -> dict:
    return {"session_id": "bad-reset", "reset": True, **extra}


def reset(c: Ctx, params: dict | None = None, **tensors) -> InferRequest:
    t = {"images": ("UINT8", c.f0), "state": ("FP32", c.s0)}
    t.update(tensors)
    return req(reset_params() if params is None else params, {k: v for k, v in t.items() if v is not None})


def step(c: Ctx, params: dict | None = None, **tensors) -> InferRequest:
    t = {"images": ("UINT8", c.f), "actions": ("FP32", c.a), "state": ("FP32", c.s)}
    t.update(tensors)
    return req({"session_id": ASYNC} if params is None else params, {k: v for k, v in t.items() if v is not None})


def short_bytes(c: Ctx) -> InferRequest:
    r = step(c)
    r.inputs[0]._shape = [N + 1, 2, 32, 32, 3]  # the header claims one frame more than the bytes hold
    return r


def _nan(a: np.ndarray, value: float = np.nan) -> np.ndarray:
    a = a.copy()
    a[-1, 0] = value
    return a


def _json_images_overflow(c: Ctx) -> InferRequest:
    r = reset(c)
    r.inputs[0] = InferInput("images", [1, 2, 32, 32, 3], "UINT8", data=[300] * (2 * 32 * 32 * 3))
    return r


INFER = f"/v2/models/{DEFAULT_MODEL_NAME}/infer"
BIG = np.zeros((12, 2, 128, 128, 3), np.uint8)  # 1.2 MB: over the server's 1 MB limit, under gRPC's 2x cap

REST_CASES = [
    # parameters
    pytest.param(lambda c: step(c, {}), "missing parameter session_id", id="no-session-id"),
    pytest.param(lambda c: step(c, {"session_id": ""}), "bad session_id", id="empty-session-id"),
    pytest.param(lambda c: step(c, {"session_id": "a/b"}), "bad session_id", id="session-id-slash"),
    pytest.param(lambda c: step(c, {"session_id": "a b"}), "bad session_id", id="session-id-space"),
    pytest.param(lambda c: step(c, {"session_id": "x" * 129}), "bad session_id", id="session-id-too-long"),
    pytest.param(lambda c: step(c, {"session_id": 42}), "bad session_id", id="session-id-int"),
    pytest.param(lambda c: reset(c, reset_params(reset="yes")), "reset must be a bool", id="reset-string"),
    pytest.param(lambda c: reset(c, reset_params(reset=1)), "reset must be a bool", id="reset-int"),
    pytest.param(lambda c: reset(c, reset_params(mode="turbo")), "mode must be one of", id="mode-unknown"),
    pytest.param(lambda c: reset(c, reset_params(instruction="open-door-v3")), "unknown instruction",
                 id="instruction-unknown"),
    pytest.param(lambda c: reset(c, reset_params(instruction="")), "instruction must be a non-empty string",
                 id="instruction-empty"),
    pytest.param(lambda c: req({"session_id": ASYNC, "instruction": "open-door-v3"}), "instruction is fixed at reset",
                 id="instruction-changed"),
    pytest.param(lambda c: reset(c, reset_params(cameras="gripperPOV,corner4")), "unknown camera order",
                 id="cameras-reordered"),
    pytest.param(lambda c: reset(c, reset_params(cameras="front,wrist")), "unknown camera order",
                 id="cameras-unknown"),
    pytest.param(lambda c: reset(c, reset_params(cameras=",,")), "cameras must be comma-separated",
                 id="cameras-malformed"),
    pytest.param(lambda c: step(c, {"session_id": ASYNC, "seq": -1}), "seq must be a non-negative integer",
                 id="seq-negative"),
    pytest.param(lambda c: step(c, {"session_id": ASYNC, "seq": "2"}), "seq must be a non-negative integer",
                 id="seq-string"),
    pytest.param(lambda c: step(c, {"session_id": ASYNC, "seq": 5}), "out of order", id="seq-out-of-order"),
    pytest.param(lambda c: reset(c, reset_params(seq=3)), "out of order", id="seq-at-reset"),
    pytest.param(lambda c: reset(c, reset_params(model_version="")), "model_version must be a non-empty string",
                 id="model-version-empty"),
    pytest.param(lambda c: reset(c, reset_params(model_version="lingbot-va-x/99")), "model version not served",
                 id="reset-pinned-to-another-version"),
    pytest.param(lambda c: req({"session_id": ASYNC, "model_version": "lingbot-va-x/99"}), "model version not served",
                 id="step-pinned-to-another-version"),
    pytest.param(lambda c: req({"session_id": "ghost"}), "unknown session ghost: send reset=true",
                 id="unknown-session"),
    # tensors at reset
    pytest.param(lambda c: reset(c, images=None), "a reset request needs images", id="reset-no-images"),
    pytest.param(lambda c: reset(c, state=None), "a reset request needs images", id="reset-no-state"),
    pytest.param(lambda c: reset(c, actions=("FP32", np.zeros((1, 4), np.float32))), "carries no actions",
                 id="reset-with-actions"),
    pytest.param(lambda c: reset(c, images=("UINT8", frames(2, 3)), state=("FP32", states(2, 3))),
                 "exactly 1 frame", id="reset-two-frames"),
    pytest.param(lambda c: reset(c, images=("UINT8", frames(1, 3, views=3))), "frames of shape",
                 id="reset-three-views"),
    pytest.param(lambda c: reset(c, images=("UINT8", frames(1, 3, size=64))), "frames of shape",
                 id="reset-64px"),
    pytest.param(lambda c: reset(c, images=("UINT8", np.zeros((1, 2, 32, 32, 4), np.uint8))), "frames of shape",
                 id="reset-rgba"),
    pytest.param(lambda c: reset(c, state=("FP32", np.zeros((1, 5), np.float32))), "state has 5 columns",
                 id="reset-state-width"),
    # datatypes, ranks, values
    pytest.param(lambda c: step(c, images=("FP32", c.f.astype(np.float32))), "'images' must be uint8",
                 id="images-fp32"),
    pytest.param(lambda c: step(c, images=("FP16", c.f.astype(np.float16))), "'images' must be uint8",
                 id="images-fp16"),
    pytest.param(lambda c: step(c, images=("BOOL", c.f > 0)), "'images' must be uint8", id="images-bool"),
    pytest.param(lambda c: step(c, images=("UINT8", c.f[:, 0])), "must have 5 positive dimensions",
                 id="images-rank-4"),
    pytest.param(lambda c: step(c, state=("FP64", c.s.astype(np.float64))), "'state' must be fp32",
                 id="state-fp64"),
    pytest.param(lambda c: step(c, actions=("INT32", c.a.astype(np.int32))), "'actions' must be fp32",
                 id="actions-int32"),
    pytest.param(lambda c: step(c, state=("FP32", _nan(c.s))), "contains nan or inf", id="state-nan"),
    pytest.param(lambda c: step(c, state=("FP32", _nan(c.s, np.inf))), "contains nan or inf", id="state-inf"),
    pytest.param(lambda c: step(c, actions=("FP32", _nan(c.a))), "contains nan or inf", id="actions-nan"),
    pytest.param(lambda c: step(c, actions=("FP32", _nan(c.a, -np.inf))), "contains nan or inf",
                 id="actions-minus-inf"),
    pytest.param(lambda c: step(c, actions=("FP32", c.a[:, :3])), "actions has 3 columns", id="actions-width"),
    pytest.param(lambda c: step(c, state=("FP32", c.s[:, :2])), "state has 2 columns", id="state-width"),
    pytest.param(lambda c: step(c, depth=("FP32", c.s)), "unknown input 'depth'", id="unknown-input"),
    pytest.param(lambda c: req({"session_id": ASYNC}, {"images": ("UINT8", c.f), "images2": ("UINT8", c.f)}),
                 "unknown input 'images2'", id="extra-input"),
    # what a request must hold together
    pytest.param(lambda c: step(c, state=None), "need ['state'] too", id="actions-without-state"),
    pytest.param(lambda c: step(c, actions=None, state=None), "need ['actions', 'state'] too", id="images-only"),
    pytest.param(lambda c: step(c, images=None), "need ['images'] too", id="no-images"),
    pytest.param(lambda c: step(c, actions=("FP32", c.a[:7])), "disagree on n", id="n-mismatch"),
    pytest.param(lambda c: step(c, images=("UINT8", c.f[:4]), actions=("FP32", c.a[:4]), state=("FP32", c.s[:4])),
                 "wrong n", id="n-4-of-8"),
    pytest.param(lambda c: step(c, images=("UINT8", np.concatenate([c.f, c.f])), actions=("FP32", np.tile(c.a, (2, 1))),
                                state=("FP32", np.tile(c.s, (2, 1)))), "wrong n", id="n-16-of-8"),
    pytest.param(lambda c: step(c, images=("UINT8", frames(N, 4, size=16))), "frames of shape",
                 id="frames-resized-mid-session"),
    pytest.param(lambda c: req({"session_id": SYNC}), "sync session needs", id="no-tensors-in-sync"),
    pytest.param(lambda c: req({"session_id": ASYNC}), "valid only in async mode right after the reset",
                 id="no-tensors-twice-in-async"),
    pytest.param(lambda c: req({"session_id": ASYNC}, {"state": ("FP32", np.zeros((1, 0), np.float32))}, binary=False),
                 "must have 2 positive dimensions", id="empty-dimension"),
    # JSON (non-binary) tensors
    pytest.param(lambda c: _with_data(step(c), "state", [0.1, 0.2, 0.3]), "3 values for shape",
                 id="json-wrong-count"),
    pytest.param(lambda c: _with_data(step(c), "state", ["a"] * (N * 4)), "holds values that are not fp32",
                 id="json-strings"),
    pytest.param(_json_images_overflow, "holds values that are not uint8", id="json-uint8-overflow"),
    # malformed bodies
    pytest.param(short_bytes, "do not fill shape", id="binary-shorter-than-shape"),
]


def _with_data(r: InferRequest, name: str, data: list) -> InferRequest:
    """``r`` with input ``name`` sent as JSON ``data`` (whatever it holds) instead of binary."""
    i = next(i for i, t in enumerate(r.inputs) if t.name == name)
    t = r.inputs[i]
    r.inputs[i] = InferInput(name, t.shape, t.datatype, data=data)
    return r


RAW_CASES = [
    pytest.param(b"\x00garbage", {"inference-header-content-length": "8", "content-type": "application/octet-stream"},
                 400, "unrecognized request format", id="binary-garbage"),
    pytest.param(b'{"inputs": []}', {"inference-header-content-length": "abc",
                                     "content-type": "application/octet-stream"}, 400, "malformed", id="header-not-int"),
    pytest.param(orjson.dumps({"id": "1", "inputs": [{"name": "state", "shape": [1, 4], "datatype": "FP32",
                                                       "parameters": {"binary_data_size": 16}}],
                               "parameters": {"session_id": ASYNC}}),
                 {"inference-header-content-length": "9999", "content-type": "application/octet-stream"}, 400,
                 "", id="header-length-past-body"),
    pytest.param(orjson.dumps({"id": "1", "inputs": [{"name": "state", "shape": [1, 4], "datatype": "FP32",
                                                       "parameters": {"binary_data_size": 16}}],
                               "parameters": {"session_id": ASYNC}}) + b"\0" * 8, None, 400,
                 "runs past the end of the body", id="binary-past-body-end"),
    pytest.param(b'{"inputs": [{"name": "state", "shape": [1, 4], "datatype": "FP32"}]}', None, 400,
                 "neither 'data' nor 'binary_data_size'", id="binary-no-data"),
    pytest.param(b"{}", {"content-type": "application/json"}, 400, "inputs", id="json-no-inputs"),
    pytest.param(b'{"inputs": [], "parameters": [1, 2]}', {"content-type": "application/json"}, 400, "parameters",
                 id="json-parameters-not-object"),
    pytest.param(b"not json", {"content-type": "application/json"}, 400, "", id="json-garbage"),
    pytest.param(b'{"inputs": []}', {"content-type": "application/json"}, 400, "missing parameter session_id",
                 id="json-no-parameters"),
]


async def _rest(server, request: InferRequest) -> tuple[int, str]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        await client.infer(server.rest_url, request, model_name=DEFAULT_MODEL_NAME)
    except httpx.HTTPStatusError as err:
        return err.response.status_code, err.response.text
    finally:
        await client.close()
    return 200, "accepted"


@pytest.mark.parametrize(("build", "message"), REST_CASES)
def test_rest_client_mistakes_are_4xx(policy_server, ctx, build, message):
    status, text = asyncio.run(_rest(policy_server, build(ctx)))
    assert 400 <= status < 500, (status, text)
    assert message.lower() in text.lower(), text


@pytest.mark.parametrize(("body", "headers", "status", "message"), RAW_CASES)
def test_malformed_rest_bodies_are_4xx(policy_server, ctx, body, headers, status, message):
    if headers is None:  # binary extension: the JSON header is the whole body's JSON part
        json_length = body.rindex(b"}") + 1
        headers = {"inference-header-content-length": str(json_length), "content-type": "application/octet-stream"}
    r = httpx.post(policy_server.rest_url + INFER, content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert message.lower() in r.text.lower(), r.text


def test_rest_request_too_large_is_413(policy_server, ctx):
    status, text = asyncio.run(_rest(policy_server, step(ctx, images=("UINT8", BIG))))
    assert status == 413 and "too large" in text


@pytest.mark.parametrize(("path", "status", "message"), [
    pytest.param(f"/v1/models/{DEFAULT_MODEL_NAME}:predict", 400, "open inference protocol v2", id="v1-endpoint"),
    pytest.param("/v2/models/other-model/infer", 404, "other-model", id="unknown-model"),
])
def test_wrong_endpoints_are_4xx(policy_server, ctx, path, status, message):
    r = httpx.post(policy_server.rest_url + path, json={"instances": [], "inputs": []}, timeout=30)
    assert r.status_code == status and message in r.text.lower(), r.text


async def _grpc(server, request) -> tuple[grpc.StatusCode, str]:
    client = InferenceGRPCClient(server.grpc_url, timeout=60, retries=0)
    try:
        if isinstance(request, InferRequest):
            await client.infer(request)
        else:  # a hand-made protobuf message, sent as is
            await GRPCInferenceServiceStub(client._channel).ModelInfer(request, timeout=60)
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    finally:
        await client.close()
    return grpc.StatusCode.OK, "accepted"


def _raw_mismatch(c: Ctx) -> pb.ModelInferRequest:
    message = step(c).to_grpc()
    del message.raw_input_contents[-1]  # three inputs, two raw contents
    return message


def _wrong_model(c: Ctx) -> InferRequest:
    r = step(c)
    r.model_name = "other-model"
    return r


GRPC_CASES = [
    pytest.param(lambda c: step(c, {}), grpc.StatusCode.INVALID_ARGUMENT, "missing parameter session_id",
                 id="no-session-id"),
    pytest.param(lambda c: step(c, images=("FP32", c.f.astype(np.float32))), grpc.StatusCode.INVALID_ARGUMENT,
                 "must be UINT8", id="images-fp32"),
    pytest.param(lambda c: req({"session_id": "ghost"}), grpc.StatusCode.INVALID_ARGUMENT,
                 "unknown session ghost: send reset=true", id="unknown-session"),
    pytest.param(lambda c: step(c, state=("FP32", _nan(c.s))), grpc.StatusCode.INVALID_ARGUMENT, "NaN or inf",
                 id="state-nan"),
    pytest.param(short_bytes, grpc.StatusCode.INVALID_ARGUMENT, "do not fill shape", id="raw-shorter-than-shape"),
    pytest.param(_raw_mismatch, grpc.StatusCode.INVALID_ARGUMENT, "raw input contents", id="raw-count-mismatch"),
    pytest.param(lambda c: step(c, images=("UINT8", BIG)), grpc.StatusCode.INVALID_ARGUMENT, "request too large",
                 id="too-large"),
    pytest.param(lambda c: reset(c, reset_params(cameras="front,wrist")), grpc.StatusCode.INVALID_ARGUMENT,
                 "unknown camera order", id="cameras-unknown"),
    pytest.param(lambda c: step(c, {"session_id": ASYNC, "seq": 9}), grpc.StatusCode.INVALID_ARGUMENT,
                 "out of order", id="seq-out-of-order"),
    pytest.param(_wrong_model, grpc.StatusCode.NOT_FOUND, "other-model", id="unknown-model"),
]


@pytest.mark.parametrize(("build", "code", "message"), GRPC_CASES)
def test_grpc_client_mistakes_are_invalid_argument(policy_server, ctx, build, code, message):
    got, details = asyncio.run(_grpc(policy_server, build(ctx)))
    assert got == code, (got, details)
    assert message.lower() in details.lower(), details


def test_still_serving_after_the_bad_inputs(policy_server, ctx):
    """The sessions the cases ran against are untouched (next chunk as expected), new sessions work, and no
    request of the whole suite was a server error."""
    nxt = policy_server.step(StepRequest(ASYNC, seq=2, images=ctx.f, actions=ctx.a, state=ctx.s))
    assert nxt.chunk_index == 2
    nxt = policy_server.step(StepRequest(SYNC, seq=1, images=ctx.f, actions=ctx.a, state=ctx.s), "grpc")
    assert nxt.chunk_index == 1
    assert policy_server.step(StepRequest("after-bad", reset=True, images=ctx.f0, state=ctx.s0)).chunk_index == 0
    errors = re.findall(r'lingbot_serve_request_seconds_count\{kind="\w+",model_name="lingbot-va",outcome="error"\} '
                        r'(\S+)', policy_server.metrics())
    assert all(float(e) == 0 for e in errors), errors
    assert policy_server.proc.poll() is None
