"""`lingbot render`: the committed pipelines are exactly what the code renders, and what they run is real
(every command line is checked by its real parser in test_cluster_commands.py)."""

import copy
import functools
import json
import os
import re

import pytest
from cluster_docs import default_settings, embedded, find, parse, render_documents, template

from pipelines.cli import main
from pipelines.cluster import render as render_mod
from pipelines.settings import REPO_ROOT


@functools.cache
def _rendered():
    return render_documents()


def test_committed_files_equal_a_fresh_render():
    rendered = render_mod.render(default_settings())
    assert set(rendered) == {"pipelines/posttrain.yaml", "pipelines/pretrain.yaml", "infra/kustomize/base/policy.yaml"}
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


def _arguments(docs):
    return {p["name"]: p["value"] for p in find(docs, "Workflow")["spec"]["arguments"]["parameters"]}


def test_settings_come_from_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LINGBOT_CLUSTER_TASKS", "push-v3, reach-v3")
    monkeypatch.setenv("LINGBOT_CLUSTER_EDGE_NODE_SELECTOR", '{"robots.example.com/gpu": "orin"}')
    assert main(["render", "--print", "pipelines/posttrain.yaml"]) == 0  # what `... | kubectl apply -f -` gets
    docs = parse(capsys.readouterr().out)
    assert json.loads(_arguments(docs)["tasks"]) == ["push-v3", "reach-v3"]
    assert embedded(docs, "deploy")["metadata"]["name"] == "lingbot-va-push-v3"  # the fan-out's first branch
    assert embedded(docs, "deploy")["spec"]["predictor"]["nodeSelector"] == {"robots.example.com/gpu": "orin"}
    monkeypatch.setenv("LINGBOT_CLUSTER_TASKS", "Push_V3")
    assert main(["render", "--check", "--root", str(tmp_path)]) == 2
    assert "must be a lower-case slug" in capsys.readouterr().err


def test_the_chain_runs_data_pretrain_registered_model_posttrain_gate_deploy():
    """Item 4 of issue 15 in the rendered files: both pipelines embed the DVC data with the real encoders at the
    cluster's preset; pretraining registers lingbot-va-base; post-training of every task starts from it."""
    from pipelines.train.registry import registered_name_for

    s = default_settings()
    pre, post = _rendered()["pipelines/pretrain.yaml"], _rendered()["pipelines/posttrain.yaml"]
    for docs, root in ((pre, "/mnt/shared/runs/sample"), (post, "/workspace")):
        wt = find(docs, "WorkflowTemplate")
        steps = [group[0]["name"] for group in template(wt, wt["spec"]["entrypoint"])["steps"]]
        assert steps[:3] == ["pull-data", "prepare", "encode"]
        assert template(wt, wt["spec"]["entrypoint"])["steps"][0][0]["arguments"]["parameters"] == [
            {"name": "path", "value": "data/episodes"}]  # raw episodes: prepared + encoded here, not the local copy
        prepare = template(wt, "prepare")["container"]["args"]
        encode = embedded(docs, "encode")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
        args = encode["args"]
        assert prepare[prepare.index("--text-encoder") + 1] == f"/mnt/shared/{s.text_encoder_path}"
        assert args[args.index("--vae") + 1] == f"/mnt/shared/{s.vae_path}"
        assert "/mnt/shared" in {m["mountPath"] for m in encode["volumeMounts"]}
        assert "/mnt/shared" in {m["mountPath"] for m in template(wt, "prepare")["container"]["volumeMounts"]}
        # one preset everywhere: prepare's text width and encode's latents are what the model is built for
        assert prepare[prepare.index("--preset") + 1] == "{{workflow.parameters.preset}}"
        assert args[args.index("--preset") + 1] == _arguments(docs)["preset"] == s.preset == "paper-5.3b"
        assert args[args.index("--out") + 1] == f"{root}/data/latents"
    train = embedded(pre, "train")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert "--no-register" not in train and train[train.index("--preset") + 1] == s.preset
    assert train[train.index("--data-dir") + 1] == "/mnt/shared/runs/sample/data"  # what its encode step wrote
    # pretraining registers lingbot-va-base (alias challenger); post-training starts from that registered model
    assert s.base_model == f"models:/{registered_name_for('pretrain')}@challenger"
    job = embedded(post, "train")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert job[job.index("--init-from") + 1] == _arguments(post)["base-model"] == s.base_model
    assert job[job.index("--data-dir") + 1] == "/workspace/data"  # the latents its own encode step wrote


