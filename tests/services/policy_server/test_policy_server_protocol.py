"""services.protocol without a server: requests and responses survive kserve's REST (binary) and gRPC encodings
exactly, and malformed ones are rejected with InvalidInput naming the problem."""

from __future__ import annotations

import numpy as np
import pytest
from kserve import InferRequest, InferResponse
from kserve.errors import InvalidInput

from services.protocol import (
    RESPONSE_PARAMETERS,
    StepRequest,
    StepResponse,
    from_infer_request,
    from_infer_response,
    to_infer_request,
    to_infer_response,
)


def _via(transport: str, request: InferRequest) -> InferRequest:
    if transport == "rest":
        body, json_length = request.to_rest()
        if json_length is None:  # no tensors: plain JSON, as kserve's REST client sends it
            return InferRequest.from_inference_request(_json_model(body), "lingbot-va")
        return InferRequest.from_bytes(body, json_length, "lingbot-va")
    return InferRequest.from_grpc(request.to_grpc())


def _json_model(body: dict):
    from kserve.protocol.rest.v2_datamodels import InferenceRequest

    return InferenceRequest.model_validate(body)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_requests_round_trip(transport):
    rng = np.random.default_rng(0)
    full = StepRequest("robot-7.ep:3", seq=4, cameras=("corner4", "gripperPOV"), model_version="lingbot-va-x/3",
                       images=rng.integers(0, 256, (8, 2, 32, 32, 3), dtype=np.uint8),
                       actions=rng.uniform(-1, 1, (8, 4)).astype(np.float32),
                       state=rng.normal(size=(8, 4)).astype(np.float32))
    back = from_infer_request(_via(transport, to_infer_request(full)))
    assert (back.session_id, back.reset, back.mode, back.seq, back.cameras) == ("robot-7.ep:3", False, "async", 4,
                                                                              ("corner4", "gripperPOV"))
    assert back.model_version == "lingbot-va-x/3"
    for name in ("images", "actions", "state"):
        a, b = getattr(full, name), getattr(back, name)
        assert b.dtype == a.dtype and np.array_equal(a, b), name
    reset = StepRequest("r", reset=True, instruction="reach-v3", mode="sync", images=full.images[:1],
                        state=full.state[:1])
    back = from_infer_request(_via(transport, to_infer_request(reset)))
    assert back.reset and back.instruction == "reach-v3" and back.mode == "sync" and back.actions is None
    assert back.model_version is None  # not pinned: the server's current version
    empty = from_infer_request(_via(transport, to_infer_request(StepRequest("r"))))
    assert empty.steps == 0 and empty.images is None and not empty.reset


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_responses_round_trip(transport):
    resp = StepResponse(actions=np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4),
                        targets=np.arange(240, dtype=np.float32).reshape(8, 30), model_version="lingbot-va-x/3",
                        session_id="r", chunk_index=5, embodiment="metaworld-sawyer", control_rate_hz=80.0,
                        cameras=("corner4", "gripperPOV"), image_size=32, compute_ms=123.4564, queue_ms=0.0,
                        decode_ms=0.2)
    infer = to_infer_response(resp, "lingbot-va", "id-1")
    if transport == "rest":
        body, json_length = infer.to_rest()
        back = from_infer_response(InferResponse.from_bytes(body, json_length))
    else:
        back = from_infer_response(InferResponse.from_grpc(infer.to_grpc()))
    assert np.array_equal(back.actions, resp.actions) and np.array_equal(back.targets, resp.targets)
    assert (back.model_version, back.session_id, back.chunk_index, back.embodiment, back.control_rate_hz,
            back.cameras, back.image_size) == ("lingbot-va-x/3", "r", 5, "metaworld-sawyer", 80.0,
                                               ("corner4", "gripperPOV"), 32)
    # the server's timings travel as integer microseconds (kserve's gRPC parameters carry no floats)
    assert (back.compute_ms, back.queue_ms, back.decode_ms) == (123.456, 0.0, 0.2)
    assert {"compute_us", "queue_us", "decode_us"} <= set(RESPONSE_PARAMETERS)


def test_responses_without_timings_parse():
    """Servers that do not time their requests (older ones) answer without the timing parameters."""
    resp = StepResponse(np.zeros((8, 4), np.float32), np.zeros((8, 30), np.float32), "v", "r", 0, "metaworld-sawyer",
                        80.0)
    back = from_infer_response(InferResponse.from_grpc(to_infer_response(resp).to_grpc()))
    assert (back.compute_ms, back.queue_ms, back.decode_ms) == (None, None, None)


def test_size_limit_is_checked_before_decoding():
    req = to_infer_request(StepRequest("r", images=np.zeros((8, 2, 32, 32, 3), np.uint8),
                                       actions=np.zeros((8, 4), np.float32), state=np.zeros((8, 4), np.float32)))
    assert from_infer_request(req, max_bytes=50_000).steps == 8
    with pytest.raises(InvalidInput, match="request too large: 49408 bytes"):
        from_infer_request(req, max_bytes=40_000)


def test_malformed_responses_are_rejected():
    infer = to_infer_response(StepResponse(np.zeros((8, 4), np.float32), np.zeros((8, 30), np.float32), "v", "r", 0,
                                           "metaworld-sawyer", 80.0), "lingbot-va", "id")
    infer.outputs = infer.outputs[:1]
    with pytest.raises(InvalidInput, match="no output 'targets'"):
        from_infer_response(infer)
    infer = to_infer_response(StepResponse(np.zeros((8, 4), np.float32), np.zeros((8, 30), np.float32), "v", "r", 0,
                                           "metaworld-sawyer", 80.0), "lingbot-va", "id")
    infer.parameters = {"session_id": "r"}
    with pytest.raises(InvalidInput, match="lacks parameters"):
        from_infer_response(infer)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_a_reset_carries_its_sampler_seed(transport):
    rng = np.random.default_rng(1)
    reset = StepRequest("r", reset=True, seed=2**62 + 7, images=rng.integers(0, 256, (1, 2, 32, 32, 3), np.uint8),
                        state=rng.normal(size=(1, 4)).astype(np.float32))
    assert from_infer_request(_via(transport, to_infer_request(reset))).seed == 2**62 + 7
    assert from_infer_request(_via(transport, to_infer_request(StepRequest("r")))).seed is None


@pytest.mark.parametrize("seed", [-1, 2**63, "7", True, 1.5])
def test_a_seed_outside_int64_or_not_an_integer_is_refused(seed):
    request = to_infer_request(StepRequest("r", reset=True, images=np.zeros((1, 2, 32, 32, 3), np.uint8),
                                           state=np.zeros((1, 4), np.float32)))
    request.parameters["seed"] = seed
    with pytest.raises(InvalidInput, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        from_infer_request(request)
