"""The real policy server (``python -m services.policy_server``) as a subprocess on 127.0.0.1, for the robot and
fleet tests and ``bench/serving.py``: free ports chosen once, so a stopped server can come back on the same ones."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
MODEL_DIRS = REPO / "tests" / "pipelines" / "evaluate"  # model_dirs.write_model_dir: tiny self-contained models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``start()`` launches the server and waits until its model is ready; ``stop()`` ends it (SIGTERM, then
    SIGKILL); ``start()`` again restarts it on the same ports."""

    def __init__(self, model_dir: Path, log: Path, args: Sequence[str] = (), env: dict[str, str] | None = None):
        self.model_dir, self.log, self.args = Path(model_dir), Path(log), list(args)
        self.http_port, self.grpc_port = free_port(), free_port()
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
                    **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def rest_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 180.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "services.policy_server", "--model", str(self.model_dir),
               "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port),
               "--enable_latency_logging", "false", *self.args]
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"policy server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.rest_endpoint}/v2/models/lingbot-va/ready", timeout=2).status_code == 200:
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
