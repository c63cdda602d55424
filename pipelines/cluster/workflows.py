"""The Argo workflows (Kubeflow Pipelines' engine) of the cluster lifecycle, built with hera.

The chain: data (DVC at ``data-version``, embedded with the real encoders: the Wan2.2 VAE and the umT5 text encoder
on the shared data volume) -> pretraining, which registers ``lingbot-va-base`` in MLflow -> post-training of every
task from that registered model -> the simulation gate -> the task's InferenceService.

pretrain:  dvc get episodes -> prepare (splits, norm stats, instruction embeddings at the preset's width) -> sharded
           encode (PyTorchJob, one share per rank) -> pretraining (elastic PyTorchJob, ZeRO-3, checkpoints on the
           shared volume; registers lingbot-va-base with alias challenger).
posttrain: dvc get episodes -> prepare -> encode, then per task (fan-out over ``tasks``, ``parallel_tasks`` at once):
           PyTorchJob from ``base-model`` -> gate (``lingbot evaluate ... @challenger``; a rejected candidate fails
           its branch, nothing deployed) -> InferenceService (apply) of the version the gate promoted.

Each file holds a ``WorkflowTemplate`` (the pipeline, re-applied idempotently) and a ``Workflow`` running it with the
rendered parameters. ``kubectl apply`` cannot use ``generateName``, so the run is named after a digest of what it runs
(the template and its parameters): re-applying an unchanged file changes nothing, a changed input (tasks, data
version, image, base model, sizes...) is a new run.
"""

from __future__ import annotations

import hashlib
import json

import yaml
from hera.workflows import (
    Container,
    Parameter,
    Resource,
    SecretEnvFrom,
    Step,
    Steps,
    Workflow,
    WorkflowTemplate,
)
from hera.workflows import models as m
from kubeflow.training.models import KubeflowOrgV1ElasticPolicy
from kubernetes import client as k8s

from pipelines.cluster import manifests
from pipelines.cluster.images import CPU_IMAGE, GPU_IMAGE
from pipelines.cluster.settings import ClusterSettings

POSTTRAIN = "lingbot-va-posttrain"
PRETRAIN = "lingbot-va-pretrain"
WORKSPACE = "/workspace"  # per-run volume of a post-training run
SHARED = "/mnt/shared"  # the shared data volume: encoder weights, pretraining runs
RUN_COMPONENT = "run"
"""``app.kubernetes.io/component`` of a rendered Workflow: ``kubectl delete -f <file> -l`` selects the run alone."""
DIGEST_CHARS = 10

# Argo conditions are label selectors over gjson paths of the object; arrays (status.conditions) cannot be matched by
# type, so they read the operators' non-array status fields.
PYTORCHJOB_SUCCEEDED = "status.replicaStatuses.Master.succeeded > 0"
PYTORCHJOB_FAILED = "status.replicaStatuses.Master.failed > 0"
ISVC_READY = "status.modelStatus.transitionStatus == UpToDate"  # KServe sets it once the predictor is Ready
ISVC_FAILED = "status.modelStatus.transitionStatus in (BlockedByFailedLoad, InvalidSpec)"


def _param(name: str) -> str:
    return "{{workflow.parameters." + name + "}}"


def _input(name: str) -> str:
    return "{{inputs.parameters." + name + "}}"


def _manifest(obj) -> str:
    """A typed object as the YAML string of a resource template."""
    return yaml.safe_dump(manifests.to_dict(obj), sort_keys=False, width=1000)


def _hera(model: type, obj):
    """A kubernetes-client object as the equivalent hera model: the pod-level pieces have one source
    (``manifests``) whether they end up in a PyTorchJob, an InferenceService or an Argo step."""
    return model.model_validate(manifests.to_dict(obj))


def _pod_security(s: ClusterSettings) -> m.PodSecurityContext:
    return _hera(m.PodSecurityContext, manifests.pod_security(s))


def _container_security() -> m.SecurityContext:
    return _hera(m.SecurityContext, manifests.container_security())


