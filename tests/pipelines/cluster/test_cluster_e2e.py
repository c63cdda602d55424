"""End to end on a real cluster: `kubectl apply` the chain, rendered small (a few steps, the gate on 2 episodes):
pretraining registers lingbot-va-base, post-training of one task starts from it and deploys it; then the deployed
InferenceService answers a V2 question.

Runs only with LINGBOT_CLUSTER_TESTS=1 against the current kubectl context, which needs Argo Workflows, the Kubeflow
training operator, KServe (Standard mode), the platform's infra (infra/kustomize: MLflow, MinIO, the pipelines'
service account and Role, the ``lingbot-va-s3`` and ``lingbot-va-policy-token`` Secrets), the DVC data at
``data_version``, the images pushed and the Wan2.2 encoders on the data volume. The rest comes from the
LINGBOT_CLUSTER_* settings of the environment (a small GPU pool: LINGBOT_CLUSTER_GPUS_PER_NODE, _PRETRAIN_NODES, ...;
a preset whose widths are the encoders', e.g. LINGBOT_CLUSTER_PRESET=base-1b). LINGBOT_E2E_TASK (default reach-v3)
picks the task, LINGBOT_E2E_TIMEOUT_S (default 7200) bounds each run.
"""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml
from cluster_docs import find, parse

pytestmark = pytest.mark.cluster

CRDS = ["workflowtemplates.argoproj.io", "pytorchjobs.kubeflow.org", "inferenceservices.serving.kserve.io"]


def kubectl(*args, timeout=120, check=True, stdin=None):
    result = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH")
    reachable = kubectl("version", "--request-timeout=10s", check=False, timeout=30)
    if reachable.returncode != 0:
        pytest.skip(f"no reachable cluster in the current kubectl context: {reachable.stderr.strip()[:200]}")
    missing = [crd for crd in CRDS if kubectl("get", "crd", crd, check=False).returncode != 0]
    if missing:
        pytest.skip(f"the cluster lacks {missing} (Argo Workflows, Kubeflow training operator, KServe)")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url, attempts=30):
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, json.loads(response.read() or b"{}")
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def _apply_and_wait(docs, tmp_path, timeout):
    """`kubectl apply` the documents of one rendered file and wait for its run (one that ran before is deleted
    first: the same settings name the same run, which applying again would leave alone)."""
    run = find(docs, "Workflow")
    namespace, name = run["metadata"]["namespace"], run["metadata"]["name"]
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    kubectl("delete", "workflow", name, "-n", namespace, "--ignore-not-found", "--wait=true", timeout=300)
    kubectl("apply", "-f", str(manifest))
    deadline, phase = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        phase = kubectl("get", "workflow", name, "-n", namespace, "-o", "jsonpath={.status.phase}").stdout
        if phase in ("Succeeded", "Failed", "Error"):
            break
        time.sleep(20)
    message = kubectl("get", "workflow", name, "-n", namespace, "-o", "jsonpath={.status.message}").stdout
    assert phase == "Succeeded", f"workflow {name}: {phase or 'still running'}: {message}"


def test_the_chain_deploys_a_policy_that_answers_v2(cluster, tmp_path):
    from pipelines.cluster.render import render
    from pipelines.cluster.settings import ClusterSettings

    task = os.environ.get("LINGBOT_E2E_TASK", "reach-v3")
    timeout = float(os.environ.get("LINGBOT_E2E_TIMEOUT_S", "7200"))
    settings = ClusterSettings().model_copy(update={"tasks": [task], "pretrain_steps": 4, "posttrain_steps": 4,
                                                    "eval_episodes": 2})
    rendered = {path: parse(text) for path, text in render(settings).items()}
    _apply_and_wait(rendered["pipelines/pretrain.yaml"], tmp_path, timeout)  # registers lingbot-va-base@challenger
    _apply_and_wait(rendered["pipelines/posttrain.yaml"], tmp_path, timeout)
    namespace = settings.namespace

    isvc = f"lingbot-va-{task}"
    kubectl("wait", "--for=condition=Ready", f"inferenceservice/{isvc}", "-n", namespace, "--timeout=900s",
            timeout=960)
    port = _free_port()
    # Standard mode: a plain Service <isvc>-predictor, port 80 -> the container's 8080
    forward = subprocess.Popen(["kubectl", "port-forward", "-n", namespace, f"service/{isvc}-predictor", f"{port}:80"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        status, _ = _get_json(f"http://127.0.0.1:{port}/v2/health/ready")
        assert status == 200
        status, meta = _get_json(f"http://127.0.0.1:{port}/v2/models/lingbot-va")
        assert status == 200 and meta["name"] == "lingbot-va", meta
        status, _ = _get_json(f"http://127.0.0.1:{port}/v2/models/lingbot-va/ready")
        assert status == 200
    finally:
        forward.terminate()
        forward.wait(timeout=10)
