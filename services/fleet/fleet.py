"""N simulated Meta-World robots, one process each, running episodes against one policy endpoint (and its canary).

With ``FleetSettings.replay`` all but the first ``simulated_robots`` robots replay recorded observations instead
(``services.robot_client.replay``): a load test whose robots cost the machine little besides their requests.

Every robot process builds a ``MetaWorldRobot`` per episode and drives it with its own ``RobotRuntime`` (its own
gRPC channel and session per episode), exactly as an edge device would; with a canary endpoint each episode runs
whole on the endpoint its session id picks. The processes are started with "spawn" (MuJoCo / OpenGL state does not
survive ``fork``) and released together once all have loaded, so the endpoint sees the robots concurrently. The
report has per-robot and overall success, on-time chunk share, request latency percentiles, stalls, holds and
resets, how many robots were served on time, and success per model version (stable vs canary, episode by
episode).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from typing import Any

import numpy as np

from services.fleet.settings import FleetSettings
from services.robot_client.settings import RobotSettings

os.environ.setdefault("MUJOCO_GL", "osmesa")

_SAWYER = "metaworld-sawyer"  # the Meta-World robots' embodiment; replay robots pose as it (its module imports MuJoCo)

# the per-episode numbers summed per robot
_COUNTS = ("steps", "policy_steps", "chunks", "on_time_chunks", "late_chunks", "stalls", "holds", "resets",
           "reconnects", "rejected_chunks", "stale_chunks", "saturated_actions")


def run_fleet(fleet: FleetSettings, robot: RobotSettings) -> dict[str, Any]:
    """Run ``fleet.robots`` robots x ``fleet.episodes`` episodes against ``robot.endpoint`` (and
    ``robot.canary_endpoint``); returns the report."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(fleet.robots + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_robot_process, name=f"robot-{i}", daemon=True,
                         args=(i, fleet.model_dump(), robot.model_dump(), barrier, results))
             for i in range(fleet.robots)]
    for p in procs:
        p.start()
    per_robot: dict[int, dict] = {}
    try:
        # every robot has imported and built its first env; a broken barrier means one failed (its error is queued)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=fleet.start_timeout_s)
        t0 = time.perf_counter()
        budget = fleet.episodes * (robot.episode_timeout_s + 60.0)  # a stuck robot cannot hang the fleet
        while len(per_robot) < fleet.robots and time.perf_counter() - t0 < budget:
            try:
                index, payload = results.get(timeout=1.0)
                per_robot[index] = payload
            except queue.Empty:  # check whether robots died without reporting
                dead = [i for i, p in enumerate(procs) if not p.is_alive() and i not in per_robot]
                with contextlib.suppress(queue.Empty):  # a report written just before exiting may still be in flight
                    while dead:
                        index, payload = results.get(timeout=1.0)
                        per_robot[index] = payload
                for i in dead:
                    per_robot.setdefault(i, {"error": f"robot process exited with code {procs[i].exitcode}",
                                             "episodes": []})
        wall_s = time.perf_counter() - t0
    finally:
        for p in procs:
            p.join(timeout=10.0)
            if p.is_alive():
                p.terminate()
    return report(fleet, robot, per_robot, wall_s)


def _robot_process(index: int, fleet_dump: dict, robot_dump: dict, barrier, results) -> None:
    """One robot: E episodes on variants ``index*E .. index*E+E-1``; reports (index, payload) on ``results``."""
    episodes: list[dict] = []
    error = None
    logging.getLogger("kserve.trace").setLevel(logging.CRITICAL)  # it logs a traceback per failed call; we count them
    try:
        from services.robot_client.client import PolicyClient
        from services.robot_client.runtime import RobotRuntime

        fleet = FleetSettings(**fleet_dump)
        settings = RobotSettings(**{**robot_dump, "robot_id": f"robot-{index}"})
        make = _robot_factory(fleet, index)
        first = make(index * fleet.episodes)
    except Exception as exc:
        barrier.abort()
        results.put((index, {"error": f"{type(exc).__name__}: {exc}", "episodes": []}))
        return
    with contextlib.suppress(threading.BrokenBarrierError):  # another robot failed to start: run anyway
        barrier.wait(timeout=fleet.start_timeout_s)
    try:
        canary = settings.canary_endpoint
        # one channel per robot and endpoint, one session per episode
        with PolicyClient.from_settings(settings) as client, \
                (PolicyClient.from_settings(settings, canary) if canary else contextlib.nullcontext()) as canary_client:
            for e in range(fleet.episodes):
                variant = index * fleet.episodes + e
                robot = first if e == 0 else make(variant)
                try:
                    runtime = RobotRuntime(robot, settings, client=client, canary_client=canary_client)
                    # a Meta-World robot runs the gate's episode of its variant (same sampler seed); replay
                    # robots leave the seed to the server
                    stats = runtime.run_episode(fleet.task, seed=getattr(robot, "seed", None))
                    episodes.append({"variant": variant, **stats.to_dict()})
                finally:
                    robot.close()
    except Exception as exc:  # a robot that breaks is reported, never a crashed fleet
        error = f"{type(exc).__name__}: {exc}"
    results.put((index, {"error": error, "episodes": episodes}))


def _robot_factory(fleet: FleetSettings, index: int):
    """variant -> a new robot: Meta-World, or a replay robot for robots past ``simulated_robots`` with ``replay``."""
    if fleet.replay is None or index < fleet.simulated_robots:
        from services.robot_client.metaworld import MetaWorldRobot

        return lambda variant: MetaWorldRobot(fleet.task, variant, fleet.eval_seed, fleet.cameras, fleet.image_size)
    from pipelines.data.embodiments import get_adapter
    from services.robot_client.replay import ReplayRobot, replay_observations

    frames, states, _ = replay_observations(fleet.replay, fleet.cameras, fleet.image_size,
                                            get_adapter(_SAWYER).spec.state_dim, episode=index, seed=index)
    return lambda variant: ReplayRobot(frames, states, _SAWYER, fleet.cameras)


