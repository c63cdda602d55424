"""`lingbot demo` (`make demo`): the whole lifecycle on one machine, on the embedded defaults of ``demo_params.yaml``.

    dvc repro      collect -> prepare -> encode -> pretrain -> posttrain@<task> -> evaluate@<task> (the simulation
                   gate, which promotes the candidate to alias ``champion``), in the demo's own DVC workspace
    serve + fleet  per task, `lingbot serve` of ``models:/lingbot-va-<task>@champion`` on 127.0.0.1, then
                   `lingbot fleet` (simulated Meta-World robots pulling action chunks from it); one task at a time,
                   because the server holds one model and concurrent endpoints would share the CPU and blur latency
    summary        per task: gate success, fleet success, gate decision, endpoint latency p50/p99, on-time chunk %;
                   an `mlflow server` (the MLflow UI) over the demo's tracking store is left running and announced

The workspace (default ``data/demo``; ``data/demo-quick`` with ``--quick``) is a DVC project of its own
(``dvc init --no-scm``): ``dvc.yaml`` generated from the repository's, ``params.yaml`` = the repository's with the
demo's ``pipeline`` section merged over it, and its own ``data/`` (episodes, latents, runs, MLflow store), cache and
lock. Why not the repository's DVC project: DVC reads ``params.yaml`` and writes outputs next to ``dvc.yaml`` and has
no per-invocation params file (``dvc exp run -S`` needs git and edits params.yaml in place), so a second project is
the only way to keep `make train`'s workspace untouched; generating its ``dvc.yaml`` keeps one definition of the DAG.
A second run finds every stage unchanged and only serves, drives the fleet and summarises.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipelines.settings import REPO_ROOT, default_tracking_uri
from services.policy_server.process import ServerProcess, free_port

DEFAULT_PARAMS = Path(__file__).with_name("demo_params.yaml")
UI_FILE = "mlflow-ui.json"
SUMMARY_FILE = "demo.json"
UI_START_S = 180.0  # `mlflow server` imports its whole app before it listens: ~25 s on 2 busy cores
_STAGE_LINE = re.compile(r"^(?:Running stage '(?P<ran>[^']+)'|Stage '(?P<same>[^']+)' didn't change"
                         r"|Stage '(?P<cached>[^']+)' is cached)")


def default_workspace(quick: bool) -> Path:
    return REPO_ROOT / "data" / ("demo-quick" if quick else "demo")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_params(path: Path = DEFAULT_PARAMS, quick: bool = False) -> dict:
    """The demo's parameters (``quick`` merged over the rest with ``--quick``), validated."""
    params = yaml.safe_load(Path(path).read_text())
    quick_over = params.pop("quick", {}) or {}
    if quick:
        params = _merge(params, quick_over)
    missing = {"pipeline", "serve", "fleet", "ui"} - set(params)
    if missing:
        raise ValueError(f"{path}: missing sections {sorted(missing)}")
    from pipelines.evaluate.gate import GateSettings

    unknown = set(params["pipeline"].get("gate", {})) - set(GateSettings.model_fields)
    if unknown:
        raise ValueError(f"{path}: pipeline.gate has unknown settings {sorted(unknown)}")
    collect = str(params["pipeline"]["collect"]["tasks"])
    tasks = list(params["pipeline"]["posttrain"]["tasks"])
    if collect not in ("MT10", "MT50") and set(tasks) - set(collect.split(",")):
        raise ValueError(f"{path}: posttrain tasks {sorted(set(tasks) - set(collect.split(',')))} are not collected")
    return params