def _env(s: ClusterSettings, *extra: k8s.V1EnvVar) -> list[m.EnvVar]:
    return [_hera(m.EnvVar, e) for e in (*manifests.endpoint_env(s, _param("mlflow-uri")), *extra)]


def _scratch() -> tuple[list[m.Volume], list[m.VolumeMount]]:
    volumes, mounts = manifests.scratch_volumes()
    return [_hera(m.Volume, v) for v in volumes], [_hera(m.VolumeMount, v) for v in mounts]


def _bounded(cpu: str, memory: str) -> m.ResourceRequirements:
    return _hera(m.ResourceRequirements, manifests.bounded({"cpu": cpu, "memory": memory}))


def _shared_volume(s: ClusterSettings, read_only: bool) -> k8s.V1Volume:
    return k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=s.data_volume, read_only=read_only or None))


def _shared_mount(read_only: bool) -> k8s.V1VolumeMount:
    return k8s.V1VolumeMount(name="data", mount_path=SHARED, read_only=read_only or None)


def _parameters(s: ClusterSettings, *names: str) -> list[Parameter]:
    """The workflow parameters ``names`` with their rendered values (the settings') and what they mean."""
    known = {
        "tasks": (json.dumps(s.tasks), "JSON list of Meta-World tasks; model lingbot-va-<task> each"),
        "data-version": (s.data_version, "git revision of the DVC data"),
        "preset": (s.preset, "model preset (text width of prepare, shape of pretraining)"),
        "base-model": (s.base_model, "registered model post-training starts from"),
        "pretrain-steps": (str(s.pretrain_steps), "pretraining steps"),
        "posttrain-steps": (str(s.posttrain_steps), "post-training steps"),
        "eval-episodes": (str(s.eval_episodes), "episodes of the gate"),
        "image": (s.image(GPU_IMAGE), "training + serving image"),
        "cpu-image": (s.image(CPU_IMAGE), "data + simulation-gate image"),
        "mlflow-uri": (s.mlflow_uri, "MLflow tracking URI"),
    }
    return [Parameter(name=n, value=known[n][0], description=known[n][1]) for n in names]


def _run(s: ClusterSettings, template: WorkflowTemplate) -> Workflow:
    """The run of ``template`` with its rendered parameters, named ``<template>-<digest of the template>``."""
    doc = template.to_dict()
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:DIGEST_CHARS]
    arguments = [Parameter(name=p["name"], value=p["value"]) for p in doc["spec"]["arguments"]["parameters"]]
    return Workflow(name=f"{template.name}-{digest}", namespace=s.namespace,
                    labels=manifests.labels(RUN_COMPONENT), arguments=arguments,
                    workflow_template_ref=m.WorkflowTemplateRef(name=template.name))


# ------------------------------------------------------------------------------------------------------------ data
def _dvc_get(s: ClusterSettings, root: str, mounts: list[m.VolumeMount]) -> Container:
    """``dvc get`` one DVC-tracked path of the repo at ``data-version`` from the S3 remote into ``root``.

    ``--remote-config`` points the repo's default remote (a local folder in the repo) at the cluster's bucket.
    """
    path = _input("path")
    return Container(
        name="dvc-get", image=_param("cpu-image"), command=["dvc"],
        args=["get", s.git_repo, path, "--rev", _param("data-version"), "--out", f"{root}/{path}", "--force",
              "--remote-config", f"url={s.dvc_remote_url}", f"endpointurl={s.s3_endpoint}"],
        inputs=[Parameter(name="path", description="DVC-tracked path in the repository")],
        # DVC keeps its site cache in /var/tmp by default: on the read-only root, so under the /tmp volume
        env=_env(s, k8s.V1EnvVar(name="DVC_SITE_CACHE_DIR", value="/tmp/dvc")),
        env_from=[SecretEnvFrom(name=s.s3_secret)], volume_mounts=[*mounts, *_scratch()[1]],
        resources=_bounded("2", "4Gi"), security_context=_container_security())


