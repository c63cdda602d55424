"""The real policy server as a subprocess on 127.0.0.1 for the robot and fleet tests: ``ServerProcess`` lives in
``services.policy_server.process`` (``lingbot demo`` and ``bench/serving.py`` start it the same way)."""

from __future__ import annotations

from pathlib import Path

from services.policy_server.process import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[3]
MODEL_DIRS = REPO / "tests" / "pipelines" / "evaluate"  # model_dirs.write_model_dir: tiny self-contained models

__all__ = ["MODEL_DIRS", "REPO", "ServerProcess", "free_port"]
