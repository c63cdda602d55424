"""Serving benchmark of the policy endpoint (not a test): each figure isolates one thing.

Starts the real policy server (``python -m services.policy_server``, kserve REST + gRPC) on 127.0.0.1 and measures:

  * grpc_overhead_ms_p50 / _p99, rest_overhead_ms_p50 / _p99 -- what the endpoint costs beyond the model, for the
      same request: the client's round trip minus the server's own model time of that request (response parameter
      ``compute_us``), paired per request; one robot, requests one at a time, so no other load is in it. Measured at
      the demo's request size (two 64 px cameras, one chunk of frames) and at 96 px, on model directories the
      benchmark writes (tiny weights, the demo's chunk of 4 x tau 4 = 16 steps): the overhead does not depend on
      the weights. Beside it: the request's bytes on each wire, the server's decode time (``decode_us``) and batch
      wait (``queue_us``), the protobuf parse time of the message (offline), and the model time itself. Sessions
      follow each other like a robot's episodes: for ``active_session_s`` (1 s) after a session's last request the
      server still holds a batching window open for it, which shows in the p99 (``queue_ms_p99``), not the p50.
  * async_vs_sync_speedup, async_success_rate, sync_success_rate -- Algorithm 2 vs 1 on Meta-World episodes of the
      served model: mean episode wall time sync / async at the control rate where a chunk's execution time equals
      the sync plan time (measured first: the p50 round trip of sync step requests), with the same variants and
      robots waiting (not holding) for late chunks so both modes execute the same policy steps; the same at half
      and twice that rate (``async_vs_sync.rates``).
  * fleet_robots_on_time.batching / .no_batching -- the largest fleet the server keeps >= 95% of chunks on time
      (deadline 50 ms past need), robots added until it does not; with the server's cross-robot batching and
      without (``--no-batching``). The robots replay recorded episodes' observations (LeRobot episodes under
      data/episodes, or synthetic frames of the model's size when there are none; recorded in the JSON), so no
      simulator competes for the server's cores; robot 0 simulates Meta-World in the loop. p50/p99 chunk latency vs
      robot count: ``bench/results/serving_fleet.png``, logged with the figures to MLflow (experiment
      ``lingbot-bench-serving`` in the tracking store under ``--data-dir``).
Paper-size (GPU) latency is ``bench/gpu_check.py``'s.

Every figure is of this machine as it was: the JSON records the load average before and after, the cores and
``machine.idle_at_start`` (1-minute load below a quarter of the cores), so a run on a busy machine (CPU contention is
not the endpoint's cost) is visible. Run it on an idle machine (nothing else running: no training, no DVC stage):

    OMP_NUM_THREADS=1 .venv/bin/python bench/serving.py     # ~35-50 min on 2 cores; writes bench/results/serving.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/serving.py --quick --out /tmp/serving-quick.json    # ~3 min rehearsal

Knobs for tuning from the measurement: ``--server-threads`` (torch threads of the server), ``--server-args`` (e.g.
``--max-batch-size 16 --max-wait-ms 10``), ``--fleet-rate-hz``, ``--max-robots``; they are recorded in the JSON.

Model of the episodes and the fleet: --model-dir, else data/runs/posttrain-reach-v3/model if present, else a tiny
model directory the benchmark writes (untrained; recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.policy_server.process import ServerProcess  # noqa: E402
from services.protocol import StepRequest, to_infer_request  # noqa: E402

DEFAULT_MODEL = REPO / "data" / "runs" / "posttrain-reach-v3" / "model"
OUT = REPO / "bench" / "results" / "serving.json"
ON_TIME_PCT = 95.0


# --- pure functions (tests/bench/test_serving.py) --------------------------------------------------------------------

def pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def paired_overhead(round_trip_ms: Sequence[float], compute_ms: Sequence[float | None]) -> dict:
    """Per-request overhead = round trip - the server's model time of the same request; p50 / p99 / mean of it."""
    if len(round_trip_ms) != len(compute_ms):
        raise ValueError(f"{len(round_trip_ms)} round trips but {len(compute_ms)} server times: pair them per request")
    if any(c is None for c in compute_ms):
        raise ValueError("a response carried no compute_us: the server does not time its requests")
    diff = [r - c for r, c in zip(round_trip_ms, compute_ms, strict=True)]
    return {"overhead_ms_p50": pct(diff, 50), "overhead_ms_p99": pct(diff, 99),
            "overhead_ms_mean": float(np.mean(diff)) if diff else None, "samples": len(diff)}


