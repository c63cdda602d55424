"""What the endpoint accepts on the wire, checked field by field before anything else reads it.

kserve's generic decoding coerces what it should refuse (shape ``"1"`` or ``1.0``, lowercase datatypes,
``binary_data_size`` ``"6144"``, ``Inference-Header-Content-Length`` ``+270``), ignores trailing bytes and answers
malformed bodies with pydantic's list of union alternatives. Here a REST body (JSON or the binary extension) and a
gRPC ``ModelInferRequest`` become a kserve ``InferRequest`` only after every field checked out; each rejection names
the field, and values are echoed shortened (``show``). ``services.protocol`` then checks what the request means.

Rejections are ``InvalidInput`` subclasses, so the engine passes them through untouched (a refused request never
closes a session); ``status_of`` maps each to its HTTP status and gRPC code.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import grpc
import orjson
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput, ModelNotFound
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

from services.protocol import INPUTS, OUTPUTS

V2_DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                "FP64", "BYTES")
HEADER_LENGTH = "Inference-Header-Content-Length"
METADATA_LIMIT = 16 * 1024  # bytes of gRPC metadata / what a REST client may put in headers before it is refused
MAX_ID = 256  # characters of a request id (echoed in the response)
_DIGITS = re.compile(r"[0-9]{1,15}")
_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


class Forbidden(InvalidInput):
    """The caller may not do this (another client's session, repository load/unload): HTTP 403, PERMISSION_DENIED."""


class NotFound(InvalidInput):
    """Nothing is served at this name, version or path: HTTP 404, NOT_FOUND."""


def status_of(err: BaseException) -> tuple[int, grpc.StatusCode]:
    """HTTP status and gRPC code of a rejection."""
    if isinstance(err, Forbidden):
        return 403, grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, NotFound | ModelNotFound):
        return 404, grpc.StatusCode.NOT_FOUND
    return 400, grpc.StatusCode.INVALID_ARGUMENT


def show(value: Any, limit: int = 48) -> str:
    """``repr(value)``, shortened: rejections never echo a long value in full."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def message_of(err: BaseException, limit: int = 600) -> str:
    """The rejection's message, capped (a last guard against echoing a long input)."""
    text = getattr(err, "reason", None) or str(err)  # ModelNotFound's reason names the model (shortened below)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------------------------- REST
def rest_request(body: bytes, headers, model_name: str) -> tuple[InferRequest, bool]:
    """A REST V2 body -> (``InferRequest``, whether outputs go back binary). JSON unless the binary-extension header
    ``Inference-Header-Content-Length`` is present; the Content-Type is not consulted (tritonclient sends none)."""
    length = headers.get(HEADER_LENGTH.lower())
    if length is None:
        head, blobs = _json(body, "request body"), b""
    else:
        if not _DIGITS.fullmatch(length):
            raise InvalidInput(f"malformed header {HEADER_LENGTH}: must be the JSON header's length in decimal digits, got "
                               f"{show(length)}")
        n = int(length)
        if not 0 < n <= len(body):
            raise InvalidInput(f"header {HEADER_LENGTH}={n} does not fit a body of {len(body)} bytes")
        head, blobs = _json(body[:n], f"the JSON header ({HEADER_LENGTH}={n} bytes)"), body[n:]
    return _rest_head(head, blobs, binary_extension=length is not None, model_name=model_name)