def _prepare(s: ClusterSettings, root: str, mounts: list[m.VolumeMount]) -> Container:
    """``lingbot data prepare`` with the real text encoder: splits, normalisation stats and the tasks' instruction
    embeddings (at the encoder's width, which ``preset`` must have) published to the run's Feast store."""
    return Container(
        name="prepare", image=_param("cpu-image"),
        args=["data", "prepare", "--episodes-dir", f"{root}/data/episodes", "--out", f"{root}/data/prepared",
              "--feast-dir", f"{root}/data/feast", "--preset", _param("preset"),
              "--text-encoder", f"{SHARED}/{s.text_encoder_path}"],
        volume_mounts=[*mounts, *_scratch()[1]],
        # umT5-XXL's encoder in float32 on CPU: ~23 GB of weights
        resources=_bounded("8", "64Gi"), security_context=_container_security())


def _encode(s: ClusterSettings, root: str, nodes: int, volumes: list[k8s.V1Volume],
            mounts: list[k8s.V1VolumeMount]) -> Resource:
    """``lingbot data encode`` with the Wan2.2 VAE, sharded over ``nodes`` pods: it splits the episodes by
    RANK / WORLD_SIZE (torchrun's) and rank 0 merges the index parts after a barrier, so every rank must see the same
    output folder (a ReadWriteMany volume)."""
    job = manifests.pytorch_job(
        s, name="{{workflow.name}}-encode", component="encode", task=None, image=_param("cpu-image"),
        nodes=nodes, nproc_per_node="1", gpu=False, volumes=volumes, mounts=mounts,
        resources=manifests.bounded({"cpu": "8", "memory": "32Gi"}), mlflow_uri=_param("mlflow-uri"),
        args=["-m", "pipelines.cli", "data", "encode", "--episodes-dir", f"{root}/data/episodes",
              "--prepared-dir", f"{root}/data/prepared", "--feast-dir", f"{root}/data/feast",
              "--out", f"{root}/data/latents", "--preset", _param("preset"), "--vae", f"{SHARED}/{s.vae_path}"])
    return Resource(name="encode", action="create", set_owner_reference=True, manifest=_manifest(job),
                    success_condition=PYTORCHJOB_SUCCEEDED, failure_condition=PYTORCHJOB_FAILED)


def _data_steps() -> list[Step]:
    return [Step(name="pull-data", template="dvc-get", arguments={"path": "data/episodes"}),
            Step(name="prepare", template="prepare"),
            Step(name="encode", template="encode")]


