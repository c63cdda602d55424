"""Session churn benchmark of the policy endpoint (not a test): is the server's memory bounded as sessions come and go?

Starts the real policy server (``python -m services.policy_server``, default session bounds: 64 sessions, LRU
eviction) and runs N short episodes one after another over gRPC, each its own session id and session_token: a reset
and the async empty step (two model passes). Records the server's RSS after a warm-up, every 50 sessions, its peak
and at the end, and the evictions the server counted (/metrics). Writes bench/results/session_churn.json.

Model: --model-dir, else data/runs/posttrain-reach-v3/model if present, else a freshly written tiny model directory.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/session_churn.py [--sessions 1000] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "pipelines" / "evaluate"))  # write_model_dir: tiny self-contained models

from kserve import InferenceGRPCClient  # noqa: E402

from services.policy_server.process import ServerProcess  # noqa: E402
from services.protocol import StepRequest, from_infer_response, to_infer_request  # noqa: E402

DEFAULT_MODEL = REPO / "data" / "runs" / "posttrain-reach-v3" / "model"
OUT = REPO / "bench" / "results" / "session_churn.json"
WARMUP = 20


def mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def evictions(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.rest_endpoint}/metrics", timeout=10).text
    return {m[0]: float(m[1]) for m in re.findall(r'lingbot_serve_evictions_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)',
                                                  text)}


async def churn(server: ServerProcess, sessions: int, image_size: int, views: int) -> dict:
    rng = np.random.default_rng(0)
    client = InferenceGRPCClient(server.grpc_endpoint, timeout=120, retries=0)
    rss, samples, latency = [], [], []
    start_mb = None
    try:
        for i in range(sessions + WARMUP):
            sid, token = f"churn-{i}", f"churn-token-{i:06d}"
            frames = rng.integers(0, 256, (1, views, image_size, image_size, 3), dtype=np.uint8)
            state = np.array([[0.05, 0.6, 0.2, 0.5]], np.float32)
            t0 = time.perf_counter()
            for req in (StepRequest(sid, reset=True, images=frames, state=state, session_token=token),
                        StepRequest(sid, session_token=token)):
                from_infer_response(await client.infer(to_infer_request(req)))
            latency.append(time.perf_counter() - t0)
            now = mb(server.pid)
            rss.append(now)
            if i == WARMUP - 1:
                start_mb = now
            if i >= WARMUP and (i - WARMUP + 1) % 50 == 0:
                samples.append({"sessions": i - WARMUP + 1, "rss_mb": round(now, 1)})
    finally:
        await client.close()
    churned = rss[WARMUP:]
    return {"rss_start_mb": round(start_mb, 1), "rss_peak_mb": round(max(churned), 1),
            "rss_end_mb": round(churned[-1], 1), "rss_growth_mb": round(churned[-1] - start_mb, 1),
            "rss_samples": samples, "episode_seconds_p50": round(float(np.median(latency)), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        if args.model_dir:
            model, origin = args.model_dir, "given"
        elif (DEFAULT_MODEL / "config.json").is_file():
            model, origin = DEFAULT_MODEL, "default (data/runs/posttrain-reach-v3/model)"
        else:
            from model_dirs import write_model_dir

            model, origin = write_model_dir(Path(scratch) / "tiny-model"), "tiny model directory (untrained)"
        from model.policy import ChunkPolicy
        from pipelines.data.embodiments import get_adapter

        policy = ChunkPolicy.load(model, get_adapter)
        size, views = policy.image_size or 32, len(policy.cameras)
        del policy
        server = ServerProcess(model, Path(scratch) / "server.log")
        t0 = time.perf_counter()
        with server:
            result = asyncio.run(churn(server, args.sessions, size, views))
            result["evictions"] = evictions(server)
        result.update(sessions=args.sessions, warmup_sessions=WARMUP, max_sessions=64, model=str(model),
                      model_origin=origin, seconds=round(time.perf_counter() - t0, 1), cpu=platform.processor(),
                      omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                      command="OMP_NUM_THREADS=1 .venv/bin/python bench/session_churn.py")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
