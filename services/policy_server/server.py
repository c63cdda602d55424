"""kserve's ModelServer, bound to one host, with bearer auth and a request size limit on both transports.

kserve 0.21 binds REST to 0.0.0.0 (``uvicorn.Config(host="0.0.0.0")``) and gRPC to ``[::]``; a policy endpoint on
a robot network should listen where it is told (default 127.0.0.1). The REST guard is an ASGI middleware (400 for a
duplicated Authorization header, 401 without the token, 413 beyond the size limit, chunked bodies included); REST's
infer, version, explain, repository and readiness routes are the server's own (``rest``), and gRPC is served by
``grpc_api`` (its ``Guard`` interceptor: metadata size, one authorization entry, the token). Health, metadata and
/metrics stay open for probes and scrapers; inference and repository calls need the token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from concurrent import futures

import orjson
from grpc import aio
from kserve import InferInput, model_server
from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING, INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput
from kserve.logging import KSERVE_LOGGER_NAME
from kserve.model import BaseKServeModel
from kserve.model_server import ModelServer
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.infer_type import InferRequest
from kserve.protocol.rest.server import RESTServer

from services.policy_server.grpc_api import Guard, PolicyService
from services.policy_server.guards import show
from services.policy_server.rest import Routes, add_exception_handlers

log = logging.getLogger(__name__)


def token_ok(header: str | None, token: str | None) -> bool:
    """True without a configured token, or when ``header`` is ``Bearer <token>`` (constant-time compare)."""
    if not token:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


class _StrictDataPlane(DataPlane):
    """REST V2 decoding that keeps binary tensors binary and answers malformed bodies with 400.

    kserve's ``InferRequest.from_bytes`` turns every binary tensor into a Python list (seconds for a chunk of
    camera frames) and lets malformed bodies escape as KeyError/TypeError (HTTP 500). Here the tensors keep their
    bytes (``services.protocol`` decodes them with ``np.frombuffer``) and every decoding failure is ``InvalidInput``.
    """

    def decode_inference_request(self, body, headers, model_name) -> InferRequest:
        try:
            length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER) if isinstance(body, bytes) else None
            if length is not None:
                return _binary_request(body, int(length), model_name)
            return super().decode_inference_request(body, headers, model_name)
        except InvalidInput:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise InvalidInput(f"malformed V2 request body: {type(err).__name__}: {err}") from None


def _binary_request(body: bytes, json_length: int, model_name: str) -> InferRequest:
    """A V2 binary-extension body: JSON header of ``json_length`` bytes, then the tensors' bytes in input order."""
    try:
        head = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as err:
        raise InvalidInput(f"unrecognized request format: {err}") from None
    offset, inputs = json_length, []
    for spec in head["inputs"]:
        params = spec.get("parameters") or {}
        tensor = InferInput(spec["name"], list(spec["shape"]), spec["datatype"], parameters=params)
        if spec.get("data") is not None:
            tensor.data = spec["data"]
        elif "binary_data_size" in params:
            end = offset + int(params["binary_data_size"])
            if end > len(body):
                raise InvalidInput(f"input {tensor.name!r}: binary data runs past the end of the body")
            tensor._raw_data, offset = body[offset:end], end
        else:
            raise InvalidInput(f"input {tensor.name!r} has neither 'data' nor 'binary_data_size'")
        inputs.append(tensor)
    return InferRequest(model_name, inputs, request_id=head.get("id"), parameters=head.get("parameters"))


class _Guard:
    """ASGI middleware on POST requests (inference and repository calls): exactly one Authorization header with the
    bearer token, and a body within the size limit (413, also for chunked bodies, which are read here first)."""

    def __init__(self, app, token: str | None, max_bytes: int):
        self.app, self.token, self.max_bytes = app, token, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers: dict[str, list[str]] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        auth = headers.get("authorization", [])
        if len(auth) > 1:
            return await _reply(send, 400, f"header Authorization appears {len(auth)} times: send exactly one", scope)
        if not token_ok(auth[0] if auth else None, self.token):
            return await _reply(send, 401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                                scope, [(b"www-authenticate", b"Bearer")])
        length = headers.get("content-length")
        if length is not None:
            if len(length) > 1 or not length[0].isdigit() or int(length[0]) > self.max_bytes:
                return await _reply(send, 413, f"request too large: {show(','.join(length))} bytes exceed the limit "
                                               f"of {self.max_bytes}", scope)
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read the body here, answer 413 as soon as it passes the limit
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await _reply(send, 413, f"request too large: more than the limit of {self.max_bytes} bytes "
                                               "(chunked body)", scope)
            if not message.get("more_body", False):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _reply(send, status: int, error: str, scope, extra: list[tuple[bytes, bytes]] = ()) -> None:
    log.warning("rejected %s %s: %d %s", scope["method"], scope["path"][:120], status, error)
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": body})


