"""The policy server's own REST routes, registered ahead of kserve's generic ones, and its error answers.

kserve's V2 infer route decodes with pydantic (coercing ``"1"`` to a shape dim, answering 422 with union
alternatives, reading a Content-Type-less JSON body as binary) and its repository routes let any token holder unload
the model while readiness stays true. Here:

- ``POST /v2/models/{m}/infer``: ``guards.rest_request`` (JSON or the binary extension), the predictor, a V2
  response (binary tensors when asked);
- ``/v2/models/{m}/versions/...`` and ``/v1/models/{m}:explain``: 404 (one version, the alias's, is served; there
  is no explainer);
- ``POST /v2/repository/models/{m}/load|unload``: 403 (the model follows its registry alias);
- ``/v2/health/ready``, ``/v2/models/{m}/ready``: 200 only while the model is loaded and its engine runs, else 503.

Every rejection answers ``{"error": ...}`` with a 4xx and logs one WARNING line, no traceback.
"""

from __future__ import annotations

import logging
import time

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from kserve.errors import InvalidInput, ModelNotFound, ModelNotReady
from kserve.protocol.infer_type import InferResponse, to_http_parameters

from services.policy_server.guards import Forbidden, NotFound, message_of, rest_request, show, status_of

log = logging.getLogger(__name__)

REPOSITORY_REFUSED = ("repository {op} is refused: model {name} follows its registry alias (hot swap) and cannot be "
                      "loaded or unloaded by clients")


def serving(model) -> bool:
    """Whether ``model`` is loaded and can answer inference right now (what readiness reports)."""
    check = getattr(model, "serving", None)
    return bool(model.ready if check is None else check)


class Routes:
    """The routes above, bound to kserve's model registry (``DataPlane.model_registry``)."""

    def __init__(self, registry):
        self.registry = registry

    def model(self, name: str):
        model = self.registry.get_model(name)
        if model is None:
            raise NotFound(f"model {show(name)} is not served here")
        return model

    def register(self, app: FastAPI) -> None:
        r = APIRouter()
        r.add_api_route("/v2/health/ready", self.server_ready, methods=["GET"])
        r.add_api_route("/v2/models/{model_name}/ready", self.model_ready, methods=["GET"])
        r.add_api_route("/v2/models/{model_name}/infer", self.infer, methods=["POST"])
        for tail, methods in (("", ["GET"]), ("/ready", ["GET"]), ("/infer", ["POST"])):
            r.add_api_route("/v2/models/{model_name}/versions/{version}" + tail, self.version, methods=methods)
        r.add_api_route("/v1/models/{model_name}:explain", self.explain, methods=["POST"])
        for op in ("load", "unload"):
            r.add_api_route(f"/v2/repository/models/{{model_name}}/{op}", getattr(self, op), methods=["POST"])
        app.include_router(r)

    async def server_ready(self):
        models = list(self.registry.get_models().values())
        ready = bool(models) and all(serving(m) for m in models)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def model_ready(self, model_name: str):
        ready = serving(self.model(model_name))
        return JSONResponse({"name": model_name, "ready": ready}, status_code=200 if ready else 503)

    async def version(self, model_name: str, version: str):
        raise NotFound(f"model versions are not addressable here: {show(model_name)} serves the version its registry "
                       f"alias points at (see model_version in responses); use /v2/models/{{name}}[/ready|/infer] "
                       f"without /versions/{show(version, 16)}")

    async def explain(self, model_name: str):
        raise NotFound(f"no explainer: model {show(model_name)} answers V2 infer only (explain is not served)")

    async def load(self, model_name: str):
        raise Forbidden(REPOSITORY_REFUSED.format(op="load", name=show(model_name)))

    async def unload(self, model_name: str):
        raise Forbidden(REPOSITORY_REFUSED.format(op="unload", name=show(model_name)))

    async def infer(self, model_name: str, request: Request):
        model = self.model(model_name)
        if not serving(model):
            raise ModelNotReady(model_name)
        body = await request.body()
        received_at = time.perf_counter()
        infer_request, binary = rest_request(body, request.headers, model_name)
        response = await model.predict(infer_request, received_at=received_at)
        return encode(response, binary)


def encode(response: InferResponse, binary: bool) -> Response:
    """A V2 REST response: JSON, or with ``binary`` the JSON header then the outputs' bytes (binary extension)."""
    outputs, blobs = [], []
    for out in response.outputs:
        array = out.as_numpy()
        spec = {"name": out.name, "shape": list(array.shape), "datatype": out.datatype}
        if binary:
            blob = array.tobytes()
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = array.ravel().tolist()
        outputs.append(spec)
    head = {"id": response.id, "model_name": response.model_name, "model_version": response.model_version,
            "outputs": outputs}
    if response.parameters:
        head["parameters"] = to_http_parameters(response.parameters)
    body = orjson.dumps(head)
    if not binary:
        return Response(body, media_type="application/json")
    return Response(body + b"".join(blobs), media_type="application/octet-stream",
                    headers={"inference-header-content-length": str(len(body))})


def rejection(request: Request, status: int, message: str) -> JSONResponse:
    log.warning("rejected %s %s: %d %s", request.method, request.url.path[:120], status, message)
    return JSONResponse({"error": message}, status_code=status)


async def _invalid(request: Request, err: Exception) -> JSONResponse:
    return rejection(request, status_of(err)[0], message_of(err))


async def _not_ready(request: Request, err: ModelNotReady) -> JSONResponse:
    return rejection(request, 503, f"model {show(getattr(err, 'model_name', '?'))} is not loaded (yet): retry")


async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
    first = (err.errors() or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
    return rejection(request, 400, f"invalid {where}: {str(first.get('msg', 'malformed'))[:200]}")


def add_exception_handlers(app: FastAPI) -> None:
    """After kserve's: rejections answer 4xx with one WARNING line (kserve logs each with a traceback at ERROR)."""
    for cls in (InvalidInput, Forbidden, NotFound, ModelNotFound):
        app.add_exception_handler(cls, _invalid)
    app.add_exception_handler(ModelNotReady, _not_ready)
    app.add_exception_handler(RequestValidationError, _validation)
