"""A blocking, single-thread facade over kserve's asynchronous V2 clients (gRPC primary, REST optional).

The wire encoding is ``services.protocol``'s; this module only moves ``StepRequest`` / ``StepResponse`` over
kserve's ``InferenceGRPCClient`` / ``InferenceRESTClient`` and sorts failures into what the runtime does next:

    EndpointUnavailable  nothing answered (connection refused, channel down): back off, reconnect, retry the request
    SessionLost          the server asks for ``reset=true`` (unknown/evicted session, model changed, out of order),
                         or a request timed out so its effect on the session is unknown: start the session again
    NonFiniteChunk       (a SessionLost) the model produced NaN/inf actions; the server closed the session
    VersionUnavailable   the server does not serve the model version the request is pinned to: the episode is over
    RequestRejected      anything else the server refused (bad request, auth, server error)
    Cancelled            ``cancel()`` was called from another thread

kserve's own gRPC retry policy is switched off: the runtime's backoff is explicit, bounded and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import TYPE_CHECKING

import grpc
import httpx
from kserve import InferenceGRPCClient, InferenceRESTClient, RESTConfig
from kserve.errors import InvalidInput

from services.protocol import (
    DEFAULT_MODEL_NAME,
    NON_FINITE,
    VERSION_NOT_SERVED,
    StepRequest,
    StepResponse,
    from_infer_response,
    to_infer_request,
)

if TYPE_CHECKING:
    from services.robot_client.settings import RobotSettings

_RESET_HINTS = ("send reset=true", "out of order")


class PolicyError(Exception):
    """A step request that did not produce a chunk."""


class EndpointUnavailable(PolicyError):
    """The endpoint could not be reached."""


class SessionLost(PolicyError):
    """The session must be started again with ``reset=true``."""


class NonFiniteChunk(SessionLost):
    """The model produced NaN/inf actions for the requested chunk: it was never sent, the session was closed."""


class VersionUnavailable(PolicyError):
    """The endpoint does not serve the model version the episode is pinned to; no reset brings it back."""


class RequestRejected(PolicyError):
    """The endpoint refused the request for a reason a reset does not obviously fix."""


class Cancelled(PolicyError):
    """The request was cancelled by ``PolicyClient.cancel``."""


class PolicyClient:
    """Sends one ``StepRequest`` at a time to a policy endpoint and returns its ``StepResponse``.

    Not thread-safe except for ``cancel``: one thread (the runtime's requester) owns it. The channel is opened
    lazily and re-opened after ``reconnect()``.
    """

    def __init__(self, endpoint: str, *, transport: str = "grpc", model_name: str = DEFAULT_MODEL_NAME,
                 token: str | None = None, timeout_s: float = 10.0) -> None:
        if transport not in ("grpc", "rest"):
            raise ValueError(f"transport must be 'grpc' or 'rest', got {transport!r}")
        self.endpoint, self.transport, self.model_name = endpoint, transport, model_name
        self.timeout_s = timeout_s
        self._token = token
        self._loop = asyncio.new_event_loop()
        self._client: InferenceGRPCClient | InferenceRESTClient | None = None
        self._task: asyncio.Task | None = None
        self._lock = threading.Lock()  # guards _task against cancel() from another thread

    @classmethod
    def from_settings(cls, settings: RobotSettings, endpoint: str | None = None) -> PolicyClient:
        """A client for ``endpoint`` (default ``settings.endpoint``) with the settings' transport, model name, token
        and request timeout."""
        token = settings.token.get_secret_value() if settings.token else None
        return cls(endpoint or settings.endpoint, transport=settings.transport, model_name=settings.model_name,
                   token=token, timeout_s=settings.request_timeout_s)

    def step(self, request: StepRequest) -> StepResponse:
        """One round trip; raises a ``PolicyError`` subclass when no valid response came back."""
        if self._loop.is_closed():
            raise Cancelled("the client is closed")
        with self._lock:
            self._task = self._loop.create_task(self._step(request))
        try:
            return self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            raise Cancelled("request cancelled") from None
        finally:
            with self._lock:
                self._task = None

    def cancel(self) -> None:
        """Abort the request in flight, if any (safe to call from any thread)."""
        with self._lock:
            if self._task is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._task.cancel)

    def reconnect(self) -> None:
        """Drop the channel; the next ``step`` opens a fresh one (a dead channel may sit in its own long backoff)."""
        if self._client is not None and not self._loop.is_closed():
            client, self._client = self._client, None
            with contextlib.suppress(Exception):  # closing a broken channel may fail; it is discarded either way
                self._loop.run_until_complete(_close(client))

    def close(self) -> None:
        """Close the channel and the event loop."""
        if not self._loop.is_closed():
            self.reconnect()
            self._loop.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _step(self, request: StepRequest) -> StepResponse:
        infer_request = to_infer_request(request, self.model_name)
        if self.transport == "grpc":
            if self._client is None:  # made inside the loop: grpc.aio channels bind to the running loop
                self._client = InferenceGRPCClient(self.endpoint, timeout=self.timeout_s, channel_args=[
                    ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                    ("grpc.enable_retries", 0)])
            headers = (("authorization", f"Bearer {self._token}"),) if self._token else None
            try:
                response = await self._client.infer(infer_request, headers=headers)
            except grpc.aio.AioRpcError as err:
                raise _grpc_error(err) from None
        else:
            if self._client is None:
                self._client = InferenceRESTClient(RESTConfig(
                    protocol="v2", timeout=self.timeout_s, transport=httpx.AsyncHTTPTransport(retries=0)))
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
            try:
                response = await self._client.infer(self.endpoint, infer_request, model_name=self.model_name,
                                                    headers=headers)
            except httpx.HTTPStatusError as err:
                raise _http_error(err) from None
            except httpx.TimeoutException as err:
                if isinstance(err, httpx.ConnectTimeout):
                    raise EndpointUnavailable(f"{self.endpoint}: connect timeout") from None
                raise SessionLost(f"request timed out after {self.timeout_s} s") from None
            except httpx.TransportError as err:
                raise EndpointUnavailable(f"{self.endpoint}: {type(err).__name__}: {err}") from None
        try:
            return from_infer_response(response)
        except InvalidInput as err:
            raise RequestRejected(f"malformed response: {err}") from None


async def _close(client: InferenceGRPCClient | InferenceRESTClient) -> None:
    await client.close()


def server_error(message: str) -> PolicyError | None:
    """What the runtime does about a refusal the server explained in ``message`` (any transport); None when the
    message alone does not say."""
    if VERSION_NOT_SERVED in message:
        return VersionUnavailable(message)
    if NON_FINITE in message:
        return NonFiniteChunk(message)
    if any(hint in message for hint in _RESET_HINTS):
        return SessionLost(message)
    return None


def _grpc_error(err: grpc.aio.AioRpcError) -> PolicyError:
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return EndpointUnavailable(f"UNAVAILABLE: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return SessionLost(f"request timed out: {details}")
    return server_error(details) or RequestRejected(f"{code.name}: {details}")


def _http_error(err: httpx.HTTPStatusError) -> PolicyError:
    message = str(err)
    known = server_error(message)
    if known is not None:
        return known
    if err.response.status_code in (502, 503, 504):  # a proxy / ingress without a live backend
        return EndpointUnavailable(message)
    return RequestRejected(message)