def _json(data: bytes, what: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as err:
        try:  # orjson refuses integers beyond 64 bits: let the field check name what holds one
            return json.loads(data, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise InvalidInput(f"unrecognized request format: {what} is not valid JSON ({str(err)[:120]}); binary "
                               f"tensors need the "
                               f"{HEADER_LENGTH} header") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _keys(obj: dict, allowed: set[str], where: str) -> None:
    extra = [k for k in obj if k not in allowed]
    if extra:
        raise InvalidInput(f"unknown field {show(extra[0])} in {where}; allowed: {sorted(allowed)}")


def _rest_head(head: Any, blobs: bytes, *, binary_extension: bool, model_name: str) -> tuple[InferRequest, bool]:
    if not isinstance(head, dict):
        raise InvalidInput(f"the request must be a JSON object, got {type(head).__name__}")
    _keys(head, {"id", "model_name", "model_version", "parameters", "inputs", "outputs"}, "the request")
    if head.get("model_name") not in (None, model_name):  # kserve's REST client repeats the path's name here
        raise InvalidInput(f"field model_name {show(head['model_name'])} differs from the path's {show(model_name)}")
    if head.get("model_version") not in (None, ""):
        raise NotFound(f"model versions are not addressable here: {show(model_name)} serves the version its registry "
                       f"alias points at; leave model_version out (got {show(head['model_version'], 16)})")
    request_id = head.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID):
        raise InvalidInput(f"field id must be a string of at most {MAX_ID} characters, got {show(request_id)}")
    params = head.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput(f"field parameters must be an object of named values, got {type(params).__name__}")
    for key, value in (params or {}).items():
        if not isinstance(value, str | int | float | bool):
            raise InvalidInput(f"parameter {show(key)} must be a string, number or bool, got "
                               f"{type(value).__name__}")
    specs = head.get("inputs")
    if not isinstance(specs, list):
        raise InvalidInput(f"field inputs must be a list of tensors, got {type(specs).__name__}")
    offset, inputs = 0, []
    for i, spec in enumerate(specs):
        tensor, size = _rest_input(spec, i, binary_extension)
        if size is not None:
            if offset + size > len(blobs):
                raise InvalidInput(f"input {show(tensor.name)}: binary_data_size={size} runs past the end of the "
                                   f"body ({len(blobs) - offset} bytes left)")
            tensor._raw_data, offset = blobs[offset:offset + size], offset + size
        inputs.append(tensor)
    if offset != len(blobs):
        raise InvalidInput(f"{len(blobs) - offset} trailing bytes after the tensors: the inputs' binary_data_size "
                           f"add up to {offset} bytes")
    binary = bool(params and params.get("binary_data_output") is True)
    outputs = head.get("outputs")
    if outputs is not None:
        binary = _rest_outputs(outputs, binary)
    return InferRequest(model_name, inputs, request_id=request_id, parameters=params or None), binary


def _rest_input(spec: Any, i: int, binary_extension: bool) -> tuple[InferInput, int | None]:
    where = f"inputs[{i}]"
    if not isinstance(spec, dict):
        raise InvalidInput(f"{where} must be an object with name, shape, datatype, got {type(spec).__name__}")
    _keys(spec, {"name", "shape", "datatype", "parameters", "data"}, where)
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{where}: field name must be a non-empty string, got {show(name)}")
    where = f"input {show(name)}"
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(f"{where}: shape must be a list of non-negative integers, got {show(shape)}")
    datatype = spec.get("datatype")
    check_datatype(datatype, where)
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}: parameters must be an object, got {type(params).__name__}")
    _keys(params, {"binary_data_size"}, f"{where}'s parameters")
    data, size = spec.get("data"), params.get("binary_data_size")
    tensor = InferInput(name, shape, datatype)
    if "binary_data_size" in params:
        if type(size) is not int or size < 0:
            raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer, got {show(size)}")
        if not binary_extension:
            raise InvalidInput(f"{where}: binary_data_size needs the {HEADER_LENGTH} header (binary extension)")
        if data is not None:
            raise InvalidInput(f"{where} has both data and binary_data_size")
        return tensor, size
    if data is None:
        raise InvalidInput(f"{where} has neither 'data' nor 'binary_data_size'")
    if not isinstance(data, list):
        raise InvalidInput(f"{where}: data must be a list of values, got {type(data).__name__}")
    tensor.data = _flat(data, shape, where)
    return tensor, None


def _flat(data: list, shape: list[int], where: str) -> list:
    """V2 data is flat, or nested exactly as the shape (row-major); the protocol reads it flat."""
    if not any(isinstance(v, list) for v in data):
        return data
    out: list = []

    def walk(node: Any, depth: int) -> None:
        if isinstance(node, list):
            if depth >= len(shape) or len(node) != shape[depth]:
                raise InvalidInput(f"{where}: data is nested unlike shape {show(shape)}: send it flat or nested "
                                   "exactly as the shape")
            for v in node:
                walk(v, depth + 1)
        elif depth != len(shape):
            raise InvalidInput(f"{where}: data is nested unlike shape {show(shape)}: send it flat or nested exactly "
                               "as the shape")
        else:
            out.append(node)

    if math.prod(shape) > 1 << 24:
        raise InvalidInput(f"{where}: shape {show(shape)} is too large for JSON data")
    walk(data, 0)
    return out


