"""The wire contract between robots and the policy server: KServe Open Inference Protocol V2 with binary tensors.

Transport: REST (``POST /v2/models/<name>/infer`` with the binary tensor extension) and gRPC (``ModelInfer`` with
``raw_input_contents``); model name ``lingbot-va`` by default. Clients use kserve's ``InferenceRESTClient`` (V2
protocol) or ``InferenceGRPCClient`` with the helpers here; nothing is pickled.

One inference request = one step of one robot episode's session.

Request parameters
    session_id   str, required, ``[A-Za-z0-9._:-]{1,128}``; one per robot episode
    reset        bool; starts (or restarts) the session: ``images`` exactly 1 frame, ``state`` [1, S], no ``actions``
    instruction  str, at reset: a task name the model knows (default: the model's only task); later requests may
                 repeat it but not change it
    mode         "async" (default, Algorithm 2) | "sync" (Algorithm 1); fixed at reset (ignored afterwards)
    cameras      optional, comma-separated; must equal the model's camera order
    seq          optional int: the chunk index the client expects back; a mismatch is a 4xx "out of order"
    seed         optional int in [0, 2**63), at reset: the seed of the session's flow sampler (default: derived from
                 the server's seed and the session id). The same seed, model and observations give the same chunks:
                 evaluation replays an episode with it, and a robot can reproduce the gate's episode
    session_token
                 str, binds the session to the client that opened it: a reset of a free session id may choose it
                 (``[A-Za-z0-9._~+/=-]{8,128}``; else the server draws one), the response returns it, and every later
                 request of that session -- a reset included -- must carry it: another client using the id is refused
                 (HTTP 403 / PERMISSION_DENIED naming session_id) while the session is live
    model_version
                 optional str: the version the episode runs on (the ``model_version`` of its first response). A reset
                 carrying it restarts the session on that version if this server still holds it (a hot swap keeps the
                 versions running sessions use); a server that cannot serve it, or a session on another version,
                 answers 4xx ``model version not served``. Clients that pin their episodes send it on every request
                 after the first response, so an episode's chunks never come from two versions.

Request inputs (binary tensors)
    images   UINT8 [N, V, H, W, 3]  frames seen while the previous chunk executed, one per executed step (reset: N=1)
    actions  FP32  [N, A]           native actions executed
    state    FP32  [N, S]           robot state observed before each executed action (reset: [1, S])
    A request with no tensors (N=0) is valid only in async mode right after the reset response: "chunk 0 is
    executing; plan chunk 1 from its imagined outcome". Otherwise N is the model's chunk length K*tau (one frame,
    action and state per executed step of the chunk reported).

What the server does per request
    sync:  observe(frames, executed actions mapped to the unified space against ``state``), then plan.
    async: observe(...) if the request carries frames, then imagine (FDM) the chunk returned last time (it is
           executing now), then plan the chunk after it -- Algorithm 2's call order.
           (A request reporting the only chunk returned so far has nothing executing: observe, then plan.)
    Requests of one session are served in arrival order, one at a time; different sessions' passes are batched.

Response outputs
    actions  FP32 [K*tau, A]   the next chunk in native units, computed against the last state of the request and
                               clipped to the embodiment's limits
    targets  FP32 [K*tau, 30]  the same chunk in the unified space (denormalised), so state-relative embodiments can
                               re-map every step against the live state on the robot
Response parameters
    model_version ("<registered name>/<version>" or the local directory's content hash), session_id, session_token,
    chunk_index (0 for the reset response), embodiment, control_rate_hz, cameras (comma-separated), image_size, and
    the server's own timing of the request, in integer microseconds (kserve's gRPC parameters carry no floats):
    compute_us   model time: from the start of the batch that served the request until its chunk was ready
                 (observe, imagine and plan passes; under cross-robot batching the batch's passes before it)
    queue_us     time the request waited for its batch (the batching window, other batches running)
    decode_us    time from the transport's message to a checked ``StepRequest`` (parsing and validation)
    so a client's round trip minus ``compute_us`` is what the endpoint costs beyond the model (the benchmark's
    overhead). Clients ignore response parameters they do not know.

Errors
    Client mistakes are HTTP 4xx / gRPC INVALID_ARGUMENT (or NOT_FOUND / PERMISSION_DENIED / UNAUTHENTICATED /
    RESOURCE_EXHAUSTED) with a message naming the field (long values shortened); unknown parameters are refused,
    never a 5xx (a 5xx means the model itself failed, e.g. produced NaN; that session is closed). Requests
    over the size limit are 413 on REST. An unknown or evicted session answers ``unknown session <id>: send
    reset=true``; a session begun on a model version that can no longer be served answers ``model changed: send
    reset=true``; a request pinned (``model_version``) to a version this server does not serve answers ``model version
    not served`` (no reset helps: that episode is over). With a token configured, requests need ``Authorization:
    Bearer <token>`` (REST) or ``authorization`` metadata (gRPC).
"""

