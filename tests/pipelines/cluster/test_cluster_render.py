"""`lingbot render`: the committed pipelines are exactly what the code renders, and what they run is real
(every command line is checked by its real parser in test_cluster_commands.py)."""

import copy
import functools
import os

import pytest
from cluster_docs import default_settings, embedded, find, parse, render_documents, template

from pipelines.cli import main
from pipelines.cluster import render as render_mod
from pipelines.settings import REPO_ROOT


@functools.cache
def _rendered():
    return render_documents()


def test_committed_pipelines_equal_a_fresh_render():
    rendered = render_mod.render(default_settings())
    assert set(rendered) == {"pipelines/posttrain.yaml", "pipelines/pretrain.yaml"}
    for path, text in rendered.items():
        committed = REPO_ROOT / path
        assert committed.is_file(), f"{path} is missing: run `lingbot render`"
        assert committed.read_text() == text, f"{path} differs from `lingbot render`: run it and commit the result"


def test_render_check_exits_nonzero_on_a_stale_file(tmp_path, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("LINGBOT_CLUSTER_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .env here
    assert main(["render", "--check", "--root", str(tmp_path)]) == 1  # nothing written yet
    assert "pipelines/posttrain.yaml: differs" in capsys.readouterr().out
    assert main(["render", "--root", str(tmp_path)]) == 0
    assert main(["render", "--check", "--root", str(tmp_path)]) == 0
    target = tmp_path / "pipelines" / "pretrain.yaml"
    target.write_text(target.read_text() + "# edited by hand\n")
    capsys.readouterr()
    assert main(["render", "--check", "--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "pipelines/pretrain.yaml: differs" in out and "posttrain.yaml" not in out


def test_settings_come_from_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LINGBOT_CLUSTER_TASK", "push-v3")
    monkeypatch.setenv("LINGBOT_CLUSTER_EDGE_NODE_SELECTOR", '{"robots.example.com/gpu": "orin"}')
    docs = parse(render_mod.render()["pipelines/posttrain.yaml"])
    run = find(docs, "Workflow")
    assert run["metadata"]["name"] == "lingbot-va-posttrain-push-v3"
    assert run["spec"]["arguments"]["parameters"] == [{"name": "task", "value": "push-v3"}]
    assert embedded(docs, "deploy")["spec"]["predictor"]["nodeSelector"] == {"robots.example.com/gpu": "orin"}
    monkeypatch.setenv("LINGBOT_CLUSTER_TASK", "Push_V3")
    assert main(["render", "--check", "--root", str(tmp_path)]) == 2
    assert "must be a lower-case slug" in capsys.readouterr().err


def test_posttrain_runs_pull_train_gate_deploy():
    docs = _rendered()["pipelines/posttrain.yaml"]
    wt, run = find(docs, "WorkflowTemplate"), find(docs, "Workflow")
    # kubectl apply cannot use generateName: a fixed-name run of the template in the same file
    assert "generateName" not in run["metadata"] and run["spec"]["workflowTemplateRef"]["name"] == wt["metadata"]["name"]
    params = {p["name"]: p["value"] for p in wt["spec"]["arguments"]["parameters"]}
    assert {"task", "data-version", "preset", "steps", "image", "mlflow-uri"} <= set(params)
    assert params["task"] == "reach-v3" and params["data-version"] == "main"
    steps = [group[0]["name"] for group in template(wt, "posttrain")["steps"]]
    assert steps == ["pull-data", "train", "gate", "deploy"]
    pull = template(wt, "posttrain")["steps"][0][0]
    assert pull["withItems"] == ["data/latents", "data/feast", "data/runs/pretrain/model"]
    dvc = template(wt, "dvc-get")["container"]
    assert dvc["command"] == ["dvc"] and "{{workflow.parameters.data-version}}" in dvc["args"]
    assert "url=s3://lingbot-data/dvc" in dvc["args"]  # ClusterSettings.dvc_remote_url, in the infra's bucket
    assert dvc["args"][1] == "https://github.com/lingbot-va/lingbot-va-platform.git"  # ClusterSettings.git_repo

    train = template(wt, "train")["resource"]
    assert train["action"] == "create" and train["setOwnerReference"] is True
    assert train["successCondition"] == "status.replicaStatuses.Master.succeeded > 0"
    job = embedded(docs, "train")
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    container = master["template"]["spec"]["containers"][0]
    assert master["replicas"] == 1 and container["name"] == "pytorch"
    assert container["resources"]["limits"] == container["resources"]["requests"] == {
        "cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert container["envFrom"] == [{"secretRef": {"name": "lingbot-va-s3"}}]  # the infra's Secret
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.lingbot.svc.cluster.local:5000"  # the mlflow-uri parameter
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.lingbot.svc.cluster.local:9000"
    assert container["args"][container["args"].index("--zero-stage") + 1] == "2"

    gate = template(wt, "gate")["container"]["args"]
    assert gate[gate.index("--model") + 1] == "models:/lingbot-va-{{workflow.parameters.task}}@challenger"
    assert "--no-fail" not in gate  # a rejected candidate stops the run before deploy

    # the deploy step gets the version the gate promoted: model_version of its report (an output parameter)
    report = template(wt, "gate")["outputs"]["parameters"]
    assert report == [{"name": "report", "valueFrom": {"path": gate[gate.index("--out") + 1]}}]
    assert template(wt, "posttrain")["steps"][3][0]["arguments"]["parameters"] == [
        {"name": "version", "value": "{{=jsonpath(steps.gate.outputs.parameters.report, '$.model_version')}}"}]

    deploy = template(wt, "deploy")["resource"]
    assert deploy["action"] == "apply" and "UpToDate" in deploy["successCondition"]
    isvc = embedded(docs, "deploy")
    assert isvc["metadata"]["name"] == "lingbot-va-reach-v3"
    assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "Standard"}
    predictor = isvc["spec"]["predictor"]
    assert predictor["nodeSelector"] and predictor["tolerations"]
    # predictor.model of format lingbot-va, run by the ServingRuntime of the same file (protocol v2: its protocols)
    serve = predictor["model"]
    runtime = find(docs, "ServingRuntime")
    assert "containers" not in predictor and serve["modelFormat"] == {"name": "lingbot-va"}
    assert runtime["spec"]["supportedModelFormats"] == [{"name": "lingbot-va", "autoSelect": True}]
    assert serve["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert serve["args"][:2] == ["--model", "models:/lingbot-va-reach-v3@champion"]
    assert serve["resources"] == {"requests": {"cpu": "2", "memory": "8Gi", "nvidia.com/gpu": "1"},
                                  "limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}}
    # KServe's canary rules: a model location on the stable predictor (the champion version's pyfunc descriptor
    # over MLflow's artifact proxy, fetched by the storage initializer), no maxReplicas on the canary
    assert serve["storageUri"] == ("http://mlflow.lingbot.svc.cluster.local:5000/model-versions/get-artifact"
                                   "?name=lingbot-va-reach-v3&version=sample&path=python_model.pkl")  # {{=jsonpath}}
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 1
    [canary] = isvc["spec"]["canary"]
    assert canary["trafficPercent"] == 10 and canary["predictor"]["name"] == "canary"
    assert canary["predictor"]["minReplicas"] == 1 and "maxReplicas" not in canary["predictor"]
    assert canary["predictor"]["annotations"] == {"platform.lingbot-va.io/rollout": "sample"}  # {{workflow.name}}


def test_pretrain_encodes_by_rank_then_trains_elastically_with_zero3():
    docs = _rendered()["pipelines/pretrain.yaml"]
    wt = find(docs, "WorkflowTemplate")
    assert [g[0]["name"] for g in template(wt, "pretrain")["steps"]] == ["pull-data", "encode", "train"]
    assert find(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    encode = embedded(docs, "encode")["spec"]
    assert encode["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3  # 4 pods, each encodes its ranks' share
    train = embedded(docs, "train")["spec"]
    assert train["pytorchReplicaSpecs"]["Worker"]["replicas"] == 7 and train["nprocPerNode"] == "8"
    assert train["elasticPolicy"] == {"maxReplicas": 8, "maxRestarts": 10, "minReplicas": 4, "rdzvBackend": "c10d"}
    args = train["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--zero-stage") + 1] == "3" and "--checkpoint-every" in args
    assert args[args.index("--run-dir") + 1].startswith("/mnt/shared/")  # on the shared volume: survives a pod


def test_settings_scale_the_jobs():
    s = default_settings(posttrain_nodes=3, gpus_per_node=4, canary_percent=0, serve_gpus=0)
    from pipelines.cluster.workflows import posttrain_documents

    docs = copy.deepcopy(posttrain_documents(s))
    job = embedded(docs, "train")["spec"]
    assert job["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2 and job["nprocPerNode"] == "4"
    isvc = embedded(docs, "deploy")["spec"]
    assert isvc["canary"][0]["trafficPercent"] == 0  # a dark canary: deployed, no traffic
    serve = isvc["predictor"]["model"]
    assert "nvidia.com/gpu" not in serve["resources"]["requests"] and "nvidia.com/gpu" not in serve["resources"]["limits"]
    assert {e["name"]: e.get("value") for e in serve["env"]}["LINGBOT_SERVE_DEVICE"] == "cpu"


@pytest.mark.parametrize("url", ["https://minio/lingbot-data/dvc", "s3://Lingbot_Data/dvc", "lingbot-data/dvc"])
def test_dvc_remote_must_be_an_s3_bucket(url):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be s3://<bucket>"):
        default_settings(dvc_remote_url=url)
    assert default_settings(dvc_remote_url="s3://lingbot-data/dvc/").data_bucket == "lingbot-data"
