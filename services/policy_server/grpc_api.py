"""The policy server's gRPC service (``inference.GRPCInferenceService``, the V2 protocol) in place of kserve's servicer.

kserve's servicer lets a malformed message end as UNKNOWN ("Unexpected DecodeError"), unloads the model on
``RepositoryModelUnload`` (INTERNAL, model gone, readiness still true), and names no input when a datatype is
unknown. Here every method deserialises its request itself, every rejection is a clear code (INVALID_ARGUMENT,
NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, RESOURCE_EXHAUSTED) with a message naming the field, logged as one
WARNING line; INTERNAL is left for the model failing (``InferenceError``: e.g. non-finite actions; its session is
closed) and for bugs. ``Guard`` checks metadata size, a single ``authorization`` entry and the bearer token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import kserve
from grpc import aio
from kserve.errors import InferenceError, InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

from services.policy_server.guards import METADATA_LIMIT, Forbidden, NotFound, grpc_request, message_of, show, status_of
from services.policy_server.rest import REPOSITORY_REFUSED, serving

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
GUARDED = ("/ModelInfer", "/RepositoryModelLoad", "/RepositoryModelUnload")


class _Malformed:
    def __init__(self, type_name: str, err: Exception):
        self.type_name, self.err = type_name, err


def _deserializer(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except Exception as err:  # DecodeError and friends: answered as INVALID_ARGUMENT by the handler
            return _Malformed(message_type.__name__, err)
    return parse


class PolicyService:
    """The V2 gRPC methods over kserve's model registry; ``handler()`` is the generic handler to add to a server."""

    def __init__(self, registry):
        self.registry = registry

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "RepositoryModelLoad": (self.repository_load, pb.RepositoryModelLoadRequest,
                                    pb.RepositoryModelLoadResponse),
            "RepositoryModelUnload": (self.repository_unload, pb.RepositoryModelUnloadRequest,
                                      pb.RepositoryModelUnloadResponse),
        }
        return grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(_answering(name, fn), request_deserializer=_deserializer(req),
                                                      response_serializer=resp.SerializeToString)
            for name, (fn, req, resp) in methods.items()})

    # ------------------------------------------------------------------------------------------------ methods
    def _model(self, name: str, version: str = ""):
        if version:
            raise NotFound(f"model versions are not addressable here: {show(name)} serves the version its registry "
                           f"alias points at; send an empty version (got {show(version, 16)})")
        model = self.registry.get_model(name)
        if model is None:
            raise NotFound(f"model {show(name)} is not served here")
        return model

    async def server_live(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request, context):
        models = list(self.registry.get_models().values())
        return pb.ServerReadyResponse(ready=bool(models) and all(serving(m) for m in models))

    async def model_ready(self, request, context):
        return pb.ModelReadyResponse(ready=serving(self._model(request.name, request.version)))

    async def server_metadata(self, request, context):
        return pb.ServerMetadataResponse(name="kserve", version=kserve.__version__, extensions=[])

    async def model_metadata(self, request, context):
        model = self._model(request.name, request.version)
        if not serving(model):
            raise ModelNotReady(request.name)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, platform="",
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in model.get_input_types()],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                     for t in model.get_output_types()])

    async def model_infer(self, request: pb.ModelInferRequest, context):
        model = self._model(request.model_name, request.model_version)
        if not serving(model):
            raise ModelNotReady(request.model_name)
        received_at = time.perf_counter()
        response = await model.predict(grpc_request(request), received_at=received_at)
        return response.to_grpc()

    async def repository_load(self, request, context):
        raise Forbidden(REPOSITORY_REFUSED.format(op="load", name=show(request.model_name)))

    async def repository_unload(self, request, context):
        raise Forbidden(REPOSITORY_REFUSED.format(op="unload", name=show(request.model_name)))


def _answering(method: str, fn: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    """``fn`` with every failure answered as a status code and one log line (a traceback only for bugs)."""

    async def handle(request, context: aio.ServicerContext):
        try:
            if isinstance(request, _Malformed):
                raise InvalidInput(f"malformed protobuf: the body is not a {request.type_name} "
                                   f"({str(request.err)[:120]})")
            return await fn(request, context)
        except (InvalidInput, ModelNotFound) as err:
            code, message = status_of(err)[1], message_of(err)
            log.warning("rejected gRPC %s: %s %s", method, code.name, message)
        except ModelNotReady as err:
            code, message = grpc.StatusCode.UNAVAILABLE, f"{err}: retry"
            log.warning("gRPC %s while the model is not loaded: %s", method, err)
        except InferenceError as err:  # the model failed (logged where it happened); documented as INTERNAL
            code, message = grpc.StatusCode.INTERNAL, message_of(err)
        except Exception as err:
            log.exception("gRPC %s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(err).__name__}"
        await context.abort(code, message)

    return handle


class Guard(aio.ServerInterceptor):
    """Every call: metadata within ``METADATA_LIMIT``; inference and repository calls: exactly one ``authorization``
    entry, ``Bearer <token>`` (when a token is configured)."""

    def __init__(self, token: str | None, token_ok: Callable[[str | None, str | None], bool]):
        self.token, self._token_ok = token, token_ok

    @staticmethod
    def _deny(code: grpc.StatusCode, message: str, method: str):
        async def deny(request, context):
            log.warning("rejected gRPC %s: %s %s", method.rsplit("/", 1)[-1], code.name, message)
            await context.abort(code, message)
        return grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        metadata = list(details.invocation_metadata or ())
        size = sum(len(k) + len(v) for k, v in metadata)
        if size > METADATA_LIMIT:
            return self._deny(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request metadata of {size} bytes exceeds the "
                              f"limit of {METADATA_LIMIT} bytes", details.method)
        if details.method.endswith(GUARDED):
            auth = [v for k, v in metadata if k.lower() == "authorization"]
            if len(auth) > 1:
                return self._deny(grpc.StatusCode.INVALID_ARGUMENT, f"metadata authorization appears {len(auth)} "
                                  "times: send exactly one", details.method)
            if self.token and not self._token_ok(auth[0] if auth else None, self.token):
                return self._deny(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token: send metadata "
                                  "'authorization: Bearer <token>'", details.method)
        return await continuation(details)
