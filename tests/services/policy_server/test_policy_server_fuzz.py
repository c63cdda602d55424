"""The endpoint under hostile and careless clients (issue 16): generated cases per class of mistake, over REST (raw
httpx), gRPC (raw protobuf stubs and raw bytes) and tritonclient's gRPC and HTTP clients as real third-party callers.

Every case asserts: no 5xx / INTERNAL / UNKNOWN; a rejection is a 4xx / INVALID_ARGUMENT (or the documented
NOT_FOUND / PERMISSION_DENIED / UNAUTHENTICATED / RESOURCE_EXHAUSTED) whose message names the field and stays short.
The module's last tests check that the server still serves, that readiness is true only with a model loaded, that a
hijacked session id was refused while its owner kept going, and that no rejection logged a traceback.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as thttp
from conftest import PolicyServer, frames, states
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from tritonclient.utils import InferenceServerException

from services.protocol import DEFAULT_MODEL_NAME

M = DEFAULT_MODEL_NAME
TOKEN = "fuzz-bearer-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # copied per call: tritonclient's HTTP client adds to the dict it gets
GAUTH = (("authorization", f"Bearer {TOKEN}"),)
INFER = f"/v2/models/{M}/infer"
LIMIT_MB = 1
F0, S0 = frames(1, 1), states(1, 1)  # a valid reset's tensors: images (1, 2, 32, 32, 3) uint8, state (1, 4) fp32
VICTIM, VICTIM_TOKEN = "victim-robot", "victim-secret-token-42"
MAX_MESSAGE = 1024  # no rejection echoes a long value in full
SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
GRPC_REJECTIONS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                   grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
OK = grpc.StatusCode.OK


@dataclass
class Ctx:
    server: PolicyServer
    http: httpx.Client
    channel: grpc.Channel
    stub: GRPCInferenceServiceStub
    tg: TritonGRPC
    th: thttp.InferenceServerClient
    counter: int = 0

    def sid(self, prefix: str = "fz") -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"


@dataclass
class Case:
    """One generated request: ``call(ctx) -> (status, message)``; ``expect`` the acceptable statuses (HTTP ints or
    gRPC codes); every string in ``needles`` must appear in the message (case-insensitive)."""

    cls: str
    name: str
    call: Callable[[Ctx], tuple[object, str]]
    expect: set
    needles: tuple[str, ...] = ()
    tags: set = field(default_factory=set)


# ------------------------------------------------------------------------------------------------- transports
def rest(ctx: Ctx, body: bytes | dict, headers: dict | None = None, path: str = INFER, method: str = "POST",
         json_length: int | None = None) -> tuple[int, str]:
    content = orjson.dumps(body) if isinstance(body, dict) else body
    h = dict(AUTH if headers is None else headers)
    if json_length is not None:
        h.setdefault("Inference-Header-Content-Length", str(json_length))
        h.setdefault("Content-Type", "application/octet-stream")
    elif isinstance(body, dict):
        h.setdefault("Content-Type", "application/json")
    r = ctx.http.request(method, path, content=content if method == "POST" else None, headers=h)
    return r.status_code, _message(r)


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", r.text)) if r.status_code >= 400 else r.text[:200]
    except (ValueError, AttributeError):
        return r.text


def binary(head: dict, blobs: list[bytes], extra: bytes = b"") -> tuple[bytes, int]:
    """A binary-extension body: JSON header, then the tensors' bytes (and ``extra``)."""
    js = json.dumps(head, separators=(",", ":")).encode()  # json, not orjson: some cases hold ints beyond 64 bits
    return js + b"".join(blobs) + extra, len(js)


def grpc_call(ctx: Ctx, method: str, message, metadata=GAUTH) -> tuple[grpc.StatusCode, str]:
    try:
        getattr(ctx.stub, method)(message, metadata=metadata, timeout=60)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return OK, "accepted"


def grpc_bytes(ctx: Ctx, method: str, data: bytes, metadata=GAUTH) -> tuple[grpc.StatusCode, str]:
    call = ctx.channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # bytes in, bytes out
    try:
        call(data, metadata=metadata, timeout=60)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return OK, "accepted"


def triton(fn: Callable[[], object]) -> tuple[object, str]:
    """A tritonclient call: its status (HTTP int or gRPC code) and message."""
    try:
        fn()
    except InferenceServerException as err:
        status = err.status() or ""
        code = getattr(grpc.StatusCode, status.split(".")[-1], None) if status.startswith("StatusCode") else None
        return (code if code is not None else int(status) if status.isdigit() else status), err.message() or ""
    return "ok", "accepted"


# ------------------------------------------------------------------------------------------------- request bodies
def tensors(reset: bool = True) -> dict[str, tuple[str, np.ndarray]]:
    return {"images": ("UINT8", F0), "state": ("FP32", S0)} if reset else {}


def params(sid: str, reset: bool = True, **extra) -> dict:
    p = {"session_id": sid, "reset": reset}
    p.update(extra)
    return p


def json_body(p: dict, ts: dict | None = None) -> dict:
    ts = tensors() if ts is None else ts
    return {"id": "fz", "parameters": p,
            "inputs": [{"name": n, "shape": list(a.shape), "datatype": dt, "data": a.ravel().tolist()}
                       for n, (dt, a) in ts.items()]}