from __future__ import annotations

import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from kserve import InferInput, InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import to_http_parameters
from kserve.utils.numpy_codec import to_np_dtype

DEFAULT_MODEL_NAME = "lingbot-va"
MODES = ("async", "sync")
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SESSION_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/=-]{8,128}")
UNIFIED_DIM = 30
SEED_LIMIT = 2**63  # sampler seeds are int64 (kserve's gRPC int64_param)

UNKNOWN_SESSION = "unknown session {session_id}: send reset=true"
MODEL_CHANGED = "model changed: send reset=true"
VERSION_NOT_SERVED = "model version not served"
OUT_OF_ORDER = "out of order"
NON_FINITE = "the model produced non-finite actions"

# name -> (V2 datatype, numpy dtype, rank)
INPUTS: dict[str, tuple[str, type, int]] = {
    "images": ("UINT8", np.uint8, 5),
    "actions": ("FP32", np.float32, 2),
    "state": ("FP32", np.float32, 2),
}
OUTPUTS: dict[str, tuple[str, type, int]] = {
    "actions": ("FP32", np.float32, 2),
    "targets": ("FP32", np.float32, 2),
}
# parameters kserve itself understands; accepted and ignored by ``from_infer_request``
_TRANSPORT_PARAMETERS = {"binary_data_output", "content_type", "headers"}
# the request parameters of this protocol; any other is refused (a typo must not be silently ignored)
PARAMETERS = ("session_id", "session_token", "reset", "instruction", "mode", "cameras", "seq", "model_version",
              "seed")
# the response parameters (documented above); the timings are optional (absent from servers that do not time)
RESPONSE_PARAMETERS = ("model_version", "session_id", "session_token", "chunk_index", "embodiment", "control_rate_hz",
                       "cameras", "image_size", "compute_us", "queue_us", "decode_us")
TIMINGS = ("compute", "queue", "decode")  # StepResponse.<name>_ms <-> response parameter <name>_us
_INT_RANGE = {np.uint8: (0, 255)}


@dataclass
class StepRequest:
    """One step of one robot episode, as the client sends it (arrays are None when absent)."""

    session_id: str
    reset: bool = False
    instruction: str | None = None
    mode: str = "async"
    cameras: tuple[str, ...] | None = None
    seq: int | None = None
    model_version: str | None = None  # the version the episode is pinned to (None: whatever the server serves)
    session_token: str | None = None  # the session's owner: chosen or returned at reset, sent on every request
    seed: int | None = None  # at reset: the flow sampler's seed (None: the server derives one from the session id)
    images: np.ndarray | None = None  # (N, V, H, W, 3) uint8
    actions: np.ndarray | None = None  # (N, A) float32, native
    state: np.ndarray | None = None  # (N, S) float32

    @property
    def steps(self) -> int:
        """N: how many executed steps the request reports (0 when it carries no tensors)."""
        return 0 if self.images is None else len(self.images)


@dataclass
class StepResponse:
    """The next action chunk of a session and what the client needs to execute it."""

    actions: np.ndarray  # (K*tau, A) float32, native, clipped
    targets: np.ndarray  # (K*tau, 30) float32, unified, denormalised
    model_version: str
    session_id: str
    chunk_index: int
    embodiment: str
    control_rate_hz: float
    cameras: tuple[str, ...] = field(default_factory=tuple)
    image_size: int | None = None
    session_token: str | None = None
    compute_ms: float | None = None  # the server's model time for this request
    queue_ms: float | None = None  # time it waited for its batch
    decode_ms: float | None = None  # time the server took to parse and check it


# ---------------------------------------------------------------------------------------------------------------
# requests


