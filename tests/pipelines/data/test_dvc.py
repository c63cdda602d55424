"""`dvc repro` of the whole DAG (collect -> ... -> evaluate) on a copy of the project, a no-op rerun, push/pull to S3 (moto)."""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import boto3
import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
VENV_BIN = Path(os.sys.executable).parent


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("project")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, root / f)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["collect"].update(tasks="reach-v3", episodes=3, image_size=32, workers=1)
    params["prepare"]["preset"] = params["encode"]["preset"] = params["pretrain"]["preset"] = "tiny"
    params["vae"].update(dims="8,16,16", steps=2, batch=2, max_episodes=3)
    params["pretrain"].update(steps=2, nproc=1, warmup_steps=0)
    params["posttrain"].update(tasks=["reach-v3"], steps=2, nproc=1, warmup_steps=0)
    params["evaluate"].update(episodes=1, workers=1, max_steps=16)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    run(["git", "init", "-q"], root, env)
    out = run(["dvc", "repro"], root, env, timeout=600)
    return root, env, out


def test_repro_builds_every_stage(project):
    root, env, out = project
    for stage in ("collect", "prepare", "vae", "encode", "pretrain", "posttrain@reach-v3", "evaluate@reach-v3"):
        assert f"'{stage}'" in out
    assert (root / "data" / "latents" / "index.json").is_file()
    assert (root / "data" / "runs" / "posttrain-reach-v3" / "model" / "config.json").is_file()
    assert (root / "dvc.lock").is_file()
    # the gate's decision is a metric users read with `dvc metrics show` (2 training steps never pass the gate)
    shown = run(["dvc", "metrics", "show", "--json"], root, env)
    assert "eval-reach-v3.json" in shown and "avg_success" in shown


def test_plots_render(project):
    """`dvc plots show`: the training loss curves, success per task and planning latency, each with data."""
    root, env, _ = project
    shown = json.loads(run(["dvc", "plots", "show", "--json"], root, env))
    assert not shown.get("errors"), shown.get("errors")
    expected = {"pretrain loss", "data/runs/posttrain-reach-v3/loss.csv", "data/metrics/eval-reach-v3.csv",
                "data/metrics/eval-reach-v3-latency.csv"}
    assert expected <= set(shown["data"])
    for plot_id in expected:
        values = shown["data"][plot_id][0]["content"]["data"]["values"]
        assert values, plot_id
    assert {v["task"] for v in shown["data"]["data/metrics/eval-reach-v3.csv"][0]["content"]["data"]["values"]} == {
        "reach-v3"}
    run(["dvc", "plots", "show", "-o", str(root / "plots-html")], root, env)
    assert (root / "plots-html" / "index.html").is_file()


def test_training_and_gate_runs_carry_the_dvc_hashes(project):
    """mlflow.search_runs: training and gate runs list the DVC-hashed data folders as dataset inputs, the gate run
    names the version it judged, and all of them hang under one pipeline parent run."""
    import mlflow

    root, _, _ = project
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5 = {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}
    expected = {name: md5[f"data/{name}"] for name in ("episodes", "prepared", "latents")}
    mlflow.set_tracking_uri(f"sqlite:///{root / 'data' / 'mlflow' / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        training = [r for r in runs if r.data.tags.get("stage") in ("pretrain", "posttrain")]
        gates = [r for r in runs if "gate.decision" in r.data.tags]
        assert len(training) == 2 and len(gates) == 1
        for r in training + gates:
            assert {d.dataset.name: d.dataset.digest for d in r.inputs.dataset_inputs} == expected
            assert {k: r.data.tags[f"dvc.{k}"] for k in expected} == expected
        assert len({r.data.tags["mlflow.parentRunId"] for r in training + gates}) == 1
        (gate,) = gates
        registered = json.loads((root / "data" / "runs" / "posttrain-reach-v3" / "registered.json").read_text())
        assert gate.data.params["model_uri"] == registered["model_uri"]  # the version, not @challenger
        assert gate.data.tags["training_run_id"] == registered["run_id"]
    finally:
        mlflow.set_tracking_uri(None)


def test_second_repro_is_a_no_op(project):
    root, env, _ = project
    out = run(["dvc", "repro"], root, env)
    assert "Running stage" not in out
    assert "up to date" in run(["dvc", "status"], root, env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_and_pull_through_an_s3_remote(project):
    from moto.server import ThreadedMotoServer

    root, env, _ = project
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="lingbot-data")
        run(["dvc", "remote", "add", "-f", "s3", "s3://lingbot-data/dvc"], root, env)
        run(["dvc", "remote", "modify", "s3", "endpointurl", endpoint], root, env)
        run(["dvc", "push", "-r", "s3"], root, env)
        shutil.rmtree(root / ".dvc" / "cache")
        shutil.rmtree(root / "data" / "latents")
        run(["dvc", "pull", "-r", "s3"], root, env)
        assert (root / "data" / "latents" / "index.json").is_file()
        assert (root / "data" / "runs" / "posttrain-reach-v3" / "model" / "config.json").is_file()
        assert "up to date" in run(["dvc", "status"], root, env)
    finally:
        server.stop()


def test_default_remote_is_a_local_directory(project):
    root, env, _ = project
    run(["dvc", "push"], root, env)
    assert any((root / ".dvc-remote").rglob("*"))
