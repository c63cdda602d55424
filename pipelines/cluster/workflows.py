"""The Argo workflows (Kubeflow Pipelines' engine) of the cluster lifecycle, built with hera.

Each pipeline is a ``WorkflowTemplate`` (the definition, re-applied idempotently) plus a fixed-name ``Workflow`` that
runs it with the default task, so ``kubectl apply -f pipelines/posttrain.yaml`` installs the pipeline and starts a
run (``kubectl apply`` cannot use ``generateName``). Further runs: ``argo submit --from
workflowtemplate/lingbot-va-posttrain -p task=push-v3``, or delete the finished Workflow and apply again.

posttrain: dvc get (latents, feast, pretrained model) -> PyTorchJob (torchrun + DeepSpeed) -> simulation gate
           (``lingbot evaluate ... @challenger``; a rejected candidate fails the run; its report names the version it
           promoted) -> InferenceService (apply).
pretrain:  dvc get (episodes, prepared, feast) -> sharded encode (PyTorchJob, one share per rank) -> pretraining
           (elastic PyTorchJob, ZeRO-3, checkpoints on the shared volume).
"""

from __future__ import annotations

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
WORKSPACE = "/workspace"  # per-run volume of a post-training workflow
DATA = "/mnt/shared"  # the shared data volume of pretraining

# Argo conditions are label selectors over gjson paths of the object; arrays (status.conditions) cannot be matched by
# type, so they read the operators' non-array status fields.
PYTORCHJOB_SUCCEEDED = "status.replicaStatuses.Master.succeeded > 0"
PYTORCHJOB_FAILED = "status.replicaStatuses.Master.failed > 0"
ISVC_READY = "status.modelStatus.transitionStatus == UpToDate"  # KServe sets it once the predictor is Ready
ISVC_FAILED = "status.modelStatus.transitionStatus in (BlockedByFailedLoad, InvalidSpec)"


def _param(name: str) -> str:
    return "{{workflow.parameters." + name + "}}"


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


def _dvc_get(s: ClusterSettings, root: str, volume: str) -> Container:
    """``dvc get`` one DVC-tracked path of the repo at ``data-version`` from the S3 remote into ``root``.

    ``--remote-config`` points the repo's default remote (a local folder in the repo) at the cluster's bucket.
    """
    path = "{{inputs.parameters.path}}"
    return Container(
        name="dvc-get", image=_param("cpu-image"), command=["dvc"],
        args=["get", s.git_repo, path, "--rev", _param("data-version"), "--out", f"{root}/{path}", "--force",
              "--remote-config", f"url={s.dvc_remote_url}", f"endpointurl={s.s3_endpoint}"],
        inputs=[Parameter(name="path", description="DVC-tracked path in the repository")],
        # DVC keeps its site cache in /var/tmp by default: on the read-only root, so under the /tmp volume
        env=_env(s, k8s.V1EnvVar(name="DVC_SITE_CACHE_DIR", value="/tmp/dvc")),
        env_from=[SecretEnvFrom(name=s.s3_secret)],
        volume_mounts=[m.VolumeMount(name=volume, mount_path=root), *_scratch()[1]],
        resources=_bounded("2", "4Gi"), security_context=_container_security())


def _volume_claim(s: ClusterSettings, name: str, size: str) -> m.PersistentVolumeClaim:
    return m.PersistentVolumeClaim(
        metadata=m.ObjectMeta(name=name),
        spec=m.PersistentVolumeClaimSpec(access_modes=["ReadWriteMany"], storage_class_name=s.storage_class,
                                         resources=m.VolumeResourceRequirements(requests={"storage": m.Quantity(size)})))


def _run(name: str, template: str, s: ClusterSettings, arguments: list[Parameter], labels: dict) -> Workflow:
    return Workflow(name=name, namespace=s.namespace, labels=labels,
                    workflow_template_ref=m.WorkflowTemplateRef(name=template), arguments=arguments)


