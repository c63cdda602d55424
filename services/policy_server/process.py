"""The policy server (``python -m services.policy_server``, the same program as ``lingbot serve``) as a subprocess on
127.0.0.1, for ``lingbot demo``, the robot and fleet tests and ``bench/serving.py``: free ports chosen once, so a
stopped server can come back on the same ones; ``start`` returns once the model is ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from pipelines.settings import REPO_ROOT
from services.protocol import DEFAULT_MODEL_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``start()`` launches the server and waits until its model is ready; ``stop()`` ends it (SIGTERM, then
    SIGKILL); ``start()`` again restarts it on the same ports.

    ``model`` is a model directory or a registry URI (``models:/lingbot-va-<task>@champion``; give ``--data-dir``
    in ``args`` for the store). ``cwd`` is where it runs: its ``.env`` is read from there. Its environment is
    ``base_env`` (default: this process's) with one torch thread, then ``env`` on top.
    """

    def __init__(self, model: str | Path, log: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 cwd: Path = REPO_ROOT, base_env: Mapping[str, str] | None = None):
        self.model, self.log, self.args, self.cwd = str(model), Path(log), list(args), Path(cwd)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.env = {**(os.environ if base_env is None else base_env), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout: float = 180.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "services.policy_server", "--model", self.model,
               "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port),
               "--enable_latency_logging", "false", *self.args]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"policy server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                url = f"{self.rest_endpoint}/v2/models/{DEFAULT_MODEL_NAME}/ready"
                if httpx.get(url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"policy server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """End it the hard way (SIGKILL): a crash, no graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