def equal_rate_hz(steps_per_chunk: int, plan_ms: float) -> float:
    """The control rate at which executing one chunk takes as long as planning one (sync plan time)."""
    if plan_ms <= 0:
        raise ValueError(f"plan time must be positive, got {plan_ms} ms")
    return 1000.0 * steps_per_chunk / plan_ms


def find_capacity(measure: Callable[[int], dict], counts: Sequence[int], threshold_pct: float = ON_TIME_PCT,
                  beyond: int = 1) -> tuple[int, list[dict]]:
    """Robots the server keeps on time: ``measure(n)`` -> a row with ``on_time_pct`` (share of the fleet's chunks on
    time) for increasing ``counts`` until the first below ``threshold_pct``; the capacity is the count before it (0
    when the first fails; a later count that passes by chance does not raise it). ``beyond`` more counts are
    measured after the failure, for the latency curve; all rows come back."""
    capacity, rows, failed = 0, [], None
    for i, n in enumerate(counts):
        if failed is not None and i > failed + beyond:
            break
        row = {"robots": n, **measure(n)}
        rows.append(row)
        if failed is None:
            if row["on_time_pct"] is None or row["on_time_pct"] < threshold_pct:
                failed = i
            else:
                capacity = n
    return capacity, rows


def robot_counts(max_robots: int, start: int = 1) -> list[int]:
    """1, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32 ... up to ``max_robots``: fine where the goals are (8), coarse beyond."""
    out, n = [], start
    while n <= max_robots:
        out.append(n)
        n = n * 2 if n < 4 else n + 2 if n < 12 else n + 4 if n < 24 else n + 8
    return out


