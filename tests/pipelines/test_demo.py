"""`lingbot demo --quick` end to end in a temporary workspace: real DVC, MLflow, policy server, fleet and MLflow UI.

The quick configuration (tiny preset, 1 task, 3 demos, 32 px, 2 training steps, a 16-step gate episode, 1 robot) runs
the same lifecycle as `make demo`: a second run must find every DVC stage unchanged and only serve and summarise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.demo import default_workspace, load_params, stop_ui, workspace_dvc_yaml

pytestmark = pytest.mark.slow

LINGBOT = Path(sys.executable).parent / "lingbot"
TASK = "reach-v3"
STAGES = ("collect", "prepare", "vae", "encode", "pretrain", f"posttrain@{TASK}", f"evaluate@{TASK}")
COLUMNS = ("task", "gate success", "fleet success", "p50 ms", "p99 ms", "on-time %", "gate decision")


def _session_members(sid: int) -> list[str]:
    """Live processes whose session is ``sid`` (the demo's: every process it started, except the UI's own)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            members.append(f"{stat.parent.name}: {(stat.parent / 'cmdline').read_bytes()[:200]!r}")
    return members


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _api(url: str, body: dict | None = None) -> dict:
    """A call of the MLflow REST API the UI itself uses (GET, or POST with a JSON body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read() or b"{}")


def run_demo(workspace: Path) -> dict:
    # the demo runs on embedded defaults: a caller's LINGBOT_* must not reach its services (this one would make the
    # policy server refuse to start)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
           "LINGBOT_SERVE_MAX_SESSIONS": "0"}
    t0 = time.monotonic()
    # own session: afterwards, any process still in it was started by the demo and left behind
    proc = subprocess.Popen([str(LINGBOT), "demo", "--quick", "--workspace", str(workspace), "--ui-port", "0"],
                            cwd=workspace.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = proc.communicate(timeout=420)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, f"demo failed:\n{out[-4000:]}\n{err[-4000:]}"
    leftovers = _session_members(proc.pid)
    summary = json.loads((workspace / "demo.json").read_text())
    return {"out": out, "wall": wall, "summary": summary, "leftovers": leftovers}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("demo") / "ws"
    workspace.mkdir()
    try:
        first = run_demo(workspace)
        ui = first["summary"]["ui"]
        health_first = urllib.request.urlopen(f"{ui['url']}/health", timeout=10).status
        api = f"{ui['url']}/ajax-api/2.0/mlflow"
        experiments = _api(f"{api}/experiments/search", {"max_results": 100})["experiments"]
        model = _api(f"{api}/registered-models/get?name=lingbot-va-{TASK}")["registered_model"]
        ui_alive, ui_session = _alive(ui["pid"]), os.getsid(ui["pid"])
        stop = subprocess.run([str(LINGBOT), "demo", "--stop", "--workspace", str(workspace)], capture_output=True,
                              text=True, timeout=60)
        ui_after_stop = _alive(ui["pid"])
        second = run_demo(workspace)
        yield {"workspace": workspace, "first": first, "second": second, "health": health_first, "stop": stop,
               "experiments": {e["name"] for e in experiments}, "model": model, "ui_alive": ui_alive,
               "ui_session": ui_session, "ui_after_stop": ui_after_stop}
    finally:
        stop_ui(workspace)


def test_first_run_builds_every_stage_and_prints_the_summary(runs):
    first = runs["first"]
    assert first["summary"]["dvc"]["ran"] == list(STAGES)
    out = first["out"].split("LingBot-VA demo finished", 1)[1]  # the summary, after the stages' own tables
    header = next(line for line in out.splitlines() if line.startswith("task "))
    assert all(column in header for column in COLUMNS), header
    (row,) = [line for line in out.splitlines() if line.startswith(f"{TASK} ")]
    (summary_row,) = first["summary"]["rows"]
    # 2 training steps never succeed; the quick configuration's threshold (min_success 0) promotes anyway, and says so
    assert summary_row["gate_decision"] == "promoted" and summary_row["served_version"] == "1"
    assert summary_row["gate_episodes"] == 1 and 0.0 <= summary_row["gate_success"] <= 1.0
    assert summary_row["fleet_episodes"] == 1 and summary_row["fleet_errors"] == 0
    assert 0 < summary_row["latency_ms_p50"] <= summary_row["latency_ms_p99"]
    assert 0.0 <= summary_row["on_time_pct"] <= 100.0
    assert "promoted (serving champion v1)" in row
    assert f"{summary_row['latency_ms_p50']:.1f}" in row and f"{summary_row['on_time_pct']:.1f}" in row
    assert "gate: min_success 0.00 (production: 0.50)" in out
    assert "stop it with `make demo-stop`" in out
    assert "ignoring LINGBOT_SERVE_MAX_SESSIONS" in first["out"]


def test_the_announced_mlflow_ui_shows_the_demo_runs_and_stops(runs):
    ui = runs["first"]["summary"]["ui"]
    url = re.search(r"MLflow UI: (http://127\.0\.0\.1:\d+)", runs["first"]["out"])[1]
    assert url == ui["url"] and f"kill -- -{ui['pid']}" in runs["first"]["out"]
    assert runs["health"] == 200 and runs["ui_alive"]
    assert runs["ui_session"] == ui["pid"]  # its own session: it outlives the demo on purpose
    assert {"lingbot-pretrain", "lingbot-posttrain", "lingbot-gate"} <= runs["experiments"]
    assert {a["alias"]: a["version"] for a in runs["model"]["aliases"]}["champion"] == "1"
    assert runs["stop"].returncode == 0 and f"pid {ui['pid']}" in runs["stop"].stdout
    assert not runs["ui_after_stop"]


def test_nothing_but_the_ui_is_left_running(runs):
    for run in (runs["first"], runs["second"]):
        assert run["leftovers"] == []
        pids = run["summary"]["server_pids"]
        assert len(pids) == 1 and not any(_alive(pid) for pid in pids)


def test_second_run_reuses_the_dvc_cache_and_is_faster(runs):
    first, second = runs["first"], runs["second"]
    assert second["summary"]["dvc"]["ran"] == [] and second["summary"]["dvc"]["restored"] == []
    assert second["summary"]["dvc"]["unchanged"] == list(STAGES)
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in second["out"]
    assert f"dvc repro ran 0 stage(s), {len(STAGES)} unchanged" in second["out"]
    (row,) = second["summary"]["rows"]
    assert row["served_version"] == "1" and row["fleet_episodes"] == 1  # still serves and drives the fleet
    assert second["wall"] < first["wall"], (first["wall"], second["wall"])


def test_workspace_dvc_yaml_points_code_deps_at_the_repository(tmp_path):
    dag = workspace_dvc_yaml(tmp_path / "ws", gate=True)
    deps = [d for stage in dag["stages"].values() for d in stage.get("do", stage)["deps"]]
    code = [d for d in deps if not d.startswith("data")]
    assert code and all((tmp_path / "ws" / d).resolve().is_file() for d in code)
    assert not any("__pycache__" in d or d.endswith(".pyc") for d in code)
    assert "gate" in dag["stages"]["evaluate"]["do"]["params"]


def test_params_validation_and_defaults(tmp_path):
    full, quick = load_params(), load_params(quick=True)
    assert full["pipeline"]["posttrain"]["tasks"] == ["button-press-topdown-v3", "window-open-v3"]
    assert full["pipeline"]["collect"]["episodes"] == 50 and "gate" not in full["pipeline"]  # production's gate
    assert quick["pipeline"]["gate"]["min_success"] == 0.0
    assert quick["pipeline"]["pretrain"]["preset"] == "tiny" and quick["fleet"]["robots"] == 1
    assert default_workspace(True) != default_workspace(False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: {collect: {tasks: reach-v3}, posttrain: {tasks: [push-v3]}}\nserve: {}\nfleet: {}\n"
                   "ui: {}\n")
    with pytest.raises(ValueError, match="push-v3"):
        load_params(bad)
    bad.write_text("pipeline: {collect: {tasks: reach-v3}, posttrain: {tasks: [reach-v3]}, gate: {min_sucess: 0}}\n"
                   "serve: {}\nfleet: {}\nui: {}\n")
    with pytest.raises(ValueError, match="min_sucess"):
        load_params(bad)
