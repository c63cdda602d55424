"""Typed builders of the Kubernetes objects the pipelines create: kubernetes-client models for built-in kinds,
kubeflow-training models for PyTorchJobs, kserve models for InferenceServices. ``to_dict`` serialises any of them
the way the Kubernetes API expects (camelCase keys, no nulls).

Arguments may carry Argo placeholders (``{{workflow.parameters.task}}``): these objects are also embedded in the
workflows' resource templates, where Argo fills them in before it applies the manifest.
"""

from __future__ import annotations

from typing import Any

from kserve.models import V1beta1CanarySpec, V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
from kubeflow.training.models import (
    KubeflowOrgV1ElasticPolicy,
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes import client as k8s

from pipelines.cluster.settings import ClusterSettings
from pipelines.cluster.validate import (
    DEPLOYMENT_MODE_ANNOTATION,
    EDGE_PLACEMENT,
    PLACEMENT_LABEL,
    STANDARD_MODE,
)

PART_OF = "lingbot-va"
TASK_LABEL = "platform.lingbot-va.io/task"
ROLLOUT_ANNOTATION = "platform.lingbot-va.io/rollout"
"""Pod annotation set to the deploying workflow's name on the canary: a new value restarts those pods."""
SERVE_PORT = 8080  # kserve's default HTTP port, which Standard mode's Service targets
_API = k8s.ApiClient()


def to_dict(obj: Any) -> dict:
    """A typed object as the API's JSON (what ``kubectl apply`` sends)."""
    return _API.sanitize_for_serialization(obj)


def labels(component: str, task: str | None = None) -> dict[str, str]:
    """Recommended app labels, plus the task a workload belongs to."""
    out = {"app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/component": component}
    if task is not None:
        out[TASK_LABEL] = task
    return out


def env_from(s: ClusterSettings) -> list[k8s.V1EnvFromSource]:
    """Endpoints from the ConfigMap, S3 credentials from the Secret (created by the platform's infra, never here)."""
    return [k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=s.env_configmap)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s.s3_secret))]


def env_configmap(s: ClusterSettings) -> k8s.V1ConfigMap:
    """Non-secret environment of every pod: MLflow and the S3 endpoint (boto3, DVC and MLflow read these)."""
    return k8s.V1ConfigMap(
        api_version="v1", kind="ConfigMap",
        metadata=k8s.V1ObjectMeta(name=s.env_configmap, namespace=s.namespace, labels=labels("config")),
        data={"MLFLOW_TRACKING_URI": s.mlflow_uri, "MLFLOW_S3_ENDPOINT_URL": s.s3_endpoint,
              "AWS_ENDPOINT_URL": s.s3_endpoint, "AWS_DEFAULT_REGION": s.s3_region})


def pipeline_rbac(s: ClusterSettings) -> list[Any]:
    """The service account the workflows run as, allowed to create what their resource templates create."""
    meta = dict(namespace=s.namespace, labels=labels("pipeline"))
    rules = [
        # Argo >= 3.4 executors report step outputs through WorkflowTaskResults
        k8s.V1PolicyRule(api_groups=["argoproj.io"], resources=["workflowtaskresults"], verbs=["create", "patch"]),
        k8s.V1PolicyRule(api_groups=["kubeflow.org"], resources=["pytorchjobs"],
                         verbs=["get", "list", "watch", "create", "patch", "delete"]),
        k8s.V1PolicyRule(api_groups=["serving.kserve.io"], resources=["inferenceservices"],
                         verbs=["get", "list", "watch", "create", "patch", "update"]),
    ]
    return [
        k8s.V1ServiceAccount(api_version="v1", kind="ServiceAccount",
                             metadata=k8s.V1ObjectMeta(name=s.service_account, **meta)),
        k8s.V1Role(api_version="rbac.authorization.k8s.io/v1", kind="Role",
                   metadata=k8s.V1ObjectMeta(name=s.service_account, **meta), rules=rules),
        k8s.V1RoleBinding(api_version="rbac.authorization.k8s.io/v1", kind="RoleBinding",
                          metadata=k8s.V1ObjectMeta(name=s.service_account, **meta),
                          role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role",
                                                 name=s.service_account),
                          subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name=s.service_account,
                                                      namespace=s.namespace)]),
    ]


def data_volume(s: ClusterSettings) -> k8s.V1PersistentVolumeClaim:
    """The shared ReadWriteMany volume of pretraining: episodes, latents, checkpoints (survives the workflow)."""
    return k8s.V1PersistentVolumeClaim(
        api_version="v1", kind="PersistentVolumeClaim",
        metadata=k8s.V1ObjectMeta(name=s.data_volume, namespace=s.namespace, labels=labels("data")),
        spec=k8s.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteMany"], storage_class_name=s.storage_class,
            resources=k8s.V1VolumeResourceRequirements(requests={"storage": s.data_volume_size})))


def container_security(s: ClusterSettings) -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(run_as_non_root=True, run_as_user=s.run_as_user, allow_privilege_escalation=False,
                                 capabilities=k8s.V1Capabilities(drop=["ALL"]))


def pod_security(s: ClusterSettings) -> k8s.V1PodSecurityContext:
    # fs_group: volumes (PVCs, emptyDirs) become writable by the images' non-root user
    return k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=s.run_as_user, run_as_group=s.run_as_user,
                                    fs_group=s.run_as_user)


def tolerations(items) -> list[k8s.V1Toleration]:
    return [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in items]