def to_infer_request(req: StepRequest, model_name: str = DEFAULT_MODEL_NAME) -> InferRequest:
    """A V2 ``InferRequest`` with binary tensors, usable by kserve's REST and gRPC clients alike."""
    params: dict[str, Any] = {"session_id": req.session_id, "reset": bool(req.reset), "mode": req.mode,
                              "binary_data_output": True}  # REST: answer with binary tensors too
    if req.instruction is not None:
        params["instruction"] = req.instruction
    if req.cameras is not None:
        params["cameras"] = ",".join(req.cameras)
    if req.seq is not None:
        params["seq"] = int(req.seq)
    if req.model_version is not None:
        params["model_version"] = req.model_version
    if req.session_token is not None:
        params["session_token"] = req.session_token
    if req.seed is not None:
        params["seed"] = int(req.seed)
    inputs = []
    for name in INPUTS:
        value = getattr(req, name)
        if value is None:
            continue
        datatype, dtype, _ = INPUTS[name]
        array = np.ascontiguousarray(value, dtype=dtype)
        if array.size == 0:  # N=0 is spelled "no tensors"
            continue
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    return InferRequest(model_name, inputs, request_id=str(uuid.uuid4()), parameters=params)


def from_infer_request(request: InferRequest, *, max_bytes: int | None = None) -> StepRequest:
    """Parse and check one request (REST or gRPC); every mistake raises ``InvalidInput`` naming it.

    Checks what the wire alone defines (size limit, parameters, tensor names, dtypes, ranks, sizes, finiteness,
    N agreement, the reset rules); what depends on the model (cameras, image size, A, S, instruction, N against the
    chunk length) is the server's to check.
    """
    if max_bytes is not None:
        size = sum(_declared_bytes(t) for t in request.inputs)
        if size > max_bytes:
            biggest = max(request.inputs, key=_declared_bytes)
            raise InvalidInput(f"request too large: {size} bytes of tensors exceed the limit of {max_bytes} (input "
                               f"{show(biggest.name)} declares shape {show(list(biggest.shape))})")
    params = _parameters(request.parameters)
    session_id = params.get("session_id")
    if session_id is None:
        raise InvalidInput("missing parameter session_id (one id per robot episode)")
    if not isinstance(session_id, str) or not SESSION_ID_PATTERN.fullmatch(session_id):
        raise InvalidInput(f"bad session_id {show(session_id)}: use 1-128 of [A-Za-z0-9._:-]")
    session_token = params.get("session_token")
    if session_token is not None and (not isinstance(session_token, str)
                                      or not SESSION_TOKEN_PATTERN.fullmatch(session_token)):
        raise InvalidInput(f"bad session_token ({len(str(session_token))} chars): use 8-128 of [A-Za-z0-9._~+/=-]")
    reset = params.get("reset", False)
    if not isinstance(reset, bool):
        raise InvalidInput(f"parameter reset must be a bool, got {show(reset)}")
    mode = params.get("mode", "async")
    if mode not in MODES:
        raise InvalidInput(f"parameter mode must be one of {MODES}, got {show(mode)}")
    instruction = params.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction):
        raise InvalidInput(f"parameter instruction must be a non-empty string, got {show(instruction)}")
    cameras = params.get("cameras")
    if cameras is not None:
        if not isinstance(cameras, str) or not all(cameras.split(",")):
            raise InvalidInput(f"parameter cameras must be comma-separated camera names, got {show(cameras)}")
        cameras = tuple(cameras.split(","))
    seq = params.get("seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        raise InvalidInput(f"parameter seq must be a non-negative integer, got {show(seq)}")
    model_version = params.get("model_version")
    if model_version is not None and (not isinstance(model_version, str) or not model_version):
        raise InvalidInput(f"parameter model_version must be a non-empty string, got {show(model_version)}")
    seed = params.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise InvalidInput(f"parameter seed must be an integer in [0, 2**63), got {show(seed)}")

    arrays: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        arrays[tensor.name] = _input_array(tensor, arrays)
    step = StepRequest(session_id=session_id, reset=reset, instruction=instruction, mode=mode, cameras=cameras,
                       seq=seq, model_version=model_version, session_token=session_token, seed=seed, **arrays)
    _check_steps(step)
    return step


def _parameters(raw: Any, known: tuple[str, ...] | None = PARAMETERS) -> dict[str, Any]:
    """REST dict or gRPC ``MessageMap[str, InferParameter]`` -> plain dict, transport keys dropped; a name outside
    ``known`` is refused."""
    if not raw:
        return {}
    try:
        params = to_http_parameters(raw)
    except Exception as err:  # a JSON body whose parameters is not an object
        raise InvalidInput(f"request parameters must be an object of named values ({str(err)[:100]})") from None
    params = {k: v for k, v in params.items() if k not in _TRANSPORT_PARAMETERS}
    unknown = [k for k in params if known is not None and k not in known]
    if unknown:
        raise InvalidInput(f"unknown parameter {show(unknown[0])}: this endpoint takes {', '.join(known)}")
    return params


def show(value: Any, limit: int = 48) -> str:
    """``repr(value)``, shortened: error messages never echo a long value in full."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _declared_bytes(tensor: InferInput) -> int:
    """Bytes the tensor's header declares (0 when the header is too broken to say; parsing rejects it then)."""
    dtype = to_np_dtype(tensor.datatype)
    shape = list(tensor.shape)
    if dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return len(tensor._raw_data or b"")
    return math.prod(shape) * np.dtype(dtype).itemsize


def _input_array(tensor: InferInput, seen: dict[str, np.ndarray]) -> np.ndarray:
    name = tensor.name
    if name not in INPUTS:
        raise InvalidInput(f"unknown input {show(name)}; inputs are {sorted(INPUTS)}")
    if name in seen:
        raise InvalidInput(f"input {name!r} appears twice")
    datatype, dtype, rank = INPUTS[name]
    if tensor.datatype != datatype:
        raise InvalidInput(f"input {name!r} must be {datatype}, got datatype {show(tensor.datatype)}")
    shape = list(tensor.shape)
    if len(shape) != rank or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise InvalidInput(f"input {name!r} must have {rank} positive dimensions, got shape {shape}")
    count = math.prod(shape)
    raw = tensor._raw_data  # gRPC raw_input_contents; REST binary payloads were decoded into ``data`` by kserve
    if raw is not None:
        if len(raw) != count * np.dtype(dtype).itemsize:
            raise InvalidInput(f"input {name!r}: {len(raw)} bytes do not fill shape {shape} of {datatype}")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    else:
        data = tensor.data
        if data is None or len(data) != count:
            got = "no data" if data is None else f"{len(data)} values"
            raise InvalidInput(f"input {name!r}: {got} for shape {shape}")
        _check_values(name, datatype, dtype, data)
        try:
            array = np.asarray(data, dtype=dtype).reshape(shape)
        except (TypeError, ValueError, OverflowError) as err:
            raise InvalidInput(f"input {name!r} holds values that are not {datatype} ({str(err)[:100]})") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"input {name!r} contains NaN or inf")
    return array