# ------------------------------------------------------------------------------------------------------- posttrain
def posttrain_template(s: ClusterSettings) -> WorkflowTemplate:
    """Post-train one task, gate it in simulation, deploy it to the edge."""
    task = _param("task")
    run_dir = f"{WORKSPACE}/data/runs/posttrain-{task}"
    claim = "{{workflow.name}}-workspace"  # Argo names volumeClaimTemplates' PVCs <workflow>-<template name>
    job = manifests.pytorch_job(
        s, name="{{workflow.name}}-train", component="posttrain", task=task, image=_param("image"),
        nodes=s.posttrain_nodes, nproc_per_node=str(s.gpus_per_node), gpu=True,
        resources=manifests.gpu_resources(s, s.gpus_per_node), mlflow_uri=_param("mlflow-uri"),
        volumes=[k8s.V1Volume(name="workspace",
                              persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=claim))],
        mounts=[k8s.V1VolumeMount(name="workspace", mount_path=WORKSPACE)],
        args=["-m", "pipelines.cli", "train", "posttrain", "--task", task, "--preset", _param("preset"),
              "--steps", _param("steps"), "--zero-stage", str(s.posttrain_zero_stage),
              "--init-from", f"{WORKSPACE}/data/runs/pretrain/model", "--data-dir", f"{WORKSPACE}/data",
              "--run-dir", run_dir, "--tracking-uri", _param("mlflow-uri"),
              "--resume-if-present"])  # a pod the operator restarts continues from the run's last checkpoint
    train = Resource(name="train", action="create", set_owner_reference=True, manifest=_manifest(job),
                     success_condition=PYTORCHJOB_SUCCEEDED, failure_condition=PYTORCHJOB_FAILED)
    report = f"{WORKSPACE}/data/metrics/eval-{task}.json"
    gate = Container(
        name="gate", image=_param("cpu-image"),
        # the evaluation report (JSON): its model_version is the candidate that, passing, became champion
        outputs=[Parameter(name="report", value_from=m.ValueFrom(path=report))],
        args=["evaluate", "--model", f"models:/lingbot-va-{task}@challenger", "--task", task,
              "--episodes", _param("eval-episodes"), "--workers", str(s.eval_workers),
              "--data-dir", f"{WORKSPACE}/data", "--tracking-uri", _param("mlflow-uri"),
              "--out", report],
        env=_env(s), env_from=[SecretEnvFrom(name=s.s3_secret)],
        volume_mounts=[m.VolumeMount(name="workspace", mount_path=WORKSPACE), *_scratch()[1]],
        resources=_bounded(str(s.eval_workers), f"{2 * s.eval_workers}Gi"), security_context=_container_security())
    isvc = manifests.inference_service(s, task=task, image=_param("image"), mlflow_uri=_param("mlflow-uri"),
                                       rollout="{{workflow.name}}", model_version="{{inputs.parameters.version}}")
    deploy = Resource(name="deploy", action="apply", manifest=_manifest(isvc), success_condition=ISVC_READY,
                      failure_condition=ISVC_FAILED,
                      inputs=[Parameter(name="version", description="registered version the gate promoted")])
    pipeline = Steps(name="posttrain", sub_steps=[
        Step(name="pull-data", template="dvc-get", arguments={"path": "{{item}}"},
             with_items=["data/latents", "data/feast", "data/runs/pretrain/model"]),
        Step(name="train", template="train"),
        Step(name="gate", template="gate"),  # exits non-zero when the gate rejects: nothing is deployed
        # the version the gate evaluated and, having passed, promoted to champion (its report's model_version)
        Step(name="deploy", template="deploy",
             arguments={"version": "{{=jsonpath(steps.gate.outputs.parameters.report, '$.model_version')}}"}),
    ])
    return WorkflowTemplate(
        name=POSTTRAIN, namespace=s.namespace, labels=manifests.labels("pipeline"), entrypoint="posttrain",
        service_account_name=s.service_account, security_context=_pod_security(s),
        arguments=[
            Parameter(name="task", value=s.task, description="Meta-World task; model lingbot-va-<task>"),
            Parameter(name="data-version", value=s.data_version, description="git revision of the DVC data"),
            Parameter(name="preset", value=s.posttrain_preset, description="model preset"),
            Parameter(name="steps", value=str(s.posttrain_steps), description="post-training steps"),
            Parameter(name="eval-episodes", value=str(s.eval_episodes), description="episodes of the gate"),
            Parameter(name="image", value=s.image(GPU_IMAGE), description="training + serving image"),
            Parameter(name="cpu-image", value=s.image(CPU_IMAGE), description="data + simulation-gate image"),
            Parameter(name="mlflow-uri", value=s.mlflow_uri, description="MLflow tracking URI"),
        ],
        volume_claim_templates=[_volume_claim(s, "workspace", s.workspace_size)], volumes=_scratch()[0],
        templates=[pipeline, _dvc_get(s, WORKSPACE, "workspace"), train, gate, deploy])


def posttrain_documents(s: ClusterSettings) -> list[dict]:
    """``kubectl apply -f pipelines/posttrain.yaml``: the ServingRuntime its endpoints use, the pipeline and one run.
    The service account, its Role and the Secrets belong to the platform's infra (infra/kustomize or
    charts/lingbot-platform), installed first; the infra creates the same ServingRuntime (the tests compare), so
    the file is complete on its own and applying it over the infra changes nothing."""
    run = _run(f"{POSTTRAIN}-{s.task}", POSTTRAIN, s, [Parameter(name="task", value=s.task)],
               manifests.labels("pipeline", s.task))
    return [manifests.to_dict(manifests.serving_runtime(s)), posttrain_template(s).to_dict(), run.to_dict()]


