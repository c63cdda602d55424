"""`dvc repro` of the whole DAG (collect -> ... -> evaluate) on a copy of the project, a no-op rerun, push/pull to S3 (moto)."""

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