def run_demo(params: dict, workspace: Path, ui_port: int | None = None) -> dict:
    """Run the lifecycle in ``workspace``; print the summary table and the MLflow UI's address; return the summary
    (also written to ``<workspace>/demo.json``). Leaves only the announced MLflow UI running."""
    from tqdm import tqdm

    from pipelines.evaluate.gate import GateSettings

    start, workspace = time.monotonic(), Path(workspace).resolve()
    pipeline, tasks = params["pipeline"], list(params["pipeline"]["posttrain"]["tasks"])
    ignored = sorted(k for k in os.environ if k.startswith("LINGBOT_"))
    if ignored:
        print(f"demo: ignoring {', '.join(ignored)}: the demo runs on its embedded defaults")
    env = child_env(pipeline.get("gate", {}))
    print(f"demo: workspace {workspace}; dvc repro of {len(tasks)} task(s), then serve + fleet per task", flush=True)
    dvc_params = prepare_workspace(workspace, params, env)
    stages = dvc_repro(workspace, env, workspace / "logs" / "dvc-repro.log")
    ui, ui_proc = start_ui(workspace, params["ui"]["port"] if ui_port is None else ui_port, env)
    rows, server_pids = [], []
    try:
        bar = tqdm(tasks, desc="serve + fleet", unit="task", disable=None)
        for i, task in enumerate(bar):
            version, fleet = champion(workspace, task), None
            if version is not None:  # the UI starts while the first server loads, and is up before any robot runs
                bar.set_postfix_str(f"{task}: champion v{version}")
                ui_up = (lambda: wait_ui(ui, ui_proc)) if i == 0 else (lambda: None)
                fleet = serve_and_drive(workspace, task, params, env, ui_up)
                server_pids.append(fleet["server_pid"])
                tqdm.write(f"fleet on {task} (champion v{version}):\n{fleet['table']}")
            rows.append(summary_row(workspace, task, fleet, version))
        bar.close()
        wait_ui(ui, ui_proc)
    except BaseException:
        if ui_proc is not None:
            stop_ui(workspace)
        raise
    summary = {"workspace": str(workspace), "wall_s": round(time.monotonic() - start, 1), "dvc": stages,
               "gate": {**{k: GateSettings.model_fields[k].default for k in ("min_success", "max_regression")},
                        **pipeline.get("gate", {})},
               "evaluate": dvc_params["evaluate"], "fleet": params["fleet"], "rows": rows, "ui": ui,
               "server_pids": server_pids}
    (workspace / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    return summary


def report(summary: dict) -> str:
    """The summary table and what it was measured with, then the UI's address and how to stop it."""
    from pipelines.evaluate.gate import GateSettings

    dvc, gate, ev, fleet = summary["dvc"], summary["gate"], summary["evaluate"], summary["fleet"]
    production = GateSettings.model_fields["min_success"].default
    pid, url = summary["ui"]["pid"], summary["ui"]["url"]
    return "\n".join([
        "",
        f"LingBot-VA demo finished in {summary['wall_s']:.0f} s; dvc repro ran {len(dvc['ran'])} stage(s), "
        f"{len(dvc['unchanged'])} unchanged, {len(dvc['restored'])} restored from the run cache",
        table(summary["rows"]),
        f"gate: min_success {gate['min_success']:.2f} ("
        + ("production" if gate["min_success"] == production else f"production: {production:.2f}") + "), "
        f"{ev['episodes']} held-out episode(s) per task, <= {ev['max_steps']} steps, {ev['mode']} mode",
        f"fleet: {fleet['robots']} robot(s) x {fleet['episodes']} episode(s) per task, {fleet['mode']}, "
        + (f"{fleet['control_rate_hz']:g} Hz, " if fleet.get("control_rate_hz") else "") +
        f"<= {fleet['max_steps']} steps, against `lingbot serve` of models:/lingbot-va-<task>@champion on "
        "127.0.0.1 (one task at a time)",
        *(f"fleet on {r['task']}: {r['fleet_errors']} error(s), see {summary['workspace']}/fleet/{r['task']}.json"
          for r in summary["rows"] if r["fleet_errors"]),
        f"MLflow UI: {url}  (experiments lingbot-pretrain, lingbot-posttrain, lingbot-gate; models lingbot-va-<task>)",
        f"  it keeps running: stop it with `make demo-stop` or `kill -- -{pid}`",
    ])


# ---------------------------------------------------------------------------------------------------------------
# The DVC workspace


def _code_files(path: Path) -> list[Path]:
    """A code dependency as its files: a directory dep would also hash ``__pycache__``, which any later import
    (e.g. `make test`) rewrites, and DVC's ``.dvcignore`` does not apply outside the workspace."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ValueError(f"dvc.yaml depends on {path}, which does not exist")
    # empty files (package __init__s) make DVC warn on every run; filling one adds it, which reruns the stage too
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
                  and p.stat().st_size > 0)


def workspace_dvc_yaml(workspace: Path, gate: bool) -> dict:
    """The repository's ``dvc.yaml`` for ``workspace``: its ``data/...`` paths stay (the workspace's data), code
    dependencies point to the repository's files; ``gate`` adds the params section ``gate`` to the evaluate stages."""
    dag = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    for name, stage in dag["stages"].items():
        body = stage.get("do", stage)
        deps = []
        for dep in body.get("deps", []):
            if dep == "data" or dep.startswith("data/"):
                deps.append(dep)
            else:
                deps += [os.path.relpath(f, workspace) for f in _code_files(REPO_ROOT / dep)]
        body["deps"] = deps
        if gate and name == "evaluate":
            body["params"] = [*body.get("params", []), "gate"]
    return dag