def test_posttrain_fans_out_train_gate_deploy_over_the_tasks():
    docs = _rendered()["pipelines/posttrain.yaml"]
    wt, run = find(docs, "WorkflowTemplate"), find(docs, "Workflow")
    assert run["spec"]["workflowTemplateRef"]["name"] == wt["metadata"]["name"] and "generateName" not in run["metadata"]
    params = {p["name"]: p["value"] for p in wt["spec"]["arguments"]["parameters"]}
    assert params == _arguments(docs)  # the run passes every parameter: the file says what it runs
    assert {"tasks", "data-version", "preset", "base-model", "image", "mlflow-uri"} <= set(params)
    assert json.loads(params["tasks"]) == ["reach-v3"] and params["data-version"] == "main"
    entry = template(wt, "posttrain")
    (fan_out,) = entry["steps"][3]
    assert fan_out["template"] == "task" and fan_out["withParam"] == "{{workflow.parameters.tasks}}"
    assert fan_out["arguments"]["parameters"] == [{"name": "task", "value": "{{item}}"}]
    assert entry["parallelism"] == default_settings().parallel_tasks  # GPU jobs of tasks at once
    branch = template(wt, "task")
    assert [group[0]["name"] for group in branch["steps"]] == ["train", "gate", "deploy"]
    dvc = template(wt, "dvc-get")["container"]
    assert dvc["command"] == ["dvc"] and "{{workflow.parameters.data-version}}" in dvc["args"]
    assert "url=s3://lingbot-data/dvc" in dvc["args"]  # ClusterSettings.dvc_remote_url, in the infra's bucket
    assert dvc["args"][1] == "https://github.com/lingbot-va/lingbot-va-platform.git"  # ClusterSettings.git_repo

    train = template(wt, "train")["resource"]
    assert train["action"] == "create" and train["setOwnerReference"] is True
    assert train["successCondition"] == "status.replicaStatuses.Master.succeeded > 0"
    job = embedded(docs, "train")
    assert job["metadata"]["generateName"] == "posttrain-reach-v3-" and "name" not in job["metadata"]
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    container = master["template"]["spec"]["containers"][0]
    assert master["replicas"] == 1 and container["name"] == "pytorch"
    assert container["resources"]["limits"] == container["resources"]["requests"] == {
        "cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert container["envFrom"] == [{"secretRef": {"name": "lingbot-va-s3"}}]  # the infra's Secret
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.lingbot.svc.cluster.local:5000"  # the mlflow-uri parameter
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.lingbot.svc.cluster.local:9000"
    args = container["args"]
    assert args[args.index("--zero-stage") + 1] == "2" and args[args.index("--task") + 1] == "reach-v3"

    gate = template(wt, "gate")["container"]["args"]
    assert gate[gate.index("--model") + 1] == "models:/lingbot-va-{{inputs.parameters.task}}@challenger"
    assert "--no-fail" not in gate  # a rejected candidate stops its branch before deploy
    # the deploy step gets the version the gate promoted: model_version of its report (an output parameter)
    report = template(wt, "gate")["outputs"]["parameters"]
    assert report == [{"name": "report", "valueFrom": {"path": gate[gate.index("--out") + 1]}}]
    assert branch["steps"][2][0]["arguments"]["parameters"] == [
        {"name": "task", "value": "{{inputs.parameters.task}}"},
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
    assert [g[0]["name"] for g in template(wt, "pretrain")["steps"]] == ["pull-data", "prepare", "encode", "train"]
    assert find(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    encode = embedded(docs, "encode")["spec"]
    assert encode["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3  # 4 pods, each encodes its ranks' share
    train = embedded(docs, "train")["spec"]
    assert train["pytorchReplicaSpecs"]["Worker"]["replicas"] == 7 and train["nprocPerNode"] == "8"
    assert train["elasticPolicy"] == {"maxReplicas": 8, "maxRestarts": 10, "minReplicas": 4, "rdzvBackend": "c10d"}
    args = train["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--zero-stage") + 1] == "3" and "--checkpoint-every" in args
    # on the shared volume (survives a pod), in the run's own folder (another run never resumes its checkpoints)
    assert args[args.index("--run-dir") + 1] == "/mnt/shared/runs/{{workflow.name}}/data/runs/pretrain".replace(
        "{{workflow.name}}", "sample")


def _run_name(settings):
    return find(render_documents(settings)["pipelines/posttrain.yaml"], "Workflow")["metadata"]["name"]


CHANGED_INPUTS = [
    pytest.param({"data_version": "v2"}, id="data-revision"),
    pytest.param({"tag": "0.1.1"}, id="image"),
    pytest.param({"tasks": ["reach-v3", "push-v3"]}, id="task-list"),
    pytest.param({"base_model": "models:/lingbot-va-base/3"}, id="base-model"),
    pytest.param({"posttrain_nodes": 2}, id="template-only"),
]


@pytest.mark.parametrize("change", CHANGED_INPUTS)
def test_a_changed_input_is_a_new_run_and_an_unchanged_file_the_same_one(change):
    """`kubectl apply` is the interface: an unchanged file re-applied names the same Workflow (nothing happens),
    any changed input renders a Workflow of another name (a new run)."""
    same = _run_name(default_settings())
    assert same == _run_name(default_settings()) == find(_rendered()["pipelines/posttrain.yaml"], "Workflow")[
        "metadata"]["name"]
    assert re.fullmatch(r"lingbot-va-posttrain-[0-9a-f]{10}", same)
    assert _run_name(default_settings(**change)) != same
    pretrain = {find(render_documents(default_settings(**k))["pipelines/pretrain.yaml"], "Workflow")["metadata"]["name"]
                for k in ({}, {"data_version": "v2"})}
    assert len(pretrain) == 2


def test_every_run_and_job_name_fits_kubernetes():
    """The longest task the settings accept still names valid objects (KServe's canary Deployment, the training
    operator's per-replica Services <job>-worker-<i>)."""
    task = "a" * 35
    s = default_settings(tasks=[task], posttrain_nodes=16)
    docs = render_documents(s)["pipelines/posttrain.yaml"]
    job = embedded(docs, "train")
    assert len(f"{job['metadata']['generateName']}xxxxx-worker-15") <= 63
    assert len(f"lingbot-va-{task}-canary-predictor") <= 63
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="<= 35"):
        default_settings(tasks=[task + "a"])


def test_make_images_builds_what_the_manifests_reference(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LINGBOT_CLUSTER_REGISTRY", "registry.example.internal/lingbot")
    assert main(["render", "--images"]) == 0
    builds = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert builds == [["infra/docker/Dockerfile", "registry.example.internal/lingbot/lingbot-va:0.1.0"],
                      ["infra/docker/Dockerfile.cuda", "registry.example.internal/lingbot/lingbot-va-cuda:0.1.0"]]


def test_robot_env_addresses_the_services_kserve_makes_for_the_deployed_endpoint(capsys, monkeypatch, tmp_path):
    """`lingbot render --robot-env <task>`: the robots' LINGBOT_ROBOT_* point at the Services KServe's Standard mode
    derives from the deploy step's InferenceService (``<isvc>-predictor`` and ``<isvc>-<canary>-predictor``, the
    runtime's gRPC port kept as is) and send the canary's share of their episodes to it."""
    from pipelines.cluster.settings import ClusterSettings
    from services.robot_client.routing import CANARY, route_for
    from services.robot_client.settings import RobotSettings

    for key in [k for k in os.environ if k.startswith(("LINGBOT_CLUSTER_", "LINGBOT_ROBOT_"))]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.setenv("LINGBOT_CLUSTER_TASKS", "reach-v3,push-v3")
    monkeypatch.setenv("LINGBOT_CLUSTER_CANARY_PERCENT", "20")
    assert main(["render", "--robot-env", "reach-v3"]) == 0
    env = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    docs = render_documents(ClusterSettings())["pipelines/posttrain.yaml"]
    isvc = embedded(docs, "deploy")  # the fan-out's first branch: reach-v3
    name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
    [canary] = isvc["spec"]["canary"]
    [container] = find(docs, "ServingRuntime")["spec"]["containers"]
    grpc = next(p["containerPort"] for p in container["ports"] if "h2c" in p["name"] or "grpc" in p["name"])
    assert container["ports"][0]["name"] == "http1"  # REST first: the Service maps it to 80, the others as they are
    assert env == {
        "LINGBOT_ROBOT_ENDPOINT": f"{name}-predictor.{namespace}.svc.cluster.local:{grpc}",
        "LINGBOT_ROBOT_TRANSPORT": "grpc",
        "LINGBOT_ROBOT_CANARY_ENDPOINT": f"{name}-{canary['predictor']['name']}-predictor.{namespace}.svc.cluster.local:"
                                         f"{grpc}",
        "LINGBOT_ROBOT_CANARY_PERCENT": str(canary["trafficPercent"]),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    robot = RobotSettings(_env_file=None)
    assert robot.canary_percent == 20 and robot.canary_endpoint.startswith("lingbot-va-reach-v3-canary-predictor.")
    share = sum(route_for(f"arm-{i}", robot.canary_percent) == CANARY for i in range(2000)) / 20
    assert share == pytest.approx(20, abs=3)
    assert main(["render", "--robot-env", "drawer-open-v3"]) == 2
    assert "not one of the deployed tasks" in capsys.readouterr().err


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