def load() -> dict:
    return {"load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count()}


# --- models ----------------------------------------------------------------------------------------------------------

def bench_model_dir(path: Path, image_size: int, *, chunk_size: int = 4, seed: int = 0) -> Path:
    """A self-contained tiny model directory taking two ``image_size`` px views and chunks of ``chunk_size`` x tau
    steps (the demo's 16 by default): the request shape of the demo without its training."""
    import torch

    from model import LingBotVA, get_preset
    from model.bundle import ActionSpace, PolicyBundle
    from model.encoders import VideoVAE
    from model.normalization import ActionNormalizer, EmbodimentNorm
    from pipelines.data.embodiments import get_adapter

    config = get_preset("tiny", chunk_size=chunk_size)
    torch.manual_seed(seed)
    model = LingBotVA(config)
    vae = VideoVAE.small(latent_channels=config.latent_channels, base_dim=8, num_res_blocks=1, seed=seed)
    sc = vae.spatial_compression
    if image_size % sc:
        raise ValueError(f"image_size must be a multiple of the VAE's {sc} px, got {image_size}")
    adapter = get_adapter("metaworld-sawyer")
    rng = np.random.default_rng(seed)
    state = np.column_stack([rng.uniform(-0.3, 0.3, 500), rng.uniform(0.4, 0.8, 500), rng.uniform(0.05, 0.3, 500),
                             rng.uniform(0, 1, 500)])
    norm = ActionNormalizer.fit(adapter.to_unified(rng.uniform(-1, 1, (500, 4)), state))
    text = {"reach-v3": torch.randn(4, config.text_dim, generator=torch.Generator().manual_seed(1))}
    space = ActionSpace(embodiments=(adapter.name,), tasks=("reach-v3",), tau=config.tau, instructions={"reach-v3": None},
                        cameras=("corner4", "gripperPOV"), latent_hw=(image_size // sc, 2 * image_size // sc))
    return PolicyBundle(model=model, vae=vae, text=text, action_space=space,
                        normalization={adapter.name: EmbodimentNorm.from_normalizer(adapter.name, norm, adapter.mask)}
                        ).save(path)


def pick_model(arg: str | None, scratch: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL, "default (data/runs/posttrain-reach-v3/model)"
    return bench_model_dir(scratch / "tiny-96", 96), "tiny 96 px model directory written by the benchmark (untrained)"


# --- 1. overhead of the endpoint -------------------------------------------------------------------------------------

def session_requests(sid: str, task: str, steps: int, policy, seed: int, mode: str = "async") -> list[StepRequest]:
    """A session as a robot sends it: reset, (async: the empty request,) then executed chunks; ``steps`` in all."""
    rng = np.random.default_rng(seed)
    views, size, n = len(policy.cameras), policy.image_size or 96, policy.steps_per_chunk
    spec = policy.adapter.spec

    def frames(k: int) -> np.ndarray:
        return rng.integers(0, 256, (k, views, size, size, 3), dtype=np.uint8)

    def states(k: int) -> np.ndarray:  # Sawyer-like: hand xyz in the workspace, gripper opening
        return np.column_stack([rng.uniform(-0.1, 0.1, k), rng.uniform(0.5, 0.7, k), rng.uniform(0.1, 0.25, k),
                                rng.uniform(0, 1, k)])[:, :spec.state_dim].astype(np.float32)

    token = f"bench-{sid}"  # the session's owner token, on every request
    reqs = [StepRequest(sid, reset=True, instruction=task, mode=mode, images=frames(1), state=states(1),
                        session_token=token)]
    if mode == "async":
        reqs.append(StepRequest(sid, seq=1, mode=mode, session_token=token))
    while len(reqs) < steps:
        actions = rng.uniform(spec.action_low, spec.action_high, (n, spec.native_action_dim)).astype(np.float32)
        reqs.append(StepRequest(sid, seq=len(reqs), mode=mode, images=frames(n), actions=actions, state=states(n),
                                session_token=token))
    return reqs


def wire_bytes(req: StepRequest) -> dict:
    """Bytes of the request on each wire, and how long protobuf takes to parse the gRPC message (what the server's
    transport does before ``decode_us`` starts)."""
    msg = to_infer_request(req).to_grpc().SerializeToString()
    body, _ = to_infer_request(req).to_rest()
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    t0, n = time.perf_counter(), 20
    for _ in range(n):
        pb.ModelInferRequest.FromString(msg)
    return {"tensor_bytes": int(sum(a.nbytes for a in (req.images, req.actions, req.state) if a is not None)),
            "grpc_message_bytes": len(msg), "rest_body_bytes": len(body) if isinstance(body, bytes) else None,
            "protobuf_parse_ms": 1000 * (time.perf_counter() - t0) / n}


def measure_round_trips(endpoint: str, transport: str, policy, task: str, sessions: int, steps: int,
                        mode: str = "async") -> dict:
    """Step requests one at a time on one channel; per request: round trip and the server's own times. Session 0
    warms up and is not counted; resets are not counted (a reset is once per episode)."""
    from services.robot_client.client import PolicyClient

    rows = {"round_trip_ms": [], "compute_ms": [], "queue_ms": [], "decode_ms": []}
    with PolicyClient(endpoint, transport=transport, timeout_s=120) as client:
        for s in range(sessions + 1):
            for req in session_requests(f"bench-{transport}-{mode}-{s}", task, steps, policy, seed=s, mode=mode):
                t0 = time.perf_counter()
                resp = client.step(req)
                rtt = 1000 * (time.perf_counter() - t0)
                if s and not req.reset:
                    rows["round_trip_ms"].append(rtt)
                    for k in ("compute_ms", "queue_ms", "decode_ms"):
                        rows[k].append(getattr(resp, k))
    return rows


def overhead_at(size: int, scratch: Path, sessions: int, steps: int, extra_args: Sequence[str] = (),
                env: dict[str, str] | None = None) -> dict:
    """gRPC and REST overhead for requests of two ``size`` px views, one chunk of frames."""
    from model.policy import ChunkPolicy
    from pipelines.data.embodiments import get_adapter

    model_dir = bench_model_dir(scratch / f"overhead-{size}", size)
    policy = ChunkPolicy.load(model_dir, get_adapter)
    out: dict = {"image_size": size, "steps_per_chunk": policy.steps_per_chunk,
                 "model": "tiny preset written by the benchmark (its weights do not enter the overhead)",
                 "request": wire_bytes(session_requests("bytes", "reach-v3", 3, policy, 0)[-1])}
    with ServerProcess(model_dir, scratch / f"overhead-{size}.log", args=list(extra_args), env=env) as server:
        for transport, endpoint in (("grpc", server.grpc_endpoint), ("rest", server.rest_endpoint)):
            rows = measure_round_trips(endpoint, transport, policy, "reach-v3", sessions, steps)
            out[transport] = {**paired_overhead(rows["round_trip_ms"], rows["compute_ms"]),
                              **{f"{k}_p50": pct(v, 50) for k, v in rows.items()},
                              **{f"{k}_p99": pct(v, 99) for k, v in rows.items()}}
    return out


# --- 3. async vs sync ------------------------------------------------------------------------------------------------

def episodes_by_mode(endpoint: str, task: str, info: dict, episodes: int, max_steps: int, rate: float) -> dict:
    from services.robot_client import RobotRuntime, RobotSettings
    from services.robot_client.metaworld import MetaWorldRobot

    out = {}
    for mode in ("sync", "async"):
        # robots wait for late chunks instead of holding, so both modes execute the same policy steps
        settings = RobotSettings(endpoint=endpoint, mode=mode, control_rate_hz=rate, max_steps=max_steps,
                                 request_timeout_s=120, deadline_ms=120_000, robot_id=f"bench-{mode}")
        runs = []
        for e in range(episodes):
            robot = MetaWorldRobot(task, e, cameras=info["cameras"], image_size=info["image_size"])
            with robot, RobotRuntime(robot, settings) as runtime:
                runs.append(runtime.run_episode(task).to_dict())
        out[mode] = {"episodes": len(runs), "success_rate": float(np.mean([r["success"] for r in runs])),
                     "episode_wall_s": float(np.mean([r["wall_s"] for r in runs])),
                     "policy_steps": float(np.mean([r["policy_steps"] for r in runs])),
                     "latency_ms_p50": pct([x for r in runs for x in r["latency_ms"]], 50),
                     "errors": [r["error"] for r in runs if r["error"]]}
    return {"control_rate_hz": rate, "speedup": out["sync"]["episode_wall_s"] / out["async"]["episode_wall_s"],
            **out}


# --- 4. fleet capacity -----------------------------------------------------------------------------------------------

def fleet_point(endpoint: str, task: str, info: dict, robots: int, max_steps: int, rate: float,
                replay: str) -> dict:
    from services.fleet.fleet import run_fleet
    from services.fleet.settings import FleetSettings
    from services.robot_client.settings import RobotSettings

    fleet = FleetSettings(robots=robots, episodes=1, task=task, cameras=info["cameras"],
                          image_size=info["image_size"], replay=replay, simulated_robots=1)
    rep = run_fleet(fleet, RobotSettings(endpoint=endpoint, control_rate_hz=rate, max_steps=max_steps,
                                         request_timeout_s=120))
    o = rep["overall"]
    return {"on_time_pct": o["on_time_pct"], "latency_ms_p50": o["latency_ms_p50"],
            "latency_ms_p99": o["latency_ms_p99"], "robots_on_time": rep["robots_on_time"],
            "min_robot_on_time_pct": min((r["on_time_pct"] for r in rep["per_robot"] if r["on_time_pct"] is not None),
                                         default=None),
            "chunks": o["on_time_chunks"] + o["late_chunks"], "stalls": o["stalls"], "errors": o["error_examples"],
            "wall_s": rep["wall_s"], "load": load()}


def plot_fleet(rows: dict[str, list[dict]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for (name, points), color in zip(rows.items(), ("tab:blue", "tab:orange"), strict=False):
        n = [p["robots"] for p in points]
        ax.plot(n, [p["latency_ms_p50"] for p in points], "o-", color=color, label=f"{name} p50")
        ax.plot(n, [p["latency_ms_p99"] for p in points], "s--", color=color, label=f"{name} p99")
    ax.set_xlabel("robots")
    ax.set_ylabel("chunk round trip (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_mlflow(result: dict, plot: Path, data_dir: Path) -> str:
    """The figures and the plot as one run of experiment ``lingbot-bench-serving`` in the local tracking store."""
    import mlflow

    from pipelines.settings import default_tracking_uri
    from pipelines.tracking_store import ensure_experiment

    mlflow.set_tracking_uri(default_tracking_uri(data_dir))
    with mlflow.start_run(experiment_id=ensure_experiment("lingbot-bench-serving", data_dir),
                          run_name="serving-quick" if result["quick"] else "serving") as run:
        mlflow.log_params({"model_source": result["model_source"], "quick": result["quick"],
                           "cores": result["machine"]["cores"]})
        mlflow.log_metrics({k: float(v) for k, v in result.items() if isinstance(v, int | float) and v is not None
                            and not isinstance(v, bool)})
        mlflow.log_metrics({f"fleet_robots_on_time_{k}": v for k, v in result["fleet_robots_on_time"].items()})
        for mode, points in result["fleet"]["points"].items():
            for p in points:
                mlflow.log_metrics({f"fleet_{mode}_latency_ms_p50": p["latency_ms_p50"] or 0.0,
                                    f"fleet_{mode}_latency_ms_p99": p["latency_ms_p99"] or 0.0,
                                    f"fleet_{mode}_on_time_pct": p["on_time_pct"] or 0.0}, step=p["robots"])
        mlflow.log_artifact(str(plot))
        mlflow.log_dict(result, "serving.json")
        return run.info.run_id


# --- main ------------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=None, help="model of the episodes and the fleet (see above)")
    ap.add_argument("--task", default=None, help="default: the model's first task")
    ap.add_argument("--sizes", default="64,96", help="overhead: square view sizes (px), two cameras each")
    ap.add_argument("--sessions", type=int, default=8, help="overhead: counted sessions per transport and size")
    ap.add_argument("--session-steps", type=int, default=30, help="overhead: requests per session (reset included; "
                                                                  "a robot's episode is about that long)")
    ap.add_argument("--episodes", type=int, default=20, help="async vs sync: episodes per mode and rate")
    ap.add_argument("--max-steps", type=int, default=120, help="async vs sync: robot steps per episode")
    ap.add_argument("--rate-factors", default="0.5,1,2", help="async vs sync: rates as multiples of the rate where "
                                                              "a chunk's execution time equals the sync plan time")
    ap.add_argument("--fleet-rate-hz", type=float, default=None, help="fleet: control rate (default: the "
                                                                      "embodiment's, 80 Hz for Meta-World)")
    ap.add_argument("--max-robots", type=int, default=24, help="fleet: largest fleet tried")
    ap.add_argument("--fleet-max-steps", type=int, default=320, help="fleet: robot steps per episode (320 at 80 Hz: "
                                                                   "20 chunks of 16)")
    ap.add_argument("--replay", default=None, help="fleet: LeRobot dataset the robots replay (default: "
                                                    "data/episodes/metaworld-<task> if present, else synthetic)")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads of the server (the demo serves "
                                                                  "with 1)")
    ap.add_argument("--server-args", default="", help="more policy server flags for every phase, e.g. "
                                                      "'--max-batch-size 16 --max-wait-ms 10'")
    ap.add_argument("--data-dir", type=Path, default=REPO / "data", help="MLflow tracking store's data root")
    ap.add_argument("--quick", action="store_true", help="small sizes: proves the benchmark runs (figures invalid)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    # `kill` (SIGTERM) unwinds like Ctrl-C, so every `with ServerProcess(...)` stops its server: no orphan left serving
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.sessions, args.session_steps, args.episodes, args.max_steps = 2, 10, 1, 48
        args.max_robots, args.fleet_max_steps, args.rate_factors = 2, 48, "1"
    logging.getLogger("kserve.trace").setLevel(logging.CRITICAL)
    result: dict = {"quick": args.quick, "command": " ".join([Path(sys.executable).name, *sys.argv])}
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
               "load_before": load()}
    t0 = time.perf_counter()

    from model.policy import ChunkPolicy
    from pipelines.data.embodiments import get_adapter

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        server_args = args.server_args.split()
        env = {"OMP_NUM_THREADS": str(args.server_threads), "MKL_NUM_THREADS": str(args.server_threads)}
        overhead = {f"{s}px": overhead_at(int(s), scratch, args.sessions, args.session_steps, server_args, env)
                    for s in args.sizes.split(",")}
        demo = overhead[f"{args.sizes.split(',')[0]}px"]  # the demo's size comes first

        model_dir, source = pick_model(args.model_dir, scratch)
        policy = ChunkPolicy.load(model_dir, get_adapter)
        task = args.task or policy.tasks[0]
        info = {"cameras": list(policy.cameras), "image_size": policy.image_size or 96}
        replay = args.replay or next((str(p) for p in [REPO / "data" / "episodes" / f"metaworld-{task}"]
                                      if (p / "meta" / "info.json").is_file()), "synthetic")
        with ServerProcess(model_dir, scratch / "episodes.log", args=server_args, env=env) as server:
            plan = measure_round_trips(server.grpc_endpoint, "grpc", policy, task, 2 if args.quick else 4,
                                       args.session_steps, mode="sync")
            plan_ms = pct(plan["round_trip_ms"], 50)
            rate_eq = equal_rate_hz(policy.steps_per_chunk, plan_ms)
            rates = [rate_eq * float(f) for f in args.rate_factors.split(",")]
            by_rate = [episodes_by_mode(server.grpc_endpoint, task, info, args.episodes, args.max_steps, r)
                       for r in rates]
        at_eq = min(by_rate, key=lambda r: abs(r["control_rate_hz"] - rate_eq))

        fleet_rate = args.fleet_rate_hz or policy.adapter.spec.control_rate_hz
        counts = robot_counts(args.max_robots)
        capacity, points = {}, {}
        for name, extra in (("batching", []), ("no_batching", ["--no-batching"])):
            with ServerProcess(model_dir, scratch / f"fleet-{name}.log", args=server_args + extra, env=env) as server:
                capacity[name], points[name] = find_capacity(
                    lambda n, ep=server.grpc_endpoint: fleet_point(ep, task, info, n, args.fleet_max_steps,
                                                                   fleet_rate, replay), counts)

    machine["load_after"] = load()  # includes the benchmark's own server and robots
    # a figure is of the endpoint only if nothing else ran: the 1-minute load before the run says whether it did
    machine["idle_at_start"] = machine["load_before"]["load_avg_1m_5m_15m"][0] < 0.25 * (os.cpu_count() or 1)
    result.update({
        "grpc_overhead_ms_p50": demo["grpc"]["overhead_ms_p50"], "grpc_overhead_ms_p99": demo["grpc"]["overhead_ms_p99"],
        "rest_overhead_ms_p50": demo["rest"]["overhead_ms_p50"], "rest_overhead_ms_p99": demo["rest"]["overhead_ms_p99"],
        "request_bytes": demo["request"]["grpc_message_bytes"],
        "decode_ms_p50": demo["grpc"]["decode_ms_p50"],
        "async_vs_sync_speedup": at_eq["speedup"],
        "async_success_rate": at_eq["async"]["success_rate"], "sync_success_rate": at_eq["sync"]["success_rate"],
        "fleet_robots_on_time": capacity,
        "overhead": overhead,
        "async_vs_sync": {"model_dir": str(model_dir), "model_source": source, "task": task, **info,
                          "steps_per_chunk": policy.steps_per_chunk, "sync_plan_ms_p50": plan_ms,
                          "equal_rate_hz": rate_eq, "episodes_per_mode": args.episodes, "max_steps": args.max_steps,
                          "rates": by_rate},
        "fleet": {"model_dir": str(model_dir), "control_rate_hz": fleet_rate, "max_steps": args.fleet_max_steps,
                  "deadline_ms": 50.0, "on_time_threshold_pct": ON_TIME_PCT, "replay": replay, "simulated_robots": 1,
                  "counts_tried": counts, "points": points},
        "server": {"threads": args.server_threads, "args": server_args},
        "model_source": source, "wall_s": time.perf_counter() - t0, "machine": machine,
    })
    plot = args.out.parent / (args.out.stem + "_fleet.png")
    plot_fleet(points, plot, f"{'QUICK REHEARSAL (not a result); ' if args.quick else ''}on time: {capacity}; "
                             f"{fleet_rate:g} Hz; load {machine['load_before']['load_avg_1m_5m_15m']} on "
                             f"{machine['cores']} cores")
    result["fleet"]["plot"] = str(plot)
    result["mlflow_run_id"] = log_mlflow(result, plot, args.data_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
