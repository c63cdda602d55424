"""The KServe custom predictor: V2 requests in, the policy engine's action chunks out.

``load`` builds everything from the model (registry URI or directory) alone and, for a ``models:/<name>@<alias>``
URI, starts following the alias. ``predict`` runs on kserve's event loop: it parses the request
(``services.protocol``), queues it on the engine's batcher and awaits the result without blocking the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kserve import InferRequest, Model
from kserve.errors import InvalidInput

from services.policy_server import metrics
from services.policy_server.engine import PolicyEngine
from services.policy_server.models import AliasWatcher, ModelHandle, alias_of, load_model
from services.policy_server.settings import ServeSettings
from services.protocol import from_infer_request, to_infer_response

log = logging.getLogger(__name__)


class LingBotPredictor(Model):
    """One V2 model (``settings.model_name``) serving LingBot-VA action chunks to many robots."""

    def __init__(self, settings: ServeSettings, name: str | None = None):
        super().__init__(name or settings.model_name)
        self.settings = settings
        self.runtime: PolicyEngine | None = None  # not "engine": kserve reads model.engine as an LLM-engine flag
        self.watcher: AliasWatcher | None = None

    def load(self) -> bool:
        if not self.settings.model:
            raise ValueError("no model to serve: pass --model (a models:/<name>@<alias> URI or a model directory) "
                             "or set LINGBOT_SERVE_MODEL")
        handle = self._load(self.settings.model)
        self.runtime = PolicyEngine(handle, self.settings, self.name).start()
        alias = alias_of(self.settings.model)
        if alias and self.settings.poll_interval_s > 0:
            self.watcher = AliasWatcher(*alias, handle.registered_version, self.settings.poll_interval_s,
                                        load=self._load, on_new=self.runtime.switch).start()
        self.ready = True
        log.info("serving %s as %s (%s)", handle.version, self.name, handle.model_dir)
        return self.ready

    def _load(self, model: str) -> ModelHandle:
        return load_model(model, self.settings.data_dir, self.settings.device)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.runtime is not None:
            self.runtime.stop()
        super().stop()

    @property
    def serving(self) -> bool:
        """Loaded and answering: what readiness reports (REST /v2/health/ready, gRPC ServerReady / ModelReady)."""
        return bool(self.ready and self.runtime is not None and self.runtime.batcher.alive)

    @property
    def model_version(self) -> str | None:
        """The version new sessions start on."""
        return None if self.runtime is None else self.runtime.current.version

    async def predict(self, payload: Any, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None, *, received_at: float | None = None):
        """``received_at``: when the transport began decoding the message (perf_counter), so ``decode_us`` covers
        it; default now."""
        if not isinstance(payload, InferRequest):
            raise InvalidInput("this endpoint speaks the Open Inference Protocol V2: POST /v2/models/"
                               f"{self.name}/infer (REST, binary tensors) or gRPC ModelInfer")
        t0, kind, outcome = time.perf_counter(), "unparsed", "error"
        try:
            step = from_infer_request(payload, max_bytes=self.settings.max_request_bytes)
            decoded = time.perf_counter()
            decode_s = decoded - (received_at if received_at is not None else t0)
            metrics.DECODE_SECONDS.labels(self.name).observe(decode_s)
            metrics.REQUEST_BYTES.labels(self.name).observe(
                sum(a.nbytes for a in (step.images, step.actions, step.state) if a is not None))
            kind = "reset" if step.reset else "step"
            response = await asyncio.wrap_future(self.runtime.submit(step))
            response.decode_ms = 1000 * decode_s
            outcome = "ok"
        except InvalidInput:
            outcome = "invalid"
            raise
        finally:
            metrics.REQUEST_SECONDS.labels(self.name, kind, outcome).observe(time.perf_counter() - t0)
        binary = payload.from_grpc or payload.use_binary_outputs
        return to_infer_response(response, self.name, payload.id, binary=binary)

    def get_input_types(self) -> list[dict]:
        policy = self.runtime.current.policy
        size = policy.image_size or -1
        spec = policy.adapter.spec
        return [{"name": "images", "datatype": "UINT8", "shape": [-1, len(policy.cameras), size, size, 3]},
                {"name": "actions", "datatype": "FP32", "shape": [-1, spec.native_action_dim]},
                {"name": "state", "datatype": "FP32", "shape": [-1, spec.state_dim]}]

    def get_output_types(self) -> list[dict]:
        policy = self.runtime.current.policy
        n = policy.steps_per_chunk
        return [{"name": "actions", "datatype": "FP32", "shape": [n, policy.adapter.spec.native_action_dim]},
                {"name": "targets", "datatype": "FP32", "shape": [n, 30]}]