def prepare_workspace(workspace: Path, params: dict, env: dict[str, str]) -> dict:
    """``dvc init --no-scm`` once; ``dvc.yaml`` and ``params.yaml`` rewritten every run (same content: no change).
    Returns the workspace's DVC params."""
    workspace.mkdir(parents=True, exist_ok=True)
    if not (workspace / ".dvc").is_dir():
        for cmd in (["init", "--no-scm", "-q"], ["config", "core.analytics", "false"]):
            subprocess.run([sys.executable, "-m", "dvc", *cmd], cwd=workspace, env=env, check=True)
    pipeline = params["pipeline"]
    header = f"# generated by `lingbot demo` from {REPO_ROOT / 'dvc.yaml'} (code deps: the repository's files)\n"
    dag = workspace_dvc_yaml(workspace, gate="gate" in pipeline)
    (workspace / "dvc.yaml").write_text(header + yaml.safe_dump(dag, sort_keys=False, width=1000))
    merged = _merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), pipeline)
    header = "# generated by `lingbot demo`: params.yaml of the repository + the demo's `pipeline` parameters\n"
    (workspace / "params.yaml").write_text(header + yaml.safe_dump(merged, sort_keys=False, width=1000))
    return merged


def dvc_repro(workspace: Path, env: dict[str, str], log: Path) -> dict[str, list[str]]:
    """``dvc repro`` with its output shown (stage commands' progress bars go straight to stderr) and logged;
    returns the stages it ran, found unchanged, or restored from DVC's run cache."""
    stages: dict[str, list[str]] = {"ran": [], "unchanged": [], "restored": []}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=workspace, env=env,
                                stdout=subprocess.PIPE, text=True, bufsize=1)
        for line in proc.stdout:
            print(line, end="", flush=True)
            out.write(line)
            if m := _STAGE_LINE.match(line):
                stages["ran" if m["ran"] else "unchanged" if m["same"] else "restored"].append(
                    m["ran"] or m["same"] or m["cached"])
    if proc.wait() != 0:
        raise RuntimeError(f"dvc repro failed with exit code {proc.returncode} (log: {log})")
    return stages


# ---------------------------------------------------------------------------------------------------------------
# The MLflow UI


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ui_record(workspace: Path) -> dict | None:
    """The UI a previous run left, if that process still is our ``mlflow server`` (pids get reused)."""
    try:
        record = json.loads((workspace / UI_FILE).read_text())
        cmdline = Path(f"/proc/{record['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError, KeyError):
        return None
    return record if "mlflow" in cmdline and str(workspace / "data" / "mlflow") in cmdline else None


def start_ui(workspace: Path, port: int, env: dict[str, str]) -> tuple[dict, subprocess.Popen | None]:
    """Start `mlflow server` on 127.0.0.1 in its own session (it outlives the demo), or reuse the running one."""
    record = _ui_record(workspace)
    if record is not None and _healthy(record["url"]):
        return record, None
    if record is not None:
        stop_ui(workspace)
    if port == 0 or not _port_free(port):
        port = free_port()
    store = workspace / "data" / "mlflow"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "artifacts")]
    log = workspace / "logs" / "mlflow-ui.log"
    with log.open("w") as out:  # its job runner serves GenAI jobs only: off, it leaves the cores alone
        proc = subprocess.Popen(cmd, cwd=workspace, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    record = {"pid": proc.pid, "url": f"http://127.0.0.1:{port}", "log": str(log)}
    (workspace / UI_FILE).write_text(json.dumps(record) + "\n")
    return record, proc


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_ui(record: dict, proc: subprocess.Popen | None) -> None:
    deadline = time.monotonic() + UI_START_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{Path(record['log']).read_text()[-3000:]}")
        if _healthy(record["url"]):
            return
        time.sleep(0.5)
    raise TimeoutError(f"mlflow server not healthy after {UI_START_S} s (log: {record['log']})")


def stop_ui(workspace: Path) -> int | None:
    """Stop the MLflow UI a demo left running in ``workspace`` (its process group: uvicorn runs as a child)."""
    record = _ui_record(workspace)
    (workspace / UI_FILE).unlink(missing_ok=True)
    if record is None:
        return None
    with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
        os.killpg(record["pid"], signal.SIGTERM)
        for _ in range(100):
            if _zombie(record["pid"]):
                break
            time.sleep(0.2)
        else:
            os.killpg(record["pid"], signal.SIGKILL)
    return record["pid"]


def _zombie(pid: int) -> bool:
    """Ended: gone, or a zombie its (already exited) parent never reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ---------------------------------------------------------------------------------------------------------------
# Serve, drive, summarise


def champion(workspace: Path, task: str) -> str | None:
    """Version behind ``models:/lingbot-va-<task>@champion`` in the workspace's registry, or None."""
    import mlflow

    from pipelines.train.registry import registered_name_for

    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(workspace / "data"))
    try:
        version = client.get_registered_model(registered_name_for("posttrain", task)).aliases.get("champion")
    except mlflow.exceptions.MlflowException:  # not registered (yet)
        return None
    return None if version is None else str(version)