def _check_values(name: str, datatype: str, dtype: type, data: list) -> None:
    """JSON values must be what the datatype holds: numpy would truncate 1.5 to a UINT8 1 and read True as 1."""
    if np.dtype(dtype).kind in "ui":
        low, high = _INT_RANGE.get(dtype, (np.iinfo(dtype).min, np.iinfo(dtype).max))
        for i, v in enumerate(data):
            if type(v) is not int or not low <= v <= high:
                raise InvalidInput(f"input {name!r} holds values that are not {datatype}: data[{i}] = {show(v)} (integers "
                                   f"{low}..{high})")
    else:
        limit = float(np.finfo(dtype).max)
        for i, v in enumerate(data):
            if type(v) not in (int, float) or not -limit <= v <= limit:
                raise InvalidInput(f"input {name!r} holds values that are not {datatype}: data[{i}] = {show(v)} "
                                   "(finite numbers)")


def _check_steps(step: StepRequest) -> None:
    present = {n: getattr(step, n) for n in INPUTS if getattr(step, n) is not None}
    lengths = {n: len(a) for n, a in present.items()}
    if len(set(lengths.values())) > 1:
        raise InvalidInput(f"inputs disagree on N (executed steps): {lengths}")
    if step.reset:
        if step.actions is not None:
            raise InvalidInput("a reset request carries no actions (nothing was executed yet)")
        if step.images is None or step.state is None:
            raise InvalidInput("a reset request needs images [1, V, H, W, 3] and state [1, S]")
        if len(step.images) != 1:
            raise InvalidInput(f"a reset request needs exactly 1 frame, got N={len(step.images)}")
        return
    if present and set(present) != set(INPUTS):
        missing = sorted(set(INPUTS) - set(present))
        raise InvalidInput(f"inputs {sorted(present)} need {missing} too: send images, actions and state together "
                           "(or none of them)")