# -------------------------------------------------------------------------------------------------------- pretrain
def pretrain_template(s: ClusterSettings) -> WorkflowTemplate:
    """Encode latents sharded by rank, then pretrain on them across nodes."""
    data = [k8s.V1Volume(name="data", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
        claim_name=s.data_volume))]
    mounts = [k8s.V1VolumeMount(name="data", mount_path=DATA)]
    # `lingbot data encode` splits the episodes by RANK / WORLD_SIZE (torchrun's) and rank 0 merges the index
    # parts after a barrier, so every rank must see the same output folder: the ReadWriteMany data volume.
    encode = manifests.pytorch_job(
        s, name="{{workflow.name}}-encode", component="encode", task=None, image=_param("cpu-image"),
        nodes=s.encode_nodes, nproc_per_node="1", gpu=False, volumes=data, mounts=mounts,
        resources=manifests.bounded({"cpu": "8", "memory": "32Gi"}), mlflow_uri=_param("mlflow-uri"),
        args=["-m", "pipelines.cli", "data", "encode", "--episodes-dir", f"{DATA}/data/episodes",
              "--prepared-dir", f"{DATA}/data/prepared", "--feast-dir", f"{DATA}/data/feast",
              "--out", f"{DATA}/data/latents", "--preset", _param("preset")])
    # min/max become torchrun's --nnodes MIN:MAX (PET_NNODES): counted in pods, the Master included
    elastic = KubeflowOrgV1ElasticPolicy(rdzv_backend="c10d", min_replicas=min(s.pretrain_min_nodes, s.pretrain_nodes),
                                         max_replicas=s.pretrain_nodes, max_restarts=s.pretrain_max_restarts)
    pretrain = manifests.pytorch_job(
        s, name="{{workflow.name}}-train", component="pretrain", task=None, image=_param("image"),
        nodes=s.pretrain_nodes, nproc_per_node=str(s.gpus_per_node), gpu=True, elastic=elastic, volumes=data,
        mounts=mounts, resources=manifests.gpu_resources(s, s.gpus_per_node), mlflow_uri=_param("mlflow-uri"),
        args=["-m", "pipelines.cli", "train", "pretrain", "--preset", _param("preset"), "--steps", _param("steps"),
              "--zero-stage", str(s.pretrain_zero_stage), "--checkpoint-every", str(s.pretrain_checkpoint_every),
              "--data-dir", f"{DATA}/data", "--run-dir", f"{DATA}/data/runs/pretrain", "--tracking-uri",
              _param("mlflow-uri"), "--resume-if-present"])  # elastic restarts continue from the last checkpoint
    pipeline = Steps(name="pretrain", sub_steps=[
        Step(name="pull-data", template="dvc-get", arguments={"path": "{{item}}"},
             with_items=["data/episodes", "data/prepared", "data/feast"]),
        Step(name="encode", template="encode"),
        Step(name="train", template="train"),
    ])
    return WorkflowTemplate(
        name=PRETRAIN, namespace=s.namespace, labels=manifests.labels("pipeline"), entrypoint="pretrain",
        service_account_name=s.service_account, security_context=_pod_security(s),
        arguments=[
            Parameter(name="data-version", value=s.data_version, description="git revision of the DVC data"),
            Parameter(name="preset", value=s.pretrain_preset, description="model preset"),
            Parameter(name="steps", value=str(s.pretrain_steps), description="pretraining steps"),
            Parameter(name="image", value=s.image(GPU_IMAGE), description="training image"),
            Parameter(name="cpu-image", value=s.image(CPU_IMAGE), description="data + encoding image"),
            Parameter(name="mlflow-uri", value=s.mlflow_uri, description="MLflow tracking URI"),
        ],
        volumes=[m.Volume(name="data", persistent_volume_claim=m.PersistentVolumeClaimVolumeSource(
            claim_name=s.data_volume)), *_scratch()[0]],
        templates=[pipeline, _dvc_get(s, DATA, "data"),
                   Resource(name="encode", action="create", set_owner_reference=True, manifest=_manifest(encode),
                            success_condition=PYTORCHJOB_SUCCEEDED, failure_condition=PYTORCHJOB_FAILED),
                   Resource(name="train", action="create", set_owner_reference=True, manifest=_manifest(pretrain),
                            success_condition=PYTORCHJOB_SUCCEEDED, failure_condition=PYTORCHJOB_FAILED)])


def pretrain_documents(s: ClusterSettings) -> list[dict]:
    """``kubectl apply -f pipelines/pretrain.yaml``: the shared data volume, the pipeline, one run (the service
    account, its Role and the Secrets belong to the platform's infra, installed first)."""
    run = _run(PRETRAIN, PRETRAIN, s, [], manifests.labels("pipeline"))
    return [manifests.to_dict(manifests.data_volume(s)), pretrain_template(s).to_dict(), run.to_dict()]
