"""A simulated fleet (robot processes) against the real policy server on 127.0.0.1 and a canary server beside it,
through `lingbot fleet`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "robot_client"))
from server_process import MODEL_DIRS, ServerProcess

sys.path.insert(0, str(MODEL_DIRS))
from model_dirs import TASK, write_model_dir

from model.policy import ChunkPolicy
from pipelines.cli import main
from pipelines.data.embodiments import get_adapter
from pipelines.evaluate.rollout import run_episode
from services.fleet.fleet import by_version, run_fleet, summarize_robot, table
from services.fleet.settings import FleetSettings
from services.policy_server.models import content_hash
from services.robot_client.settings import RobotSettings


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    with ServerProcess(write_model_dir(root / "model"), root / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def canary(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet-canary")
    with ServerProcess(write_model_dir(root / "model", seed=1), root / "server.log") as srv:
        yield srv


def test_fleet_command_runs_two_robots_and_writes_the_report(server, canary, tmp_path, capsys):
    out = tmp_path / "fleet.json"
    code = main(["fleet", "--endpoint", server.grpc_endpoint, "--canary-endpoint", canary.grpc_endpoint,
                 "--canary-percent", "50", "--robots", "2", "--episodes", "1", "--task", TASK,
                 "--max-steps", "24", "--image-size", "32", "--control-rate-hz", "20", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "robot-0" in printed and "robot-1" in printed and "of 2 robots served on time" in printed
    rep = json.loads(out.read_text())
    assert rep["robots"] == 2 and rep["mode"] == "async" and rep["task"] == TASK
    assert [r["robot"] for r in rep["per_robot"]] == ["robot-0", "robot-1"]
    for r in rep["per_robot"]:
        assert r["episodes"] == 1 and r["errors"] == 0, r["error_examples"]
        assert r["steps"] == 24 or r["successes"] == 1
        assert r["chunks"] >= 3 and r["requests"] >= r["chunks"]
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p99"]
        assert 0.0 <= r["on_time_pct"] <= 100.0 and r["stalls"] >= 0
    assert 0 <= rep["robots_on_time"] <= 2
    assert rep["overall"]["episodes"] == 2 and rep["overall"]["chunks"] == sum(r["chunks"] for r in rep["per_robot"])
    episodes = rep["episodes"]
    assert sorted(e["variant"] for e in episodes) == [0, 1]
    assert len({e["session_id"] for e in episodes}) == 2  # one session per robot episode
    assert all("latency_ms" not in e for e in episodes)
    # each episode ran whole on the endpoint its session id picked, and the report groups them by that version
    versions = {"stable": f"dir-{content_hash(server.model)}", "canary": f"dir-{content_hash(canary.model)}"}
    assert rep["canary_endpoint"] == canary.grpc_endpoint and rep["canary_percent"] == 50
    for e in episodes:
        assert e["model_version"] == versions[e["route"]] and e["resets"] == 0 and e["stale_chunks"] == 0
    assert sum(row["episodes"] for row in rep["versions"].values()) == 2
    for version, row in rep["versions"].items():
        assert row["routes"] == [next(r for r, v in versions.items() if v == version)]


def test_a_robot_that_cannot_start_is_reported_not_fatal(tmp_path):
    fleet = FleetSettings(robots=1, task=TASK, cameras=("corner4", "no-such-camera"), image_size=32,
                          start_timeout_s=60)
    rep = run_fleet(fleet, RobotSettings(endpoint="127.0.0.1:9"))  # never contacted
    (robot,) = rep["per_robot"]
    assert robot["episodes"] == 0 and robot["errors"] == 1
    assert "unknown camera" in robot["error_examples"][0]
    assert rep["robots_on_time"] == 0


def test_robot_summary_aggregates_its_episodes():
    def episode(on_time, late, latency, success, error=None):
        return {"success": success, "steps": 10, "policy_steps": 8, "chunks": on_time + late + 1,
                "on_time_chunks": on_time, "late_chunks": late, "stalls": late, "holds": 2 * late, "resets": 0,
                "reconnects": 0, "rejected_chunks": 0, "stale_chunks": 0, "saturated_actions": 0, "stall_s": 0.1 * late,
                "wall_s": 1.0, "latency_ms": latency, "error": error}

    summary = summarize_robot("r", [episode(9, 1, [10.0, 20.0], True), episode(10, 0, [30.0, 40.0], False, "x")])
    assert summary["episodes"] == 2 and summary["successes"] == 1 and summary["success_rate"] == 0.5
    assert summary["on_time_pct"] == pytest.approx(95.0)  # 19 of 20 accounted chunks
    assert summary["latency_ms_p50"] == pytest.approx(25.0) and summary["requests"] == 4
    assert summary["stalls"] == 1 and summary["holds"] == 2 and summary["errors"] == 1
    assert summarize_robot("r", [])["on_time_pct"] is None


def test_report_compares_model_versions_episode_by_episode():
    episodes = [{"model_version": "m/1", "route": "stable", "success": True},
                {"model_version": "m/2", "route": "canary", "success": False},
                {"model_version": "m/1", "route": "stable", "success": False},
                {"model_version": "m/2", "route": "canary", "success": True},
                {"model_version": "m/2", "route": "canary", "success": True},
                {"model_version": None, "route": "canary", "success": False}]  # never got a chunk
    versions = by_version(episodes)
    assert versions == {
        "m/1": {"episodes": 2, "successes": 1, "routes": ["stable"], "success_rate": 0.5},
        "m/2": {"episodes": 3, "successes": 2, "routes": ["canary"], "success_rate": pytest.approx(2 / 3)},
        "none": {"episodes": 1, "successes": 0, "routes": ["canary"], "success_rate": 0.0}}
    rep = {"per_robot": [], "overall": summarize_robot("all", []), "robots_on_time": 0, "robots": 0,
           "on_time_threshold_pct": 95.0, "deadline_ms": 50.0, "mode": "async", "wall_s": 1.0, "versions": versions}
    assert "  m/2 (canary): 3 episodes, success 0.67" in table(rep).splitlines()


def test_replay_robots_load_the_endpoint_beside_one_simulated_robot(server):
    """Robots past ``simulated_robots`` replay observations (here synthetic frames of the model's size): they are
    served like any robot, never succeed and run their step budget."""
    fleet = FleetSettings(robots=2, task=TASK, image_size=32, replay="synthetic", simulated_robots=1)
    rep = run_fleet(fleet, RobotSettings(endpoint=server.grpc_endpoint, control_rate_hz=20, max_steps=24))
    sim, replayed = rep["per_robot"]
    for r in (sim, replayed):
        assert r["episodes"] == 1 and r["errors"] == 0, r["error_examples"]
        assert r["chunks"] >= 3 and r["requests"] >= r["chunks"]
    assert replayed["steps"] == 24 and replayed["successes"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_gate_and_a_fleet_robot_execute_the_same_actions(server, mode):
    """One episode, two drivers: the gate's rollout (in-process server, lockstep simulator) and a fleet robot (its own
    process, gRPC to the real server, paced in real time) on variant 0 with the same model and seed execute the same
    action sequence, bit for bit. The robot's deadline is generous, so it never holds (a hold is a command the gate
    never sends)."""
    gate = run_episode(ChunkPolicy.load(server.model, get_adapter), TASK, 0, mode=mode, max_steps=24)
    assert gate.error is None, gate.error
    robot = RobotSettings(endpoint=server.grpc_endpoint, mode=mode, max_steps=24, deadline_ms=120_000,
                          request_timeout_s=120.0)
    rep = run_fleet(FleetSettings(robots=1, episodes=1, task=TASK, image_size=32), robot)
    (episode,) = rep["episodes"]
    assert episode["error"] is None and episode["variant"] == 0 and episode["holds"] == 0, episode
    assert (episode["actions_digest"], episode["steps"], episode["success"], episode["chunks"]) == \
        (gate.actions_digest, gate.steps, gate.success, gate.chunks)
