"""The policy server in this process, behind ``PolicyClient``'s interface: a transport without a network.

``RobotRuntime`` drives an ``InProcessClient`` exactly as it drives an endpoint: every request is encoded and parsed
with the wire contract's own functions (``services.protocol``: the same dtypes, checks and refusals) and served by a
``PolicyEngine``, the server's core. The gate's rollouts run so (the evaluate step's ``rollout`` module), which
makes the gate's episodes the ones a fleet robot runs against a real endpoint, action for action.

    with contextlib.closing(InProcessClient.serving(policy)) as client:   # a model.policy.ChunkPolicy or one like it
        runtime = RobotRuntime(robot, settings, client=client, timing=Timing.lockstep())
        stats = runtime.run_episode("reach-v3", seed=0)
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

from kserve.errors import InferenceError, InvalidInput

from services.policy_server.engine import PolicyEngine
from services.policy_server.models import ModelHandle
from services.policy_server.settings import ServeSettings
from services.protocol import (
    DEFAULT_MODEL_NAME,
    StepRequest,
    StepResponse,
    from_infer_request,
    from_infer_response,
    to_infer_request,
    to_infer_response,
)
from services.robot_client.client import Cancelled, PolicyError, RequestRejected, server_error

VERSION = "in-process"


class InProcessClient:
    """Serves one robot's requests with a ``PolicyEngine`` of its own (started here, stopped by ``close``).

    ``record``: keep the ``Plan`` behind every chunk returned (``plans``, in order; their imagined latents are what
    the gate films) and the last session's ``EpisodePolicy`` (``episode``, which decodes them).
    """

    endpoint = "in-process"

    def __init__(self, handle: ModelHandle, *, record: bool = False) -> None:
        # one robot, one session at a time: no batching window, no eviction while an episode runs
        settings = ServeSettings(batching=False, max_sessions=1, session_ttl_s=math.inf, max_session_memory_mb=0.0)
        self.engine = PolicyEngine(handle, settings, model_name=VERSION).start()
        self.record = record
        self.plans: list = []
        self.episode = None
        self._lock = threading.Lock()  # guards _waiting against cancel() from another thread
        self._waiting: threading.Event | None = None

    @classmethod
    def serving(cls, policy, *, version: str = VERSION, record: bool = False) -> InProcessClient:
        """A client serving ``policy`` (a loaded ``ChunkPolicy`` or a policy with its interface) as ``version``."""
        return cls(ModelHandle(policy, version, Path()), record=record)

    def step(self, request: StepRequest) -> StepResponse:
        """One round trip; raises a ``PolicyError`` subclass when no valid response came back, as ``PolicyClient``."""
        if not self.engine.batcher.alive:
            raise Cancelled("the client is closed")
        try:  # through the wire encoding: what is served is what a remote robot's request would be
            parsed = from_infer_request(to_infer_request(request, DEFAULT_MODEL_NAME))
        except InvalidInput as err:
            raise _error(err) from None
        future = self.engine.submit(parsed)
        answered = threading.Event()
        with self._lock:
            self._waiting = answered
        future.add_done_callback(lambda _: answered.set())
        answered.wait()
        with self._lock:
            self._waiting = None
        if not future.done():  # cancel(): stop waiting; a model pass already running finishes on the engine
            future.cancel()
            raise Cancelled("request cancelled")
        try:
            response = future.result()
        except (InvalidInput, InferenceError) as err:
            raise _error(err) from None
        except Exception as err:  # the engine itself failed or is shutting down
            raise RequestRejected(f"{type(err).__name__}: {err}") from None
        if self.record:
            session = self.engine.store.peek(response.session_id)
            self.plans.append(session.last_plan)
            self.episode = session.episode
        return from_infer_response(to_infer_response(response, DEFAULT_MODEL_NAME))

    def cancel(self) -> None:
        """Stop waiting for the request in flight, if any (safe to call from any thread)."""
        with self._lock:
            if self._waiting is not None:
                self._waiting.set()

    def reconnect(self) -> None:
        """Nothing to reconnect in process."""

    def close(self) -> None:
        """Stop the engine (a model pass in progress finishes first) and drop its sessions."""
        self.cancel()
        self.engine.stop()


def _error(err: Exception) -> PolicyError:
    """The client error a remote robot would get for the server's refusal ``err``."""
    message = str(err)
    return server_error(message) or RequestRejected(f"{type(err).__name__}: {message}")