def _rest_outputs(outputs: Any, binary: bool) -> bool:
    if not isinstance(outputs, list):
        raise InvalidInput(f"field outputs must be a list, got {type(outputs).__name__}")
    flags = []
    for i, spec in enumerate(outputs):
        if not isinstance(spec, dict):
            raise InvalidInput(f"outputs[{i}] must be an object with a name, got {type(spec).__name__}")
        _keys(spec, {"name", "parameters"}, f"outputs[{i}]")
        if spec.get("name") not in OUTPUTS:
            raise InvalidInput(f"outputs[{i}]: unknown output {show(spec.get('name'))}; outputs are {sorted(OUTPUTS)}")
        params = spec.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"outputs[{i}]: parameters must be an object, got {type(params).__name__}")
        _keys(params, {"binary_data"}, f"outputs[{i}]'s parameters")
        flag = params.get("binary_data", binary)
        if not isinstance(flag, bool):
            raise InvalidInput(f"outputs[{i}]: binary_data must be a bool, got {show(flag)}")
        flags.append(flag)
    return all(flags) if flags else binary


def check_datatype(datatype: Any, where: str) -> None:
    if datatype not in V2_DATATYPES:
        hint = f" (V2 datatypes are upper case: {datatype.upper()})" if (
            isinstance(datatype, str) and datatype.upper() in V2_DATATYPES) else ""
        raise InvalidInput(f"{where}: datatype {show(datatype)} is not a V2 datatype{hint}; this model takes "
                           + ", ".join(f"{n} {dt}" for n, (dt, _, _) in INPUTS.items()))


# ------------------------------------------------------------------------------------------------------------- gRPC
def grpc_request(msg: pb.ModelInferRequest) -> InferRequest:
    """A gRPC ``ModelInferRequest`` (model name and version already checked) -> ``InferRequest``."""
    for key, value in msg.parameters.items():
        if value.WhichOneof("parameter_choice") is None:
            raise InvalidInput(f"parameter {show(key)} has no value")
    if len(msg.id) > MAX_ID:
        raise InvalidInput(f"field id must be at most {MAX_ID} characters, got {len(msg.id)}")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        names = show([t.name for t in msg.inputs], 80)
        raise InvalidInput(f"raw input contents (raw_input_contents) has {len(raw)} entries for {len(msg.inputs)} "
                           f"inputs {names}: send one per input, in input order (or none, with every input's values "
                           "in contents)")
    inputs = []
    for i, spec in enumerate(msg.inputs):
        if not spec.name:
            raise InvalidInput(f"inputs[{i}]: field name is empty")
        where = f"input {show(spec.name)}"
        check_datatype(spec.datatype, where)
        shape = list(spec.shape)
        if not all(d >= 0 for d in shape):
            raise InvalidInput(f"{where}: shape must be non-negative integers, got {show(shape)}")
        extra = [k for k in spec.parameters if k != "binary_data_size"]
        if extra:
            raise InvalidInput(f"{where}: unknown parameter {show(extra[0])}")
        tensor = InferInput(spec.name, shape, spec.datatype)
        filled = [f.name for f, _ in spec.contents.ListFields()] if spec.HasField("contents") else []
        if raw:
            if filled:
                raise InvalidInput(f"{where}: contents and raw_input_contents both given; send one of them")
            tensor._raw_data = raw[i]
        elif filled:
            want = _CONTENTS.get(spec.datatype)
            if filled != [want]:
                raise InvalidInput(f"{where}: a {spec.datatype} tensor's values go in contents.{want}, got "
                                   f"contents.{', '.join(filled)}")
            tensor.data = list(getattr(spec.contents, want))
        else:
            raise InvalidInput(f"{where} has no values: fill raw_input_contents or contents")
        inputs.append(tensor)
    for i, out in enumerate(msg.outputs):
        if out.name not in OUTPUTS:
            raise InvalidInput(f"outputs[{i}]: unknown output {show(out.name)}; outputs are {sorted(OUTPUTS)}")
    return InferRequest(msg.model_name, inputs, request_id=msg.id or None, raw_inputs=None, from_grpc=True,
                        parameters=msg.parameters)