def serve_and_drive(workspace: Path, task: str, params: dict, env: dict[str, str],
                    before_fleet: Callable[[], None] = lambda: None) -> dict:
    """`lingbot serve` of the task's champion on 127.0.0.1, `lingbot fleet` against it; the fleet report."""
    fleet, image_size = params["fleet"], params["pipeline"]["collect"]["image_size"]
    logs, out = workspace / "logs", workspace / "fleet" / f"{task}.json"
    threads = str(params["serve"]["threads"])
    server = ServerProcess(f"models:/lingbot-va-{task}@champion", logs / f"serve-{task}.log", cwd=workspace,
                           args=["--data-dir", str(workspace / "data")], base_env=env,
                           env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    out.unlink(missing_ok=True)  # a report from an earlier run must not stand in for a failed one
    with server:
        before_fleet()
        cmd = [sys.executable, "-m", "pipelines.cli", "fleet", "--endpoint", server.grpc_endpoint, "--task", task,
               "--robots", str(fleet["robots"]), "--episodes", str(fleet["episodes"]), "--mode", fleet["mode"],
               "--max-steps", str(fleet["max_steps"]), "--image-size", str(image_size), "--json", str(out)]
        if fleet.get("control_rate_hz"):
            cmd += ["--control-rate-hz", str(fleet["control_rate_hz"])]
        with (logs / f"fleet-{task}.log").open("w") as log:
            proc = subprocess.run(cmd, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        server_pid = server.pid
    if not out.is_file():
        raise RuntimeError(f"lingbot fleet for {task} wrote no report (exit {proc.returncode}; log {log.name})")
    return {**json.loads(out.read_text()), "table": proc.stdout, "server_pid": server_pid}


def summary_row(workspace: Path, task: str, fleet: dict | None, version: str | None) -> dict:
    gate_report = json.loads((workspace / "data" / "metrics" / f"eval-{task}.json").read_text())
    gate = gate_report.get("gate") or {"passed": False, "reasons": ["not gated"]}
    decision = "promoted" if gate["passed"] else "rejected: " + "; ".join(gate["reasons"])
    overall = (fleet or {}).get("overall", {})
    return {"task": task, "gate_success": gate_report["tasks"][task]["success_rate"],
            "gate_episodes": gate_report["tasks"][task]["episodes"], "gate_decision": decision,
            "candidate_version": gate_report.get("model_version"), "served_version": version,
            "fleet_success": overall.get("success_rate"), "fleet_episodes": overall.get("episodes"),
            "latency_ms_p50": overall.get("latency_ms_p50"), "latency_ms_p99": overall.get("latency_ms_p99"),
            "on_time_pct": overall.get("on_time_pct"), "fleet_errors": overall.get("errors")}


def table(rows: list[dict]) -> str:
    def fmt(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    head = (f"{'task':<26}{'gate success':>13}{'fleet success':>15}{'p50 ms':>9}{'p99 ms':>9}{'on-time %':>11}"
            f"  gate decision")
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        served = f" (serving champion v{r['served_version']})" if r["served_version"] else " (no champion to serve)"
        lines.append(f"{r['task']:<26}{fmt(r['gate_success'], '.2f'):>13}{fmt(r['fleet_success'], '.2f'):>15}"
                     f"{fmt(r['latency_ms_p50'], '.1f'):>9}{fmt(r['latency_ms_p99'], '.1f'):>9}"
                     f"{fmt(r['on_time_pct'], '.1f'):>11}  {r['gate_decision']}{served}")
    return "\n".join(lines)


def child_env(gate: dict) -> dict[str, str]:
    """The stages' and services' environment: embedded defaults, so ``LINGBOT_*`` of the caller are dropped (the
    demo's gate thresholds are set instead); the venv's tools first on PATH; the Makefile's cache and GL settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINGBOT_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # stage output arrives line by line, not at the end of each stage
    for key, value in (("MUJOCO_GL", "osmesa"), ("HF_HUB_OFFLINE", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true"),
                       ("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))):
        env.setdefault(key, value)
    env.update({f"LINGBOT_GATE_{key.upper()}": str(value) for key, value in gate.items()})
    return env
