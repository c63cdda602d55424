"""Serving benchmark of the policy endpoint with real robots' clients (not a test).

Starts the real policy server (``python -m services.policy_server``, kserve REST + gRPC) on 127.0.0.1 with one
model directory and measures:
  * grpc_overhead_ms_p50 / _p99  gRPC round trip of a step minus the in-process predict time of the same step (the
                                 server's own ``PolicyEngine`` in this process: same model, same settings, same
                                 request sequence and shapes, same session ids so the same sampler seeds); paired
                                 per step, sessions alternating between the two paths;
  * async_vs_sync_speedup        mean Meta-World episode wall time sync / async at the same control rate (Alg. 1 vs
                                 Alg. 2), same variants, robots waiting (not holding) for late chunks so both modes
                                 execute the same policy steps; success rates reported beside it;
  * fleet_robots_on_time         robots of an N-robot fleet served with >= 95% on-time chunks (50 ms deadline), with
                                 the server's cross-robot batching on (``--batching``) and off (``--no-batching``).
Model: --model-dir, else data/runs/posttrain-reach-v3/model if present, else a freshly written tiny model directory
(recorded in the JSON). Writes bench/results/serving.json and prints it.

Usage: .venv/bin/python bench/serving.py [--quick] [--model-dir DIR] [--robots 4] [--control-rate-hz 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "pipelines" / "evaluate"))  # write_model_dir: tiny self-contained models

from services.policy_server.process import ServerProcess  # noqa: E402
from services.protocol import DEFAULT_MODEL_NAME, StepRequest  # noqa: E402

DEFAULT_MODEL = REPO / "data" / "runs" / "posttrain-reach-v3" / "model"
OUT = REPO / "bench" / "results" / "serving.json"


def pick_model(arg: str | None, scratch: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL, "default (data/runs/posttrain-reach-v3/model)"
    from model_dirs import write_model_dir

    return write_model_dir(scratch / "tiny-model"), "tiny model directory written by the benchmark (untrained)"


def pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


# --- gRPC overhead ------------------------------------------------------------------------------------------------

def session_requests(sid: str, task: str, steps: int, policy, seed: int) -> list[StepRequest]:
    """An async session as a robot sends it: reset, the empty request, then ``steps - 2`` executed chunks."""
    rng = np.random.default_rng(seed)
    views, size, n = len(policy.cameras), policy.image_size or 96, policy.steps_per_chunk
    spec = policy.adapter.spec

    def frames(k: int) -> np.ndarray:
        return rng.integers(0, 256, (k, views, size, size, 3), dtype=np.uint8)

    def states(k: int) -> np.ndarray:  # Sawyer-like: hand xyz in the workspace, gripper opening
        return np.column_stack([rng.uniform(-0.1, 0.1, k), rng.uniform(0.5, 0.7, k), rng.uniform(0.1, 0.25, k),
                                rng.uniform(0, 1, k)])[:, :spec.state_dim].astype(np.float32)

    token = f"bench-{sid}"  # the session's owner token, on every request
    reqs = [StepRequest(sid, reset=True, instruction=task, images=frames(1), state=states(1), session_token=token),
            StepRequest(sid, seq=1, session_token=token)]
    for k in range(2, steps):
        actions = rng.uniform(spec.action_low, spec.action_high, (n, spec.native_action_dim)).astype(np.float32)
        reqs.append(StepRequest(sid, seq=k, images=frames(n), actions=actions, state=states(n), session_token=token))
    return reqs


def grpc_overhead(model_dir: Path, server: ServerProcess, task: str, sessions: int, steps: int) -> dict:
    import torch

    from pipelines.evaluate.policy import ChunkPolicy
    from services.policy_server.engine import PolicyEngine
    from services.policy_server.models import load_model
    from services.policy_server.settings import ServeSettings
    from services.robot_client.client import PolicyClient

    torch.set_num_threads(1)  # like the server process (OMP_NUM_THREADS=1)
    policy = ChunkPolicy(model_dir)
    with tempfile.TemporaryDirectory() as data_dir:
        engine = PolicyEngine(load_model(str(model_dir), Path(data_dir)), ServeSettings(model=str(model_dir)),
                              DEFAULT_MODEL_NAME).start()
        client = PolicyClient(server.grpc_endpoint, timeout_s=120)
        local_ms: list[float] = []
        remote_ms: list[float] = []
        try:
            for s in range(sessions + 1):  # session 0 warms both paths up and is not counted
                reqs = session_requests(f"bench-{s}", task, steps, policy, seed=s)
                for path in ("local", "grpc") if s % 2 else ("grpc", "local"):  # alternate: no drift bias
                    out = []
                    for req in reqs:
                        t0 = time.perf_counter()
                        if path == "local":
                            engine.submit(req).result()
                        else:
                            client.step(req)
                        out.append(1000 * (time.perf_counter() - t0))
                    if s:
                        (local_ms if path == "local" else remote_ms).extend(out)
        finally:
            client.close()
            engine.stop()
    diff = [r - loc for r, loc in zip(remote_ms, local_ms, strict=True)]
    return {"grpc_overhead_ms_p50": pct(diff, 50), "grpc_overhead_ms_p99": pct(diff, 99),
            "detail": {"samples": len(diff), "sessions": sessions, "steps_per_session": steps,
                       "in_process_ms_p50": pct(local_ms, 50), "in_process_ms_p99": pct(local_ms, 99),
                       "grpc_ms_p50": pct(remote_ms, 50), "grpc_ms_p99": pct(remote_ms, 99),
                       "request_shapes": {"images": [policy.steps_per_chunk, len(policy.cameras),
                                                     policy.image_size, policy.image_size, 3],
                                          "actions": [policy.steps_per_chunk, policy.adapter.spec.native_action_dim],
                                          "state": [policy.steps_per_chunk, policy.adapter.spec.state_dim]}}}


# --- async vs sync ------------------------------------------------------------------------------------------------

def episodes_by_mode(server: ServerProcess, task: str, policy_info: dict, episodes: int, max_steps: int,
                     rate: float) -> dict:
    from services.robot_client import RobotRuntime, RobotSettings
    from services.robot_client.metaworld import MetaWorldRobot

    out = {}
    for mode in ("sync", "async"):
        # robots wait for late chunks instead of holding, so both modes execute the same policy steps
        settings = RobotSettings(endpoint=server.grpc_endpoint, mode=mode, control_rate_hz=rate, max_steps=max_steps,
                                 request_timeout_s=120, deadline_ms=120_000, robot_id=f"bench-{mode}")
        runs = []
        for e in range(episodes):
            robot = MetaWorldRobot(task, e, cameras=policy_info["cameras"], image_size=policy_info["image_size"])
            with robot, RobotRuntime(robot, settings) as runtime:
                runs.append(runtime.run_episode(task).to_dict())
        out[mode] = {"episodes": len(runs), "success_rate": float(np.mean([r["success"] for r in runs])),
                     "episode_wall_s": float(np.mean([r["wall_s"] for r in runs])),
                     "policy_steps": float(np.mean([r["policy_steps"] for r in runs])),
                     "s_per_policy_step": float(np.sum([r["wall_s"] for r in runs])
                                                / max(1, np.sum([r["policy_steps"] for r in runs]))),
                     "latency_ms_p50": pct([x for r in runs for x in r["latency_ms"]], 50),
                     "errors": [r["error"] for r in runs if r["error"]]}
    return {"async_vs_sync_speedup": out["sync"]["episode_wall_s"] / out["async"]["episode_wall_s"],
            "detail": {"control_rate_hz": rate, "max_steps": max_steps, **out,
                       "speedup_per_policy_step": out["sync"]["s_per_policy_step"] / out["async"]["s_per_policy_step"]}}


# --- fleet ----------------------------------------------------------------------------------------------------------

def fleet_on_time(server: ServerProcess, task: str, policy_info: dict, robots: int, max_steps: int,
                  rate: float) -> dict:
    from services.fleet.fleet import run_fleet
    from services.fleet.settings import FleetSettings
    from services.robot_client.settings import RobotSettings

    fleet = FleetSettings(robots=robots, episodes=1, task=task, cameras=policy_info["cameras"],
                          image_size=policy_info["image_size"])
    rep = run_fleet(fleet, RobotSettings(endpoint=server.grpc_endpoint, control_rate_hz=rate, max_steps=max_steps,
                                         request_timeout_s=120))
    return {"robots_on_time": rep["robots_on_time"], "wall_s": rep["wall_s"],
            "on_time_pct": [r["on_time_pct"] for r in rep["per_robot"]],
            "latency_ms_p50": rep["overall"]["latency_ms_p50"], "latency_ms_p99": rep["overall"]["latency_ms_p99"],
            "stalls": rep["overall"]["stalls"], "success_rate": rep["overall"]["success_rate"],
            "errors": rep["overall"]["error_examples"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--task", default=None, help="default: the model's first task")
    ap.add_argument("--sessions", type=int, default=6, help="gRPC overhead: sessions per path")
    ap.add_argument("--session-steps", type=int, default=10, help="gRPC overhead: requests per session")
    ap.add_argument("--episodes", type=int, default=2, help="async vs sync: episodes per mode")
    ap.add_argument("--max-steps", type=int, default=120, help="async vs sync: robot steps per episode")
    ap.add_argument("--control-rate-hz", type=float, default=20.0, help="robots' rate (both measurements)")
    ap.add_argument("--robots", type=int, default=4, help="fleet size")
    ap.add_argument("--fleet-max-steps", type=int, default=80)
    ap.add_argument("--quick", action="store_true", help="small sizes: proves the benchmark runs")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.quick:
        args.sessions, args.session_steps, args.episodes, args.max_steps = 2, 6, 1, 48
        args.robots, args.fleet_max_steps = 2, 32
    logging.getLogger("kserve.trace").setLevel(logging.CRITICAL)

    from pipelines.evaluate.policy import ChunkPolicy

    with tempfile.TemporaryDirectory() as scratch:
        model_dir, source = pick_model(args.model_dir, Path(scratch))
        policy = ChunkPolicy(model_dir)
        task = args.task or policy.tasks[0]
        info = {"cameras": list(policy.cameras), "image_size": policy.image_size or 96}
        result: dict = {"model_dir": str(model_dir), "model_source": source, "task": task, **info,
                        "steps_per_chunk": policy.steps_per_chunk}
        logs = Path(scratch)
        t0 = time.perf_counter()
        with ServerProcess(model_dir, logs / "batching.log") as server:
            overhead = grpc_overhead(model_dir, server, task, args.sessions, args.session_steps)
            speed = episodes_by_mode(server, task, info, args.episodes, args.max_steps, args.control_rate_hz)
            fleet_on = fleet_on_time(server, task, info, args.robots, args.fleet_max_steps, args.control_rate_hz)
        with ServerProcess(model_dir, logs / "no-batching.log", args=["--no-batching"]) as server:
            fleet_off = fleet_on_time(server, task, info, args.robots, args.fleet_max_steps, args.control_rate_hz)
        result.update({
            "grpc_overhead_ms_p50": overhead["grpc_overhead_ms_p50"],
            "grpc_overhead_ms_p99": overhead["grpc_overhead_ms_p99"],
            "async_vs_sync_speedup": speed["async_vs_sync_speedup"],
            "async_success_rate": speed["detail"]["async"]["success_rate"],
            "sync_success_rate": speed["detail"]["sync"]["success_rate"],
            "fleet_robots_on_time": {"robots": args.robots, "batching": fleet_on["robots_on_time"],
                                     "no_batching": fleet_off["robots_on_time"]},
            "grpc_overhead": overhead["detail"], "async_vs_sync": speed["detail"],
            "fleet": {"control_rate_hz": args.control_rate_hz, "max_steps": args.fleet_max_steps,
                      "on_time_threshold_pct": 95.0, "deadline_ms": 50.0, "batching": fleet_on,
                      "no_batching": fleet_off},
            "quick": args.quick, "wall_s": time.perf_counter() - t0,
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