def binary_body(p: dict, ts: dict | None = None, extra: bytes = b"") -> tuple[bytes, int]:
    ts = tensors() if ts is None else ts
    head = {"id": "fz", "parameters": p,
            "inputs": [{"name": n, "shape": list(a.shape), "datatype": dt, "parameters": {"binary_data_size": a.nbytes}}
                       for n, (dt, a) in ts.items()]}
    return binary(head, [a.tobytes() for _, a in ts.values()], extra)


def grpc_request(p: dict, ts: dict | None = None, model: str = M) -> pb.ModelInferRequest:
    ts = tensors() if ts is None else ts
    msg = pb.ModelInferRequest(model_name=model, id="fz")
    for k, v in p.items():
        param = msg.parameters[k]
        if isinstance(v, bool):
            param.bool_param = v
        elif isinstance(v, int):
            param.int64_param = v
        else:
            param.string_param = str(v)
    for n, (dt, a) in ts.items():
        msg.inputs.add(name=n, datatype=dt, shape=list(a.shape))
        msg.raw_input_contents.append(a.tobytes())
    return msg


class TritonGRPC:
    """tritonclient's gRPC client, driven in its own process (``tritonclient_grpc_driver.py``): its protobufs and
    kserve's share the package name ``inference`` and cannot live in one process."""

    def __init__(self, url: str, headers: dict):
        driver = str(Path(__file__).with_name("tritonclient_grpc_driver.py"))
        self.proc = subprocess.Popen([sys.executable, driver, url, json.dumps(headers)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def call(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def status(self, request: dict) -> tuple[object, str]:
        got = self.call(request)
        code = got["status"]
        return (getattr(grpc.StatusCode, code.split(".")[-1]) if code.startswith("StatusCode") else code), got["message"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def th_inputs(ts: dict | None = None, datatype: dict | None = None, binary_data: bool = True) -> list:
    out = []
    for n, (dt, a) in (tensors() if ts is None else ts).items():
        t = thttp.InferInput(n, list(a.shape), dt)
        t.set_data_from_numpy(a, binary_data=binary_data)
        if datatype and n in datatype:
            t._datatype = datatype[n]
        out.append(t)
    return out


def tg_infer(ctx: Ctx, p: dict, ts=None, datatype=None):
    return ctx.tg.status({"op": "infer", "params": p, "tensors": "none" if ts == {} else "reset",
                          "datatype": datatype or {}})


def th_infer(ctx: Ctx, p: dict, ts=None, datatype=None, headers=None, binary_data=True):
    return triton(lambda: ctx.th.infer(M, th_inputs(ts, datatype, binary_data), parameters=p,
                                       headers=dict(AUTH) if headers is None else headers))


def with_input(body: dict, name: str, **changes) -> dict:
    body = json.loads(json.dumps(body))
    for spec in body["inputs"]:
        if spec["name"] == name:
            for k, v in changes.items():
                if v is _DROP:
                    spec.pop(k, None)
                else:
                    spec[k] = v
    return body


_DROP = object()
R4 = {400, 404, 413}


# ------------------------------------------------------------------------------------------------- the classes
def gen_repository() -> list[Case]:
    cases = []
    for op in ("load", "unload"):
        for name in (M, "other-model", "x" * 300):
            path = f"/v2/repository/models/{name}/{op}"
            cases.append(Case("repository", f"rest-{op}-{name[:12]}", lambda c, p=path: rest(c, b"{}", path=p),
                              {403, 404}, ("cannot be",) if name == M else ()))
            cases.append(Case("repository", f"rest-{op}-{name[:12]}-no-token",
                              lambda c, p=path: rest(c, b"{}", headers={}, path=p), {401}, ("bearer",)))
            method = "RepositoryModel" + op.capitalize()
            msg = (pb.RepositoryModelLoadRequest if op == "load" else pb.RepositoryModelUnloadRequest)(model_name=name)
            cases.append(Case("repository", f"grpc-{op}-{name[:12]}",
                              lambda c, m=method, x=msg: grpc_call(c, m, x),
                              {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND},
                              ("cannot be",) if name == M else ()))
            cases.append(Case("repository", f"grpc-{op}-{name[:12]}-no-token",
                              lambda c, m=method, x=msg: grpc_call(c, m, x, metadata=()),
                              {grpc.StatusCode.UNAUTHENTICATED}, ("bearer",)))
        cases.append(Case("repository", f"tritonclient-grpc-{op}",
                          lambda c, o=op: c.tg.status({"op": f"{o}_model"}),
                          {grpc.StatusCode.PERMISSION_DENIED}, ("cannot be",)))
        cases.append(Case("repository", f"tritonclient-http-{op}",
                          lambda c, o=op: triton(lambda: getattr(c.th, f"{o}_model")(M, headers=dict(AUTH))),
                          {403}, ("cannot be",)))
    return cases


def gen_paths() -> list[Case]:
    cases = []
    for method, path, expect, needles in [
        ("GET", f"/v2/models/{M}/versions/1", {404}, ("version",)),
        ("GET", f"/v2/models/{M}/versions/1/ready", {404}, ("version",)),
        ("POST", f"/v2/models/{M}/versions/1/infer", {404}, ("version",)),
        ("POST", f"/v2/models/{M}/versions/latest/infer", {404}, ("version",)),
        ("GET", f"/v2/models/{M}/versions/{'9' * 40}", {404}, ("version",)),
        ("POST", f"/v1/models/{M}:explain", {404}, ("explain",)),
        ("POST", "/v1/models/other-model:explain", {404}, ()),
        ("POST", f"/v1/models/{M}:predict", {400}, ("v2",)),
        ("POST", "/v1/models/other-model:predict", {404}, ("other-model",)),
        ("GET", "/v2/models/other-model", {404}, ("other-model",)),
        ("GET", "/v2/models/other-model/ready", {404}, ("other-model",)),
        ("POST", "/v2/models/other-model/infer", {404}, ("other-model",)),
        ("GET", INFER, {405}, ()),
        ("PUT", INFER, {405}, ()),
        ("DELETE", f"/v2/models/{M}", {405}, ()),
        ("POST", "/v2/repository/index", {404, 405}, ()),
        ("GET", "/v2/nothing-here", {404}, ()),
        ("POST", "/v2/models/" + "m" * 2000 + "/infer", {404}, ()),
        ("POST", "/v2/models/%2e%2e/infer", {404}, ()),
        ("GET", "/v1/models/other-model", {404}, ("other-model",)),
    ]:
        cases.append(Case("paths", f"{method}-{path[:50]}", lambda c, m=method, p=path: rest(c, b"{}", path=p, method=m),
                          expect, needles))
    for kind, msg, method, expect, needles in [
        ("model-ready-other", pb.ModelReadyRequest(name="other-model"), "ModelReady", grpc.StatusCode.NOT_FOUND,
         ("other-model",)),
        ("model-ready-version", pb.ModelReadyRequest(name=M, version="1"), "ModelReady", grpc.StatusCode.NOT_FOUND,
         ("version",)),
        ("metadata-other", pb.ModelMetadataRequest(name="other-model"), "ModelMetadata", grpc.StatusCode.NOT_FOUND,
         ("other-model",)),
        ("metadata-version", pb.ModelMetadataRequest(name=M, version="7"), "ModelMetadata",
         grpc.StatusCode.NOT_FOUND, ("version",)),
        ("infer-version", pb.ModelInferRequest(model_name=M, model_version="3"), "ModelInfer",
         grpc.StatusCode.NOT_FOUND, ("version",)),
        ("infer-other", pb.ModelInferRequest(model_name="other-model"), "ModelInfer", grpc.StatusCode.NOT_FOUND,
         ("other-model",)),
    ]:
        cases.append(Case("paths", f"grpc-{kind}", lambda c, m=method, x=msg: grpc_call(c, m, x), {expect}, needles))
    return cases


def gen_protobuf() -> list[Case]:
    rng = random.Random(16)
    valid = grpc_request(params("pb-valid"), tensors()).SerializeToString()
    blobs = [bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 3, 8, 40, 300]))) for _ in range(60)]
    blobs += [valid[:k] for k in (1, 5, 17, 100, len(valid) // 2, len(valid) - 1)]
    blobs += [b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab", b"\x08" * 7]
    cases = []
    for i, data in enumerate(blobs):
        try:
            pb.ModelInferRequest.FromString(data)
            needles: tuple[str, ...] = ()
        except Exception:
            needles = ("malformed", "modelinferrequest")
        cases.append(Case("protobuf", f"infer-{i}", lambda c, d=data: grpc_bytes(c, "ModelInfer", d),
                          {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, needles))
    for method in ("ServerReady", "ModelReady", "ModelMetadata", "RepositoryModelUnload", "ServerMetadata"):
        cases.append(Case("protobuf", f"{method}-garbage", lambda c, m=method: grpc_bytes(c, m, b"\xff\xff\x01"),
                          {grpc.StatusCode.INVALID_ARGUMENT}, ("malformed",)))
    return cases


def gen_shapes() -> list[Case]:
    cases = []
    for name in ("images", "state"):
        for label, bad in [("float", 1.0), ("string", "1"), ("true", True), ("minus-one", -1), ("null", None),
                           ("half", 1.5), ("list", [1]), ("object", {}), ("big-float", 1e300),
                           ("negative-zero", -0.0)]:
            def body(bad=bad, name=name):
                b = json_body(params("fz-shape"))
                spec = next(s for s in b["inputs"] if s["name"] == name)
                spec["shape"] = [bad, *spec["shape"][1:]]
                return b
            cases.append(Case("shape", f"json-{name}-{label}", lambda c, b=body: rest(c, b()), {400},
                              (name, "shape")))

            def bbody(bad=bad, name=name):
                raw, n = binary_body(params("fz-shape"))
                head = orjson.loads(raw[:n])
                spec = next(s for s in head["inputs"] if s["name"] == name)
                spec["shape"] = [bad, *spec["shape"][1:]]
                return binary(head, [F0.tobytes(), S0.tobytes()])
            cases.append(Case("shape", f"binary-{name}-{label}", lambda c, b=bbody: rest(c, b()[0], json_length=b()[1]),
                              {400}, (name, "shape")))
        for label, dims in [("zero", 0), ("negative", -1), ("huge", 2**40)]:
            def msg(dims=dims, name=name):
                m = grpc_request(params("fz-shape"))
                spec = next(s for s in m.inputs if s.name == name)
                spec.shape[0] = dims
                return m
            cases.append(Case("shape", f"grpc-{name}-{label}", lambda c, m=msg: grpc_call(c, "ModelInfer", m()),
                              {grpc.StatusCode.INVALID_ARGUMENT}, (name,)))
    return cases


BAD_DATATYPES = ["uint8", "fp32", "Uint8", "UINT08", "INT8", "FP64", "BYTES", "STRING", "", "Q" * 300, "FP16", "INT64",
                 "BOOL"]


def gen_datatypes() -> list[Case]:
    cases = []
    for name in ("images", "state"):
        for dt in BAD_DATATYPES:
            label = f"{name}-{dt[:10] or 'empty'}"
            cases.append(Case("datatype", f"json-{label}",
                              lambda c, n=name, d=dt: rest(c, with_input(json_body(params("fz-dt")), n, datatype=d)),
                              {400}, (name, "datatype")))

            def bbody(n=name, d=dt):
                raw, k = binary_body(params("fz-dt"))
                head = orjson.loads(raw[:k])
                next(s for s in head["inputs"] if s["name"] == n)["datatype"] = d
                return binary(head, [F0.tobytes(), S0.tobytes()])
            cases.append(Case("datatype", f"binary-{label}", lambda c, b=bbody: rest(c, b()[0], json_length=b()[1]),
                              {400}, (name, "datatype")))

            def msg(n=name, d=dt):
                m = grpc_request(params("fz-dt"))
                next(s for s in m.inputs if s.name == n).datatype = d
                return m
            cases.append(Case("datatype", f"grpc-{label}", lambda c, m=msg: grpc_call(c, "ModelInfer", m()),
                              {grpc.StatusCode.INVALID_ARGUMENT}, (name, "datatype")))
            cases.append(Case("datatype", f"tritonclient-grpc-{label}",
                              lambda c, n=name, d=dt: tg_infer(c, params("fz-dt"), datatype={n: d}),
                              {grpc.StatusCode.INVALID_ARGUMENT}, (name, "datatype")))
            cases.append(Case("datatype", f"tritonclient-http-{label}",
                              lambda c, n=name, d=dt: th_infer(c, params("fz-dt"), datatype={n: d}),
                              {400}, (name, "datatype")))
    return cases


def gen_values() -> list[Case]:
    cases = []
    for label, bad in [("1.5", 1.5), ("minus-1", -1), ("256", 256), ("true", True), ("string", "1"), ("null", None),
                       ("1e10", 1e10), ("list", [1]), ("object", {"v": 1}), ("0.0001", 0.0001)]:
        def body(bad=bad):
            b = json_body(params("fz-val"))
            b["inputs"][0]["data"][5] = bad
            return b
        cases.append(Case("values", f"uint8-{label}", lambda c, b=body: rest(c, b()), {400}, ("images",)))
    for label, bad in [("string", "a"), ("true", True), ("null", None), ("list", [1.0]), ("object", {}),
                       ("1e39", 1e39)]:
        def sbody(bad=bad):
            b = json_body(params("fz-val"))
            b["inputs"][1]["data"][2] = bad
            return b
        cases.append(Case("values", f"fp32-{label}", lambda c, b=sbody: rest(c, b()), {400}, ("state",)))
    for label, contents in [("fp32-contents", pb.InferTensorContents(fp32_contents=[1.0] * 6144)),
                            ("int-contents", pb.InferTensorContents(int_contents=[300] * 6144)),
                            ("both", pb.InferTensorContents(uint_contents=[1] * 6144))]:
        def msg(contents=contents, label=label):
            m = grpc_request(params("fz-val"), {"state": ("FP32", S0)})
            spec = m.inputs.add(name="images", datatype="UINT8", shape=[1, 2, 32, 32, 3])
            spec.contents.CopyFrom(contents)
            if label == "both":
                m.raw_input_contents.append(F0.tobytes())
            return m
        cases.append(Case("values", f"grpc-{label}", lambda c, m=msg: grpc_call(c, "ModelInfer", m()),
                          {grpc.StatusCode.INVALID_ARGUMENT}, ("images",)))
    return cases


def gen_binary_sizes() -> list[Case]:
    cases = []
    for name, arr in (("images", F0), ("state", S0)):
        for label, bad in [("string", str(arr.nbytes)), ("float", arr.nbytes + 0.5), ("negative", -1), ("true", True),
                           ("null", None), ("list", [arr.nbytes]), ("empty", ""), ("huge", 10**20)]:
            def bbody(n=name, b=bad):
                raw, k = binary_body(params("fz-bds"))
                head = orjson.loads(raw[:k])
                next(s for s in head["inputs"] if s["name"] == n)["parameters"]["binary_data_size"] = b
                return binary(head, [F0.tobytes(), S0.tobytes()])
            cases.append(Case("binary_data_size", f"{name}-{label}",
                              lambda c, b=bbody: rest(c, b()[0], json_length=b()[1]), {400},
                              (name, "binary_data_size")))
    return cases


def gen_header_length() -> list[Case]:
    cases = []
    for body_kind in ("reset", "step"):
        for label, fmt in [("plus", "+{n}"), ("minus", "-{n}"), ("inner-space", "{n} 1"), ("list", "{n},{n}"),
                           ("hex", "0x{n:x}"), ("float", "{n}.0"), ("exp", "{n}e0"), ("empty", ""), ("word", "abc"),
                           ("huge", "9" * 30), ("zero", "0"), ("past-end", "{past}"), ("one-short", "{short}")]:
            def call(c, fmt=fmt, body_kind=body_kind):
                p = params("fz-hdr") if body_kind == "reset" else {"session_id": "fz-hdr-missing"}
                raw, n = binary_body(p) if body_kind == "reset" else binary_body(p, {"state": ("FP32", S0)})
                value = fmt.format(n=n, past=len(raw) + 1, short=n - 1)
                return rest(c, raw, headers={**AUTH, "Inference-Header-Content-Length": value,
                                             "Content-Type": "application/octet-stream"})
            cases.append(Case("header_length", f"{body_kind}-{label}", call, {400},
                              ("inference-header-content-length",)))
    return cases


def gen_trailing() -> list[Case]:
    cases = []
    for extra in (1, 7, 1000, 6144):
        cases.append(Case("trailing", f"binary-{extra}",
                          lambda c, e=extra: rest(c, binary_body(params("fz-trail"), extra=b"\0" * e)[0],
                                                  json_length=binary_body(params("fz-trail"))[1]),
                          {400}, ("trailing",)))
    for label, tail in [("garbage", b"xyz"), ("second-object", b'{"inputs": []}'), ("nul", b"\0")]:
        cases.append(Case("trailing", f"json-{label}", lambda c, t=tail: rest(
            c, orjson.dumps(json_body(params("fz-trail"))) + t, headers={**AUTH, "Content-Type": "application/json"}),
            {400}, ("json",)))
    cases.append(Case("trailing", "grpc-extra-raw-content",
                      lambda c: grpc_call(c, "ModelInfer", _extra_raw()), {grpc.StatusCode.INVALID_ARGUMENT},
                      ("raw_input_contents",)))
    return cases


def _extra_raw() -> pb.ModelInferRequest:
    m = grpc_request(params("fz-trail"))
    m.raw_input_contents.append(b"\0" * 16)
    return m


UNKNOWN_PARAMS = ["foo", "sessionid", "Session_id", "resetx", "sequence_id", "priority", "timeout", "z" * 500]


def gen_params() -> list[Case]:
    cases = []
    for key in UNKNOWN_PARAMS:
        label, needle = key[:12], key[:20].lower()
        cases.append(Case("params", f"json-{label}", lambda c, k=key: rest(c, json_body(params("fz-par", **{k: 1}))),
                          {400}, (needle,)))
        cases.append(Case("params", f"binary-{label}", lambda c, k=key: rest(
            c, *_split(binary_body(params("fz-par", **{k: "v"})))), {400}, (needle,)))
        cases.append(Case("params", f"grpc-{label}", lambda c, k=key: grpc_call(
            c, "ModelInfer", grpc_request(params("fz-par", **{k: 3}))), {grpc.StatusCode.INVALID_ARGUMENT}, (needle,)))
        if key not in ("sequence_id", "priority", "timeout"):  # tritonclient reserves these itself
            cases.append(Case("params", f"tritonclient-grpc-{label}",
                              lambda c, k=key: tg_infer(c, params("fz-par", **{k: "v"})),
                              {grpc.StatusCode.INVALID_ARGUMENT}, (needle,)))
            cases.append(Case("params", f"tritonclient-http-{label}",
                              lambda c, k=key: th_infer(c, params("fz-par", **{k: "v"})), {400}, (needle,)))
    for label, mutate, needle in [
        ("input-parameter", lambda b: b["inputs"][0].setdefault("parameters", {}).update(foo=1), "foo"),
        ("top-level-field", lambda b: b.update(bogus_field=1), "bogus_field"),
        ("unknown-output", lambda b: b.update(outputs=[{"name": "bogus_out"}]), "bogus_out"),
        ("output-parameter", lambda b: b.update(outputs=[{"name": "actions", "parameters": {"qux": 1}}]), "qux"),
        ("input-field", lambda b: b["inputs"][1].update(colour="red"), "colour"),
    ]:
        def body(mutate=mutate):
            b = json_body(params("fz-par"))
            mutate(b)
            return b
        cases.append(Case("params", f"json-{label}", lambda c, b=body: rest(c, b()), {400}, (needle,)))
    return cases


def _split(body_and_length: tuple[bytes, int]) -> tuple:
    return body_and_length[0], None, INFER, "POST", body_and_length[1]


def gen_long_strings() -> list[Case]:
    long = "L" * 10_000
    cases = []
    for key in ("session_id", "instruction", "model_version", "cameras", "mode", "session_token"):
        cases.append(Case("long", f"json-{key}", lambda c, k=key: rest(c, json_body({**params("fz-long"), k: long})),
                          {400, 403}, (key,)))
        cases.append(Case("long", f"grpc-{key}", lambda c, k=key: grpc_call(
            c, "ModelInfer", grpc_request({**params("fz-long"), k: long})),
            {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}, (key,)))
    for label, mutate in [("input-name", lambda b: b["inputs"][0].update(name=long)),
                          ("datatype", lambda b: b["inputs"][0].update(datatype=long)),
                          ("param-name", lambda b: b["parameters"].update({long: 1})),
                          ("id", lambda b: b.update(id=long * 10))]:
        def body(mutate=mutate):
            b = json_body(params("fz-long"))
            mutate(b)
            return b
        cases.append(Case("long", f"json-{label}", lambda c, b=body: rest(c, b()), {400}, ()))
    return cases


def _chunks(total: int, size: int):
    sent = 0
    while sent < total:
        yield b"\0" * min(size, total - sent)
        sent += size


def gen_chunked() -> list[Case]:
    cases = []
    for total in (int(1.1 * 2**20), 2 * 2**20, 5 * 2**20):
        for size in (64 * 1024, 2**20):
            cases.append(Case("chunked", f"{total}-in-{size}", lambda c, t=total, s=size: _chunked(c, _chunks(t, s)),
                              {413}, ("too large",)))

    def small(c):
        raw = orjson.dumps(json_body(params(c.sid("fz-chunk"))))
        return _chunked(c, (raw[i:i + 4096] for i in range(0, len(raw), 4096)), {"Content-Type": "application/json"})
    cases.append(Case("chunked", "under-the-limit", small, {200}))
    return cases


def _chunked(c: Ctx, chunks, headers: dict | None = None) -> tuple[int, str]:
    r = c.http.post(INFER, content=chunks, headers={**AUTH, **(headers or {})})
    return r.status_code, _message(r)


def gen_content_type() -> list[Case]:
    cases = []
    for label, ct in [("none", None), ("text-plain", "text/plain"), ("octet-stream", "application/octet-stream"),
                      ("form", "application/x-www-form-urlencoded"), ("json-charset", "application/json; charset=utf-8")]:
        def call(c, ct=ct):
            h = dict(AUTH)
            if ct:
                h["Content-Type"] = ct
            return rest(c, orjson.dumps(json_body(params(c.sid("fz-ct")))), headers=h)
        cases.append(Case("content_type", label, call, {200}))
    cases.append(Case("content_type", "tritonclient-http-json", _triton_json_episode, {"ok"}))
    cases.append(Case("content_type", "not-json-no-header",
                      lambda c: rest(c, b"\x00\x01binary?", headers=AUTH), {400}, ("json",)))
    return cases


def _triton_json_episode(c: Ctx) -> tuple[object, str]:
    """tritonclient's HTTP client with JSON tensors (no Content-Type): a reset, then the protocol's empty async step."""
    sid, tok = c.sid("fz-th-json"), "triton-json-token-1"
    got = th_infer(c, {"session_id": sid, "reset": True, "session_token": tok}, binary_data=False)
    if got[0] != "ok":
        return got
    return th_infer(c, {"session_id": sid, "session_token": tok}, ts={})


SCHEMA = [
    ("inputs-object", b'{"inputs": {"name": "images"}}', "inputs"),
    ("inputs-string", b'{"inputs": "images"}', "inputs"),
    ("inputs-null", b'{"inputs": null, "parameters": {"session_id": "s"}}', "inputs"),
    ("inputs-number", b'{"inputs": 5}', "inputs"),
    ("input-not-object", b'{"inputs": [5]}', "inputs[0]"),
    ("input-no-name", b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', "name"),
    ("input-name-number", b'{"inputs": [{"name": 3, "shape": [1], "datatype": "FP32", "data": [1]}]}', "name"),
    ("input-no-shape", b'{"inputs": [{"name": "state", "datatype": "FP32", "data": [1]}]}', "shape"),
    ("input-shape-string", b'{"inputs": [{"name": "state", "shape": "1,4", "datatype": "FP32", "data": [1]}]}',
     "shape"),
    ("input-no-datatype", b'{"inputs": [{"name": "state", "shape": [1, 4], "data": [1, 2, 3, 4]}]}', "datatype"),
    ("input-datatype-number", b'{"inputs": [{"name": "state", "shape": [1, 4], "datatype": 7, "data": [1]}]}',
     "datatype"),
    ("input-data-object", b'{"inputs": [{"name": "state", "shape": [1, 4], "datatype": "FP32", "data": {"a": 1}}]}',
     "data"),
    ("input-data-string", b'{"inputs": [{"name": "state", "shape": [1, 4], "datatype": "FP32", "data": "1234"}]}',
     "data"),
    ("parameters-list", b'{"inputs": [], "parameters": [1, 2]}', "parameters"),
    ("parameters-string", b'{"inputs": [], "parameters": "session_id=a"}', "parameters"),
    ("id-number", b'{"id": 5, "inputs": [], "parameters": {"session_id": "s"}}', "id"),
    ("outputs-object", b'{"inputs": [], "outputs": {"name": "actions"}}', "outputs"),
    ("body-list", b"[1, 2, 3]", "object"),
    ("body-string", b'"hello"', "object"),
    ("body-garbage", b"not json", "json"),
    ("body-empty", b"", "json"),
    ("nested-params", b'{"inputs": [], "parameters": {"session_id": {"a": 1}}}', "session_id"),
]


def gen_schema() -> list[Case]:
    return [Case("schema", label, lambda c, b=body: rest(c, b, headers={**AUTH, "Content-Type": "application/json"}),
                 {400}, (needle,), {"no-union"}) for label, body, needle in SCHEMA]


def gen_metadata() -> list[Case]:
    cases = []
    for size in (17 * 1024, 24 * 1024, 32 * 1024, 64 * 1024, 100 * 1024):
        for method, msg in (("ModelInfer", pb.ModelInferRequest(model_name=M)), ("ServerReady", pb.ServerReadyRequest())):
            md = (*GAUTH, ("x-padding", "p" * size))
            cases.append(Case("metadata", f"{method}-{size // 1024}k", lambda c, m=method, x=msg, d=md: grpc_call(
                c, m, x, metadata=d), {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT},
                ("metadata",)))
    for size in (9 * 1024, 20 * 1024, 70 * 1024):
        cases.append(Case("metadata", f"rest-header-{size // 1024}k",
                          lambda c, s=size: rest(c, b"{}", headers={**AUTH, "X-Padding": "p" * s}), R4 | {431}, ()))
    return cases


def gen_auth() -> list[Case]:
    good = f"Bearer {TOKEN}"
    cases = []
    for label, values, expect, needle in [
        ("duplicate-same", [good, good], 400, "authorization"),
        ("duplicate-different", [good, "Bearer other"], 400, "authorization"),
        ("duplicate-wrong-first", ["Bearer other", good], 400, "authorization"),
        ("triple", [good, good, good], 400, "authorization"),
        ("missing", [], 401, "bearer"),
        ("wrong", ["Bearer nope"], 401, "bearer"),
        ("no-scheme", [TOKEN], 401, "bearer"),
        ("basic", ["Basic Zm9vOmJhcg=="], 401, "bearer"),
        ("bearer-only", ["Bearer"], 401, "bearer"),
        ("prefix", [good[:-1]], 401, "bearer"),
    ]:
        hs = [("Authorization", v) for v in values]
        cases.append(Case("auth", f"rest-{label}", lambda c, h=hs: _rest_headers(c, h), {expect}, (needle,)))
        md = tuple(("authorization", v) for v in values)
        code = grpc.StatusCode.INVALID_ARGUMENT if expect == 400 else grpc.StatusCode.UNAUTHENTICATED
        cases.append(Case("auth", f"grpc-{label}", lambda c, m=md: grpc_call(
            c, "ModelInfer", grpc_request(params("fz-auth")), metadata=m), {code}, (needle,)))
    return cases


def _rest_headers(c: Ctx, headers: list[tuple[str, str]]) -> tuple[int, str]:
    r = c.http.post(INFER, content=orjson.dumps(json_body(params("fz-auth"))),
                    headers=[("Content-Type", "application/json"), *headers])
    return r.status_code, _message(r)


def gen_hijack() -> list[Case]:
    cases = []
    attacks = [("reset-no-token", True, None), ("reset-wrong-token", True, "attacker-token-000"),
               ("reset-prefix-token", True, VICTIM_TOKEN[:-1]), ("step-no-token", False, None),
               ("step-wrong-token", False, "attacker-token-000"), ("step-longer-token", False, VICTIM_TOKEN + "x")]
    for label, reset, token in attacks:
        p = {"session_id": VICTIM, "reset": reset, **({"session_token": token} if token else {})}
        ts = tensors() if reset else {}
        cases.append(Case("hijack", f"rest-{label}", lambda c, p=p, t=ts: rest(c, json_body(p, t)), {403},
                          ("session_id", VICTIM), {"hijack"}))
        cases.append(Case("hijack", f"binary-{label}", lambda c, p=p, t=ts: rest(c, *_split(binary_body(p, t))),
                          {403}, ("session_id", VICTIM), {"hijack"}))
        cases.append(Case("hijack", f"grpc-{label}", lambda c, p=p, t=ts: grpc_call(c, "ModelInfer", grpc_request(p, t)),
                          {grpc.StatusCode.PERMISSION_DENIED}, ("session_id", VICTIM), {"hijack"}))
        cases.append(Case("hijack", f"tritonclient-grpc-{label}", lambda c, p=p, t=ts: tg_infer(c, p, t),
                          {grpc.StatusCode.PERMISSION_DENIED}, ("session_id",), {"hijack"}))
        cases.append(Case("hijack", f"tritonclient-http-{label}", lambda c, p=p, t=ts: th_infer(c, p, t),
                          {403}, ("session_id",), {"hijack"}))
    return cases


CASES = [*gen_repository(), *gen_paths(), *gen_protobuf(), *gen_shapes(), *gen_datatypes(), *gen_values(),
         *gen_binary_sizes(), *gen_header_length(), *gen_trailing(), *gen_params(), *gen_long_strings(),
         *gen_chunked(), *gen_content_type(), *gen_schema(), *gen_metadata(), *gen_auth(), *gen_hijack()]
CLASSES = sorted({c.cls for c in CASES})


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ctx(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    server = PolicyServer(model_dir, ["--max-request-mb", str(LIMIT_MB), "--max-wait-ms", "1"], log, token=TOKEN,
                          env={"LINGBOT_SERVE_TOKEN": TOKEN})
    server.wait_ready()
    http = httpx.Client(base_url=server.rest_url, timeout=60)
    channel = grpc.insecure_channel(server.grpc_url)
    c = Ctx(server, http, channel, GRPCInferenceServiceStub(channel), TritonGRPC(server.grpc_url, dict(GAUTH)),
            thttp.InferenceServerClient(server.rest_url.removeprefix("http://"), network_timeout=60))
    # the victim: a live async session whose owner keeps its token
    assert rest(c, json_body(params(VICTIM, session_token=VICTIM_TOKEN)))[0] == 200
    try:
        yield c
    finally:
        c.tg.close()
        c.th.close()
        channel.close()
        http.close()
        server.stop()


def test_the_suite_covers_every_class_with_enough_cases():
    assert len(CASES) >= 500, len(CASES)
    assert set(CLASSES) >= {"repository", "paths", "protobuf", "shape", "datatype", "values", "binary_data_size",
                            "header_length", "trailing", "params", "long", "chunked", "content_type", "schema",
                            "metadata", "auth", "hijack"}
    transports = {n.split("-")[0] + ("-" + n.split("-")[1] if n.startswith("tritonclient") else "")
                  for n in (c.name for c in CASES)}
    assert {"json", "binary", "grpc", "tritonclient-grpc", "tritonclient-http", "rest"} <= transports


@pytest.mark.parametrize("case", CASES, ids=[f"{c.cls}-{c.name}" for c in CASES])
def test_fuzz_case(ctx, case: Case):
    status, message = case.call(ctx)
    assert not (isinstance(status, int) and status >= 500), (status, message[:500])
    assert status not in SERVER_ERRORS, (status, message[:500])
    assert status in case.expect, (status, message[:500])
    if status not in (200, OK, "ok"):
        assert len(message) <= MAX_MESSAGE, f"{len(message)} chars: {message[:200]}..."
        for needle in case.needles:
            assert needle.lower() in message.lower(), message[:500]
        if "no-union" in case.tags:
            assert "input_value" not in message and "union" not in message.lower(), message[:500]


# ------------------------------------------------------------------------------------------------- afterwards
def _ready(c: Ctx) -> dict[str, bool]:
    return {
        "rest-server": c.http.get("/v2/health/ready").status_code == 200,
        "rest-model": c.http.get(f"/v2/models/{M}/ready").status_code == 200,
        "grpc-server": c.stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready,
        "grpc-model": c.stub.ModelReady(pb.ModelReadyRequest(name=M), timeout=10).ready,
        "tritonclient-grpc": c.tg.call({"op": "ready"}).get("ready", False),
        "tritonclient-http": c.th.is_server_ready() and c.th.is_model_ready(M),
    }


def test_still_serving_and_ready_after_the_fuzz(ctx):
    """The model survived every repository call: ready on every probe, and inference works on both transports."""
    assert all(_ready(ctx).values()), _ready(ctx)
    sid = ctx.sid("after")
    status, text = rest(ctx, json_body(params(sid, session_token="after-token-123")))
    assert status == 200, text
    body = orjson.loads(ctx.http.post(INFER, content=orjson.dumps(json_body(params(ctx.sid("after")))),
                                     headers=AUTH).content)
    assert body["parameters"]["chunk_index"] == 0 and body["parameters"]["session_token"]
    got = tg_infer(ctx, {"session_id": sid, "session_token": "after-token-123"}, ts={})
    assert got == ("ok", "accepted"), got
    assert ctx.server.proc.poll() is None


def test_the_hijacked_session_stays_its_owners(ctx):
    """Every hijack case was refused; the owner's next step (the empty async step after its reset) still works."""
    r = ctx.http.post(INFER, content=orjson.dumps(json_body({"session_id": VICTIM, "session_token": VICTIM_TOKEN}, {})),
                      headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["chunk_index"] == 1


def test_rejections_log_one_warning_line_and_no_traceback(ctx):
    log = ctx.server.log.read_text()
    assert "Traceback" not in log
    assert len(re.findall(r"WARNING.*rejected", log)) >= 100
    assert len(log) < 2_000_000, len(log)


def test_readiness_is_true_only_while_the_model_is_loaded(model_dir):
    """REST and gRPC readiness (server and model) follow the model: false before it loads and after it stops."""
    import asyncio

    from kserve.model_repository import ModelRepository

    from services.policy_server.grpc_api import PolicyService
    from services.policy_server.predictor import LingBotPredictor
    from services.policy_server.rest import Routes
    from services.policy_server.settings import ServeSettings

    predictor = LingBotPredictor(ServeSettings(model=str(model_dir), poll_interval_s=0))
    registry = ModelRepository(models_dir="/nonexistent")
    registry.update(predictor)
    routes, service = Routes(registry), PolicyService(registry)

    def ready() -> bool:
        answers = {asyncio.run(routes.server_ready()).status_code == 200,
                   asyncio.run(routes.model_ready(M)).status_code == 200,
                   asyncio.run(service.server_ready(pb.ServerReadyRequest(), None)).ready,
                   asyncio.run(service.model_ready(pb.ModelReadyRequest(name=M), None)).ready}
        assert len(answers) == 1, answers  # every probe agrees
        return answers.pop()

    assert not ready()
    predictor.load()
    try:
        assert ready()
    finally:
        predictor.stop()
    assert not ready()