# ---------------------------------------------------------------------------------------------------------------
# responses


def to_infer_response(resp: StepResponse, model_name: str = DEFAULT_MODEL_NAME, request_id: str | None = None,
                      *, binary: bool = True) -> InferResponse:
    """A V2 ``InferResponse`` with the response parameters; tensors binary unless ``binary=False`` (REST JSON)."""
    outputs = []
    for name in OUTPUTS:
        datatype, dtype, _ = OUTPUTS[name]
        array = np.ascontiguousarray(getattr(resp, name), dtype=dtype)
        out = InferOutput(name, list(array.shape), datatype)
        out.set_data_from_numpy(array, binary_data=True)
        outputs.append(out)
    params: dict[str, Any] = {
        "model_version": resp.model_version, "session_id": resp.session_id, "chunk_index": int(resp.chunk_index),
        "embodiment": resp.embodiment,
        "control_rate_hz": repr(float(resp.control_rate_hz)),  # gRPC parameters carry no floats in kserve
        "cameras": ",".join(resp.cameras),
    }
    if resp.image_size is not None:
        params["image_size"] = int(resp.image_size)
    if resp.session_token is not None:
        params["session_token"] = resp.session_token
    for name in TIMINGS:
        ms = getattr(resp, f"{name}_ms")
        if ms is not None:
            params[f"{name}_us"] = max(0, round(1000 * ms))
    return InferResponse(response_id=request_id or str(uuid.uuid4()), model_name=model_name, infer_outputs=outputs,
                         model_version=resp.model_version, parameters=params, use_binary_outputs=binary)


def from_infer_response(response: InferResponse) -> StepResponse:
    """Parse a response from either client; a malformed one raises ``InvalidInput``."""
    params = _parameters(response.parameters, known=None)
    arrays = {}
    for name, (datatype, dtype, rank) in OUTPUTS.items():
        out = response.get_output_by_name(name)
        if out is None:
            raise InvalidInput(f"response has no output {name!r}")
        if out.datatype != datatype:
            raise InvalidInput(f"response output {name!r} is {out.datatype}, expected {datatype}")
        array = np.asarray(out.as_numpy(), dtype=dtype)
        if array.ndim != rank:
            raise InvalidInput(f"response output {name!r} has shape {array.shape}, expected rank {rank}")
        arrays[name] = array
    missing = [k for k in ("model_version", "session_id", "chunk_index", "embodiment", "control_rate_hz")
               if k not in params]
    if missing:
        raise InvalidInput(f"response lacks parameters {missing}")
    cameras = params.get("cameras") or ""
    image_size = params.get("image_size")
    try:
        timings = {f"{name}_ms": None if params.get(f"{name}_us") is None else int(params[f"{name}_us"]) / 1000
                   for name in TIMINGS}
        return StepResponse(actions=arrays["actions"], targets=arrays["targets"],
                            model_version=str(params["model_version"]), session_id=str(params["session_id"]),
                            chunk_index=int(params["chunk_index"]), embodiment=str(params["embodiment"]),
                            control_rate_hz=float(params["control_rate_hz"]),
                            cameras=tuple(cameras.split(",")) if cameras else (),
                            image_size=None if image_size is None else int(image_size),
                            session_token=None if params.get("session_token") is None
                            else str(params["session_token"]), **timings)
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"response parameters are malformed ({err})") from None


__all__ = [
    "DEFAULT_MODEL_NAME",
    "MODEL_CHANGED",
    "MODES",
    "NON_FINITE",
    "OUT_OF_ORDER",
    "PARAMETERS",
    "RESPONSE_PARAMETERS",
    "UNKNOWN_SESSION",
    "VERSION_NOT_SERVED",
    "StepRequest",
    "StepResponse",
    "from_infer_request",
    "from_infer_response",
    "to_infer_request",
    "to_infer_response",
]