def summarize_robot(name: str, episodes: list[dict], error: str | None = None) -> dict[str, Any]:
    """Per-robot numbers from its episodes' ``EpisodeStats.to_dict()`` records."""
    out: dict[str, Any] = {"robot": name, "episodes": len(episodes),
                           "successes": sum(bool(e["success"]) for e in episodes)}
    out["success_rate"] = out["successes"] / len(episodes) if episodes else 0.0
    for key in _COUNTS:
        out[key] = sum(int(e[key]) for e in episodes)
    accounted = out["on_time_chunks"] + out["late_chunks"]
    out["on_time_pct"] = 100.0 * out["on_time_chunks"] / accounted if accounted else None
    lat = np.asarray([x for e in episodes for x in e["latency_ms"]])
    out["latency_ms_p50"] = float(np.percentile(lat, 50)) if lat.size else None
    out["latency_ms_p99"] = float(np.percentile(lat, 99)) if lat.size else None
    out["requests"] = int(lat.size)
    out["stall_s"] = float(sum(e["stall_s"] for e in episodes))
    out["episode_wall_s"] = float(np.mean([e["wall_s"] for e in episodes])) if episodes else None
    errors = [e["error"] for e in episodes if e["error"]] + ([error] if error else [])
    out["errors"] = len(errors)
    out["error_examples"] = sorted(set(errors))[:3]
    return out


def by_version(episodes: list[dict]) -> dict[str, dict[str, Any]]:
    """Episodes, successes and success rate per model version (each episode ran on one), with the routes they took:
    the stable-vs-canary comparison. Episodes that never got a chunk are under ``"none"``."""
    out: dict[str, dict[str, Any]] = {}
    for e in episodes:
        row = out.setdefault(e.get("model_version") or "none", {"episodes": 0, "successes": 0, "routes": []})
        row["episodes"] += 1
        row["successes"] += int(bool(e["success"]))
        if e.get("route") not in row["routes"]:
            row["routes"].append(e.get("route"))
    for row in out.values():
        row["success_rate"] = row["successes"] / row["episodes"]
    return dict(sorted(out.items()))


def report(fleet: FleetSettings, robot: RobotSettings, per_robot: dict[int, dict], wall_s: float) -> dict[str, Any]:
    """The fleet report: settings, per-robot summaries, overall numbers, per model version numbers and the episodes
    (without raw latencies)."""
    robots, all_episodes = [], []
    for i in range(fleet.robots):
        payload = per_robot.get(i, {"error": "no report (the fleet's time budget ran out)", "episodes": []})
        robots.append(summarize_robot(f"robot-{i}", payload["episodes"], payload["error"]))
        all_episodes.extend({"robot": f"robot-{i}", **e} for e in payload["episodes"])
    overall = summarize_robot("all", all_episodes)
    overall["errors"] = sum(r["errors"] for r in robots)
    overall["error_examples"] = sorted({x for r in robots for x in r["error_examples"]})[:3]
    on_time = [r for r in robots if r["on_time_pct"] is not None and r["on_time_pct"] >= fleet.on_time_threshold_pct]
    return {
        "endpoint": robot.endpoint, "canary_endpoint": robot.canary_endpoint, "canary_percent": robot.canary_percent,
        "transport": robot.transport, "mode": robot.mode, "task": fleet.task,
        "robots": fleet.robots, "episodes_per_robot": fleet.episodes, "control_rate_hz": robot.control_rate_hz,
        "deadline_ms": 1000.0 * robot.deadline_s, "on_time_threshold_pct": fleet.on_time_threshold_pct,
        "robots_on_time": len(on_time), "wall_s": wall_s,
        "per_robot": robots, "overall": overall, "versions": by_version(all_episodes),
        "episodes": [{k: v for k, v in e.items() if k != "latency_ms"} for e in all_episodes],
    }


def table(rep: dict[str, Any]) -> str:
    """The per-robot table as aligned text."""
    head = (f"{'robot':<10}{'eps':>5}{'success':>9}{'on-time %':>11}{'p50 ms':>9}{'p99 ms':>9}{'stalls':>8}"
            f"{'holds':>7}{'resets':>8}{'err':>5}")
    lines = [head, "-" * len(head)]

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    for r in [*rep["per_robot"], rep["overall"]]:
        lines.append(f"{r['robot']:<10}{r['episodes']:>5}{r['success_rate']:>9.2f}{fmt(r['on_time_pct'], '.1f'):>11}"
                     f"{fmt(r['latency_ms_p50'], '.1f'):>9}{fmt(r['latency_ms_p99'], '.1f'):>9}{r['stalls']:>8}"
                     f"{r['holds']:>7}{r['resets']:>8}{r['errors']:>5}")
    lines.append(f"{rep['robots_on_time']} of {rep['robots']} robots served on time "
                 f"(>= {rep['on_time_threshold_pct']:.0f}% of chunks within {rep['deadline_ms']:.0f} ms); "
                 f"mode {rep['mode']}, {rep['wall_s']:.1f} s")
    for version, row in rep.get("versions", {}).items():
        lines.append(f"  {version} ({'/'.join(map(str, row['routes']))}): {row['episodes']} episodes, success "
                     f"{row['success_rate']:.2f}")
    for r in rep["per_robot"]:
        for err in r["error_examples"]:
            lines.append(f"  {r['robot']}: {err}")
    return "\n".join(lines)