# ------------------------------------------------------------------------------------------------------- posttrain
def posttrain_template(s: ClusterSettings) -> WorkflowTemplate:
    """Embed the data, then post-train every task from the registered base model, gate it and deploy it."""
    task = _input("task")
    claim = "{{workflow.name}}-workspace"  # Argo names volumeClaimTemplates' PVCs <workflow>-<template name>
    workspace = [k8s.V1Volume(name="workspace",
                              persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=claim))]
    workspace_mount = [k8s.V1VolumeMount(name="workspace", mount_path=WORKSPACE)]
    # prepare and encode read the encoder weights: the shared data volume, read-only (pretraining's runs are there)
    weights_volume, weights_mount = _shared_volume(s, read_only=True), _shared_mount(read_only=True)
    step_mounts = [_hera(m.VolumeMount, workspace_mount[0])]
    train_job = manifests.pytorch_job(
        # one job per task and run: the API server completes the name (a Service <job>-worker-<i> is a DNS label)
        s, name=f"posttrain-{task}-", generate_name=True, component="posttrain", task=task, image=_param("image"),
        nodes=s.posttrain_nodes, nproc_per_node=str(s.gpus_per_node), gpu=True,
        resources=manifests.gpu_resources(s, s.gpus_per_node), mlflow_uri=_param("mlflow-uri"),
        volumes=workspace, mounts=workspace_mount,
        args=["-m", "pipelines.cli", "train", "posttrain", "--task", task, "--preset", _param("preset"),
              "--steps", _param("posttrain-steps"), "--zero-stage", str(s.posttrain_zero_stage),
              "--init-from", _param("base-model"), "--data-dir", f"{WORKSPACE}/data",
              "--run-dir", f"{WORKSPACE}/data/runs/posttrain-{task}", "--tracking-uri", _param("mlflow-uri"),
              "--resume-if-present"])  # a pod the operator restarts continues from the run's last checkpoint
    train = Resource(name="train", action="create", set_owner_reference=True, manifest=_manifest(train_job),
                     success_condition=PYTORCHJOB_SUCCEEDED, failure_condition=PYTORCHJOB_FAILED,
                     inputs=[Parameter(name="task")])
    report = f"{WORKSPACE}/data/metrics/eval-{task}.json"
    gate = Container(
        name="gate", image=_param("cpu-image"), inputs=[Parameter(name="task")],
        # the evaluation report (JSON): its model_version is the candidate that, passing, became champion
        outputs=[Parameter(name="report", value_from=m.ValueFrom(path=report))],
        args=["evaluate", "--model", f"models:/{manifests.registered_name(task)}@challenger", "--task", task,
              "--episodes", _param("eval-episodes"), "--workers", str(s.eval_workers),
              "--data-dir", f"{WORKSPACE}/data", "--tracking-uri", _param("mlflow-uri"), "--out", report],
        env=_env(s), env_from=[SecretEnvFrom(name=s.s3_secret)],
        volume_mounts=[*step_mounts, *_scratch()[1]],
        resources=_bounded(str(s.eval_workers), f"{2 * s.eval_workers}Gi"), security_context=_container_security())
    isvc = manifests.inference_service(s, task=task, image=_param("image"), mlflow_uri=_param("mlflow-uri"),
                                       rollout="{{workflow.name}}", model_version=_input("version"))
    deploy = Resource(name="deploy", action="apply", manifest=_manifest(isvc), success_condition=ISVC_READY,
                      failure_condition=ISVC_FAILED,
                      inputs=[Parameter(name="task"),
                              Parameter(name="version", description="registered version the gate promoted")])
    one_task = Steps(name="task", inputs=[Parameter(name="task", description="Meta-World task")], sub_steps=[
        Step(name="train", template="train", arguments={"task": task}),
        Step(name="gate", template="gate", arguments={"task": task}),  # exits non-zero when the gate rejects
        # the version the gate evaluated and, having passed, promoted to champion (its report's model_version)
        Step(name="deploy", template="deploy", arguments={
            "task": task, "version": "{{=jsonpath(steps.gate.outputs.parameters.report, '$.model_version')}}"}),
    ])
    pipeline = Steps(name="posttrain", parallelism=s.parallel_tasks, sub_steps=[
        *_data_steps(),
        Step(name="tasks", template="task", arguments={"task": "{{item}}"}, with_param=_param("tasks")),
    ])
    return WorkflowTemplate(
        name=POSTTRAIN, namespace=s.namespace, labels=manifests.labels("pipeline"), entrypoint="posttrain",
        service_account_name=s.service_account, security_context=_pod_security(s),
        arguments=_parameters(s, "tasks", "data-version", "preset", "base-model", "posttrain-steps", "eval-episodes",
                              "image", "cpu-image", "mlflow-uri"),
        volume_claim_templates=[m.PersistentVolumeClaim(
            metadata=m.ObjectMeta(name="workspace"),
            spec=m.PersistentVolumeClaimSpec(access_modes=["ReadWriteMany"], storage_class_name=s.storage_class,
                                             resources=m.VolumeResourceRequirements(
                                                 requests={"storage": m.Quantity(s.workspace_size)})))],
        volumes=[_hera(m.Volume, weights_volume), *_scratch()[0]],
        templates=[pipeline, one_task, _dvc_get(s, WORKSPACE, step_mounts),
                   _prepare(s, WORKSPACE, [*step_mounts, _hera(m.VolumeMount, weights_mount)]),
                   # one pod (encode_nodes sizes pretraining's sharded encoding)
                   _encode(s, WORKSPACE, 1, [*workspace, weights_volume], [*workspace_mount, weights_mount]),
                   train, gate, deploy])