class _RESTServer(RESTServer):
    def __init__(self, *args, host: str, token: str | None, max_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host = host
        self._guard = (token, max_bytes)

    def _register_endpoints(self, app) -> None:
        Routes(self.dataplane.model_registry).register(app)  # first: these win over kserve's routes of the same path
        super()._register_endpoints(app)

    def _add_exception_handlers(self, app) -> None:
        super()._add_exception_handlers(app)
        add_exception_handlers(app)

    def _add_middlewares(self, app) -> None:
        super()._add_middlewares(app)
        app.add_middleware(_Guard, token=self._guard[0], max_bytes=self._guard[1])


class _GRPCServer(GRPCServer):
    """The V2 gRPC service (``grpc_api``) on ``host`` (kserve's server binds ``[::]``) with the guard and our message
    size limit."""

    def __init__(self, *args, host: str, token: str | None, max_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._host, self._token, self._max_bytes = host, token, max_bytes

    async def start(self, max_workers):
        # the transport cap is twice the limit: requests in between reach the predictor, which answers
        # INVALID_ARGUMENT naming the limit; beyond it gRPC itself answers RESOURCE_EXHAUSTED. Metadata is taken up
        # to 1 MiB so that the guard, not the transport ("Stream removed"), answers beyond METADATA_LIMIT.
        cap = 2 * self._max_bytes + (1 << 20)
        self._server = aio.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  interceptors=[Guard(self._token, token_ok)],
                                  options=[("grpc.max_send_message_length", cap),
                                           ("grpc.max_receive_message_length", cap),
                                           ("grpc.max_metadata_size", 1 << 20),
                                           ("grpc.absolute_max_metadata_size", 1 << 20)])
        self._server.add_generic_rpc_handlers((PolicyService(self._data_plane.model_registry).handler(),))
        host = f"[{self._host}]" if ":" in self._host and not self._host.startswith("[") else self._host
        if self._server.add_insecure_port(f"{host}:{self._port}") == 0:
            raise RuntimeError(f"gRPC could not bind {host}:{self._port}")
        log.info("gRPC server on %s:%s", host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class PolicyModelServer(ModelServer):
    """``kserve.ModelServer`` listening on ``host`` only, with optional bearer auth and a request size limit.

    Sessions live in this process, so it runs one REST worker (kserve's multi-process mode would split them).
    """

    def __init__(self, *, host: str = "127.0.0.1", token: str | None = None, max_request_bytes: int = 64 << 20,
                 **kwargs):
        if kwargs.get("workers", 1) != 1:
            raise ValueError("the policy server keeps robot sessions in process memory: --workers must be 1 "
                             "(scale out with replicas and session affinity instead)")
        super().__init__(**kwargs)
        self.host, self.token, self.max_request_bytes = host, token, max_request_bytes
        # this package's log lines (rejections at WARNING, switches at INFO) in kserve's format, beside its own
        ours, theirs = logging.getLogger("services"), logging.getLogger(KSERVE_LOGGER_NAME)
        ours.handlers, ours.propagate = list(theirs.handlers), False
        ours.setLevel(logging.INFO)
        self.dataplane = _StrictDataPlane(model_registry=self.registered_models)

    def start(self, models: list[BaseKServeModel]) -> None:
        """Register ``models`` and serve REST (and gRPC) until stopped; returns after shutdown."""
        self._register_and_check_atleast_one_model_is_ready(models)
        guard = {"host": self.host, "token": self.token, "max_bytes": self.max_request_bytes}
        self._rest_server = _RESTServer(
            FASTAPI_APP_IMPORT_STRING, self.dataplane, self.model_repository_extension, self.http_port,
            access_log_format=self.access_log_format, workers=1, grace_period=self.grace_period,
            event_loop=self.event_loop, timeout_keep_alive=self.timeout_keep_alive, ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile, **guard)
        self.servers.append(self._rest_server.start())
        if self.enable_grpc:
            self._grpc_server = _GRPCServer(self.grpc_port, self.dataplane, self.model_repository_extension,
                                            kwargs=vars(model_server.args), grace_period=self.grace_period, **guard)
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())

    def stop(self, sig: int) -> None:
        """Stop REST (kserve stops only its multi-process REST server) and gRPC, then the models."""
        if self._rest_server is not None:
            self._rest_server._server.should_exit = True
        super().stop(sig)
