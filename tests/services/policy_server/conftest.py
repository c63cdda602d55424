"""The real policy server (``python -m services.policy_server``: kserve ModelServer, REST + gRPC) in a subprocess on
127.0.0.1 free ports, started and stopped by fixtures, plus helpers to talk to it through kserve's own clients."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import httpx
import numpy as np
import pytest
import torch
from kserve import InferenceGRPCClient, InferenceRESTClient, RESTConfig

sys.path.insert(0, str(Path(__file__).parents[2] / "pipelines" / "evaluate"))
from model_dirs import write_model_dir

from services.policy_server.process import ServerProcess, free_port  # noqa: F401 (re-exported to the tests)
from services.protocol import DEFAULT_MODEL_NAME, StepRequest, from_infer_response, to_infer_request

REPO = Path(__file__).resolve().parents[3]
STATE = np.array([0.05, 0.6, 0.2, 0.5], np.float32)  # Sawyer hand xyz + gripper opening


def token_for(session_id) -> str | None:
    """The tests' session_token of a session id (one client per id, stable across its resets), or None for ids the
    protocol refuses anyway."""
    if not isinstance(session_id, str):
        return None
    return "tok-" + hashlib.sha256(session_id.encode()).hexdigest()[:24]


def owned(req: StepRequest) -> StepRequest:
    """``req`` carrying its session's token (the client that opened the session sends it on every request)."""
    return req if req.session_token is not None else dataclasses.replace(req, session_token=token_for(req.session_id))


class PolicyServer(ServerProcess):
    """The platform's server subprocess helper plus the tests' clients: ``wait_ready`` starts it and waits for the
    model; ``stop`` sends SIGTERM and waits (SIGKILL after 30 s)."""

    def __init__(self, model: str | Path, args: list[str], log: Path, token: str | None = None,
                 env: dict[str, str] | None = None):
        super().__init__(model, log, args, env=env)
        self.token = token

    @property
    def rest_url(self) -> str:
        return self.rest_endpoint

    @property
    def grpc_url(self) -> str:
        return self.grpc_endpoint

    def wait_ready(self, timeout: float = 120.0) -> PolicyServer:
        return self.start(timeout)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def metrics(self) -> str:
        return httpx.get(f"{self.rest_url}/metrics", timeout=10).text

    # --- one step through kserve's clients ---------------------------------------------------------------------
    async def rest(self, req: StepRequest, headers: dict | None = None):
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        try:
            response = await client.infer(self.rest_url, to_infer_request(owned(req)), model_name=DEFAULT_MODEL_NAME,
                                          headers=self.headers() if headers is None else headers)
        finally:
            await client.close()
        return from_infer_response(response)

    async def grpc(self, req: StepRequest, metadata: tuple | None = None):
        client = InferenceGRPCClient(self.grpc_url, timeout=60, retries=0)
        try:
            auth = (("authorization", f"Bearer {self.token}"),) if self.token else ()
            response = await client.infer(to_infer_request(owned(req)), headers=auth if metadata is None else metadata)
        finally:
            await client.close()
        return from_infer_response(response)

    def step(self, req: StepRequest, transport: str = "rest"):
        return asyncio.run(self.rest(req) if transport == "rest" else self.grpc(req))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Local reference computations in one thread, like the servers: two threads fighting the servers and the
    machine's other work over two cores make them ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("policy-server") / "model")


@pytest.fixture(scope="session")
def policy_server(model_dir, tmp_path_factory):
    """The default server (batching on, 50 ms window) on the tiny model directory, for the whole session."""
    log = tmp_path_factory.mktemp("server-logs") / "default.log"
    server = PolicyServer(model_dir, ["--max-wait-ms", "50", "--max-request-mb", "1"], log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def frames(n: int, seed: int, size: int = 32, views: int = 2) -> np.ndarray:
    """``n`` random camera frames (n, V, H, W, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (n, views, size, size, 3), dtype=np.uint8)


def states(n: int, seed: int) -> np.ndarray:
    """``n`` plausible Sawyer states near ``STATE``."""
    return (STATE + np.random.default_rng(seed).normal(0, 0.01, (n, 4))).astype(np.float32)