def posttrain_documents(s: ClusterSettings) -> list[dict]:
    """``kubectl apply -f pipelines/posttrain.yaml``: the ServingRuntime its endpoints use, the pipeline and its run.
    The service account, its Role and the Secrets belong to the platform's infra (infra/kustomize or
    charts/lingbot-platform), installed first; the infra creates the same ServingRuntime (the tests compare), so
    the file is complete on its own and applying it over the infra changes nothing."""
    template = posttrain_template(s)
    return [manifests.to_dict(manifests.serving_runtime(s)), template.to_dict(), _run(s, template).to_dict()]


# -------------------------------------------------------------------------------------------------------- pretrain
def pretrain_template(s: ClusterSettings) -> WorkflowTemplate:
    """Embed the data, encode latents sharded by rank, then pretrain on them across nodes."""
    root = f"{SHARED}/runs/{{{{workflow.name}}}}"  # one folder per run: another run never resumes this one's steps
    data, mounts = [_shared_volume(s, read_only=False)], [_shared_mount(read_only=False)]
    # min/max become torchrun's --nnodes MIN:MAX (PET_NNODES): counted in pods, the Master included
    elastic = KubeflowOrgV1ElasticPolicy(rdzv_backend="c10d", min_replicas=min(s.pretrain_min_nodes, s.pretrain_nodes),
                                         max_replicas=s.pretrain_nodes, max_restarts=s.pretrain_max_restarts)
    pretrain = manifests.pytorch_job(
        s, name="{{workflow.name}}-train", component="pretrain", task=None, image=_param("image"),
        nodes=s.pretrain_nodes, nproc_per_node=str(s.gpus_per_node), gpu=True, elastic=elastic, volumes=data,
        mounts=mounts, resources=manifests.gpu_resources(s, s.gpus_per_node), mlflow_uri=_param("mlflow-uri"),
        # registers the final model as lingbot-va-base (alias challenger): the base_model post-training starts from
        args=["-m", "pipelines.cli", "train", "pretrain", "--preset", _param("preset"),
              "--steps", _param("pretrain-steps"), "--zero-stage", str(s.pretrain_zero_stage),
              "--checkpoint-every", str(s.pretrain_checkpoint_every), "--data-dir", f"{root}/data",
              "--run-dir", f"{root}/data/runs/pretrain", "--tracking-uri", _param("mlflow-uri"),
              "--resume-if-present"])  # elastic restarts continue from the last checkpoint
    hera_mounts = [_hera(m.VolumeMount, v) for v in mounts]
    return WorkflowTemplate(
        name=PRETRAIN, namespace=s.namespace, labels=manifests.labels("pipeline"), entrypoint="pretrain",
        service_account_name=s.service_account, security_context=_pod_security(s),
        arguments=_parameters(s, "data-version", "preset", "pretrain-steps", "image", "cpu-image", "mlflow-uri"),
        volumes=[_hera(m.Volume, data[0]), *_scratch()[0]],
        templates=[Steps(name="pretrain", sub_steps=[*_data_steps(), Step(name="train", template="train")]),
                   _dvc_get(s, root, hera_mounts), _prepare(s, root, hera_mounts),
                   _encode(s, root, s.encode_nodes, data, mounts),
                   Resource(name="train", action="create", set_owner_reference=True, manifest=_manifest(pretrain),
                            success_condition=PYTORCHJOB_SUCCEEDED, failure_condition=PYTORCHJOB_FAILED)])


def pretrain_documents(s: ClusterSettings) -> list[dict]:
    """``kubectl apply -f pipelines/pretrain.yaml``: the shared data volume, the pipeline, its run (the service
    account, its Role and the Secrets belong to the platform's infra, installed first)."""
    template = pretrain_template(s)
    return [manifests.to_dict(manifests.data_volume(s)), template.to_dict(), _run(s, template).to_dict()]