def gpu_resources(s: ClusterSettings, gpus: int) -> k8s.V1ResourceRequirements:
    """One training pod's share of a node: ``gpus`` GPUs and the CPU/memory that feed them."""
    requests = {"cpu": str(s.cpu_per_gpu * gpus), "memory": f"{s.memory_per_gpu_gi * gpus}Gi",
                "nvidia.com/gpu": str(gpus)}
    return k8s.V1ResourceRequirements(requests=requests, limits={"nvidia.com/gpu": str(gpus)})


def pytorch_job(s: ClusterSettings, *, name: str, component: str, task: str | None, image: str, args: list[str],
                nodes: int, nproc_per_node: str, resources: k8s.V1ResourceRequirements,
                volumes: list[k8s.V1Volume], mounts: list[k8s.V1VolumeMount], gpu: bool,
                elastic: KubeflowOrgV1ElasticPolicy | None = None) -> KubeflowOrgV1PyTorchJob:
    """A PyTorchJob of ``nodes`` pods (1 Master + ``nodes - 1`` Workers) each running ``torchrun <args>``.

    The training operator injects torchrun's environment (``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
    ``PET_NPROC_PER_NODE``, or the rendezvous settings of an elastic policy), so the command needs no launcher flags.
    """
    shm = k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=s.shm_size))
    container = k8s.V1Container(
        name="pytorch", image=image, command=["torchrun"], args=args, env_from=env_from(s), resources=resources,
        volume_mounts=[*mounts, k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        security_context=container_security(s))
    pod = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=labels(component, task)),
        spec=k8s.V1PodSpec(containers=[container], volumes=[*volumes, shm], security_context=pod_security(s),
                           node_selector=(s.gpu_node_selector or None) if gpu else None,
                           tolerations=tolerations(s.gpu_tolerations) if gpu else None))
    replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=pod)}
    if nodes > 1 or elastic is not None:
        replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=max(nodes - 1, 1), restart_policy="OnFailure",
                                                      template=pod)
    return KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1", kind="PyTorchJob",
        metadata=k8s.V1ObjectMeta(name=name, namespace=s.namespace, labels=labels(component, task)),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=nproc_per_node, pytorch_replica_specs=replicas, elastic_policy=elastic,
            # keep finished pods (their logs) until the job is deleted; retry a crashed pod a few times
            run_policy=KubeflowOrgV1RunPolicy(clean_pod_policy="None", backoff_limit=3)))


def _predictor(s: ClusterSettings, *, task: str, image: str, mlflow_uri: str, name: str | None,
               replicas: int, annotations: dict[str, str] | None) -> V1beta1PredictorSpec:
    ready = k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path="/v2/health/ready", port=SERVE_PORT),
                        period_seconds=10, failure_threshold=60)  # loading a large model takes minutes
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": s.serve_cpu, "memory": s.serve_memory, **({"nvidia.com/gpu": str(s.serve_gpus)}
                                                                   if s.serve_gpus else {})},
        limits={"nvidia.com/gpu": str(s.serve_gpus)} if s.serve_gpus else None)
    container = k8s.V1Container(
        name="kserve-container", image=image, env_from=env_from(s), resources=resources, readiness_probe=ready,
        ports=[k8s.V1ContainerPort(name="http1", container_port=SERVE_PORT, protocol="TCP")],
        security_context=container_security(s),
        # --poll-interval-s 0: a pod keeps the champion it loaded at start; the canary pods, restarted by every
        # deployment, take the new champion first (see inference_service)
        args=["serve", "--model", f"models:/lingbot-va-{task}@champion", "--host", "0.0.0.0",
              "--device", "cuda" if s.serve_gpus else "cpu", "--tracking-uri", mlflow_uri, "--poll-interval-s", "0",
              "--http_port", str(SERVE_PORT)])
    return V1beta1PredictorSpec(
        name=name, containers=[container], min_replicas=replicas, annotations=annotations,
        node_selector=dict(s.edge_node_selector), tolerations=tolerations(s.edge_tolerations),
        security_context=pod_security(s))


def inference_service(s: ClusterSettings, *, task: str, image: str, mlflow_uri: str,
                      rollout: str) -> V1beta1InferenceService:
    """The task's policy endpoint on the edge GPU nodes, in KServe Standard mode, with a canary.

    Standard mode ignores ``predictor.canaryTrafficPercent`` (a Knative feature); KServe >= 0.20 splits traffic in
    Standard mode with ``spec.canary``: named extra Deployments with a ``trafficPercent`` each. The stable pods keep
    the champion they loaded at start; the canary pods carry ``rollout`` (the deploying workflow's name) as a pod
    annotation, so every deployment restarts them and they serve the new champion to ``canary_percent`` % of the
    traffic. The stable pods take it when they next restart (``kubectl rollout restart
    deployment/lingbot-va-<task>-predictor`` once the canary looks healthy).
    """
    stable = _predictor(s, task=task, image=image, mlflow_uri=mlflow_uri, name=None, replicas=s.serve_replicas,
                        annotations=None)
    canary = _predictor(s, task=task, image=image, mlflow_uri=mlflow_uri, name="canary", replicas=1,
                        annotations={ROLLOUT_ANNOTATION: rollout})
    return V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1", kind="InferenceService",
        metadata=k8s.V1ObjectMeta(
            name=f"lingbot-va-{task}", namespace=s.namespace,
            labels={**labels("policy-server", task), PLACEMENT_LABEL: EDGE_PLACEMENT},
            annotations={DEPLOYMENT_MODE_ANNOTATION: STANDARD_MODE}),
        spec=V1beta1InferenceServiceSpec(
            predictor=stable, canary=[V1beta1CanarySpec(predictor=canary, traffic_percent=s.canary_percent)]))
