"""Typed builders of the Kubernetes objects the pipelines create: kubernetes-client models for built-in kinds,
kubeflow-training models for PyTorchJobs, kserve models for InferenceServices. ``to_dict`` serialises any of them
the way the Kubernetes API expects (camelCase keys, no nulls).

Arguments may carry Argo placeholders (``{{workflow.parameters.task}}``): these objects are also embedded in the
workflows' resource templates, where Argo fills them in before it applies the manifest.
"""

from __future__ import annotations

from typing import Any

from kserve.models import (
    V1alpha1ServingRuntime,
    V1alpha1ServingRuntimeSpec,
    V1alpha1SupportedModelFormat,
    V1beta1CanarySpec,
    V1beta1InferenceService,
    V1beta1InferenceServiceSpec,
    V1beta1ModelFormat,
    V1beta1ModelSpec,
    V1beta1PredictorSpec,
)
from kubeflow.training.models import (
    KubeflowOrgV1ElasticPolicy,
    KubeflowOrgV1PyTorchJob,
    KubeflowOrgV1PyTorchJobSpec,
    KubeflowOrgV1ReplicaSpec,
    KubeflowOrgV1RunPolicy,
)
from kubernetes import client as k8s

from pipelines.cluster.admission import (
    DEPLOYMENT_MODE_ANNOTATION,
    EDGE_PLACEMENT,
    KSERVE_CONTAINER,
    PLACEMENT_LABEL,
    STANDARD_MODE,
)
from pipelines.cluster.images import GPU_IMAGE
from pipelines.cluster.settings import ClusterSettings

PART_OF = "lingbot-va"
TASK_LABEL = "platform.lingbot-va.io/task"
ROLLOUT_ANNOTATION = "platform.lingbot-va.io/rollout"
"""Pod annotation set to the deploying workflow's name on the canary: a new value restarts those pods."""
HTTP_PORT = 8080  # kserve's default REST port, which Standard mode's Service targets
GRPC_PORT = 8081  # kserve's default gRPC port: the robots' primary protocol
CANARY = "canary"
"""``predictor.name`` of the deploy step's canary: KServe names its Deployment and Service
``lingbot-va-<task>-canary-predictor``."""
MODEL_FORMAT = "lingbot-va"
"""``modelFormat.name`` of a LingBot-VA model directory: what the ``ServingRuntime`` supports (auto-selected)."""
PROTOCOLS = ("v2", "grpc-v2")
"""The runtime's ``protocolVersions`` (Open Inference Protocol over REST and gRPC); an InferenceService's model names
the first: KServe assumes v1 for a model without ``protocolVersion``, which this runtime does not serve."""
TOKEN_KEY = "token"
"""Key of the bearer token in ``ClusterSettings.serve_token_secret`` (the infra's lingbot-va-policy-token)."""
SERVE_DATA = "/var/lib/lingbot"  # the policy server's data dir: downloaded models (a writable emptyDir)
SERVE_DATA_SIZE = "20Gi"
MODEL_DESCRIPTOR = "python_model.pkl"
"""A file every registered LingBot-VA version holds (the pickled ``LingBotPyfunc`` of the MLflow pyfunc, small):
what KServe's storage initializer fetches; the server itself downloads the whole version from the registry."""
HOME = "/home/lingbot"  # the images' HOME: caches, DeepSpeed's compiled ops (TORCH_EXTENSIONS_DIR), default data dirs
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


def endpoint_env(s: ClusterSettings, mlflow_uri: str) -> list[k8s.V1EnvVar]:
    """MLflow and the S3 endpoint as boto3, DVC and MLflow read them, from the same settings the steps' flags use.

    Literal values rather than a ConfigMap: the platform's infra owns the shared objects (service accounts, RBAC,
    Secrets), and a second copy of the endpoints in a ConfigMap could disagree with the flags.
    """
    return [k8s.V1EnvVar(name="MLFLOW_TRACKING_URI", value=mlflow_uri),
            k8s.V1EnvVar(name="MLFLOW_S3_ENDPOINT_URL", value=s.s3_endpoint),
            k8s.V1EnvVar(name="AWS_ENDPOINT_URL", value=s.s3_endpoint),
            k8s.V1EnvVar(name="AWS_DEFAULT_REGION", value=s.s3_region)]


def s3_credentials(s: ClusterSettings) -> list[k8s.V1EnvFromSource]:
    """AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the Secret the platform's infra creates (never here)."""
    return [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=s.s3_secret))]


def data_volume(s: ClusterSettings) -> k8s.V1PersistentVolumeClaim:
    """The shared ReadWriteMany volume of pretraining: episodes, latents, checkpoints (survives the workflow)."""
    return k8s.V1PersistentVolumeClaim(
        api_version="v1", kind="PersistentVolumeClaim",
        metadata=k8s.V1ObjectMeta(name=s.data_volume, namespace=s.namespace, labels=labels("data")),
        spec=k8s.V1PersistentVolumeClaimSpec(
            access_modes=["ReadWriteMany"], storage_class_name=s.storage_class,
            resources=k8s.V1VolumeResourceRequirements(requests={"storage": s.data_volume_size})))


def container_security() -> k8s.V1SecurityContext:
    """The restricted profile of the namespace (Pod Security "restricted") plus a read-only root filesystem:
    what a container may write is a volume (``scratch_volumes``, the data volumes)."""
    return k8s.V1SecurityContext(allow_privilege_escalation=False, read_only_root_filesystem=True,
                                 capabilities=k8s.V1Capabilities(drop=["ALL"]))


def pod_security(s: ClusterSettings) -> k8s.V1PodSecurityContext:
    # fs_group: volumes (PVCs, emptyDirs) become writable by the images' non-root user
    return k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=s.run_as_user, run_as_group=s.run_as_user,
                                    fs_group=s.run_as_user,
                                    seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"))


def scratch_volumes() -> tuple[list[k8s.V1Volume], list[k8s.V1VolumeMount]]:
    """Writable ``HOME`` and ``/tmp`` over the read-only root filesystem (caches, DeepSpeed's JIT-built ops, git
    clones of ``dvc get``); they live as long as the pod."""
    names = {"home": HOME, "tmp": "/tmp"}
    return ([k8s.V1Volume(name=n, empty_dir=k8s.V1EmptyDirVolumeSource()) for n in names],
            [k8s.V1VolumeMount(name=n, mount_path=path) for n, path in names.items()])


def tolerations(items) -> list[k8s.V1Toleration]:
    return [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect) for t in items]


def bounded(requests: dict[str, str]) -> k8s.V1ResourceRequirements:
    """Limits equal to the requests: every pipeline pod is bounded (Guaranteed QoS where it has no GPU share)."""
    return k8s.V1ResourceRequirements(requests=dict(requests), limits=dict(requests))


def gpu_resources(s: ClusterSettings, gpus: int) -> k8s.V1ResourceRequirements:
    """One training pod's share of a node: ``gpus`` GPUs and the CPU/memory that feed them."""
    return bounded({"cpu": str(s.cpu_per_gpu * gpus), "memory": f"{s.memory_per_gpu_gi * gpus}Gi",
                    "nvidia.com/gpu": str(gpus)})


def pytorch_job(s: ClusterSettings, *, name: str, component: str, task: str | None, image: str, args: list[str],
                nodes: int, nproc_per_node: str, resources: k8s.V1ResourceRequirements, mlflow_uri: str,
                volumes: list[k8s.V1Volume], mounts: list[k8s.V1VolumeMount], gpu: bool,
                elastic: KubeflowOrgV1ElasticPolicy | None = None,
                generate_name: bool = False) -> KubeflowOrgV1PyTorchJob:
    """A PyTorchJob of ``nodes`` pods (1 Master + ``nodes - 1`` Workers) each running ``torchrun <args>``;
    ``generate_name``: ``name`` is the prefix of a name the API server completes (one job per call of a template).

    The training operator injects torchrun's environment (``PET_NNODES``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
    ``PET_NPROC_PER_NODE``, or the rendezvous settings of an elastic policy), so the command needs no launcher flags.
    """
    shm = k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=s.shm_size))
    scratch, scratch_mounts = scratch_volumes()
    container = k8s.V1Container(
        name="pytorch", image=image, command=["torchrun"], args=args, env=endpoint_env(s, mlflow_uri),
        env_from=s3_credentials(s), resources=resources,
        volume_mounts=[*mounts, *scratch_mounts, k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm")],
        security_context=container_security())
    pod = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=labels(component, task)),
        spec=k8s.V1PodSpec(containers=[container], volumes=[*volumes, *scratch, shm], security_context=pod_security(s),
                           node_selector=(s.gpu_node_selector or None) if gpu else None,
                           tolerations=tolerations(s.gpu_tolerations) if gpu else None))
    replicas = {"Master": KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=pod)}
    if nodes > 1 or elastic is not None:
        replicas["Worker"] = KubeflowOrgV1ReplicaSpec(replicas=max(nodes - 1, 1), restart_policy="OnFailure",
                                                      template=pod)
    return KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1", kind="PyTorchJob",
        metadata=k8s.V1ObjectMeta(name=None if generate_name else name, generate_name=name if generate_name else None,
                                  namespace=s.namespace, labels=labels(component, task)),
        spec=KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=nproc_per_node, pytorch_replica_specs=replicas, elastic_policy=elastic,
            # keep finished pods (their logs) until the job is deleted; retry a crashed pod a few times
            run_policy=KubeflowOrgV1RunPolicy(clean_pod_policy="None", backoff_limit=3)))


def serve_resources(s: ClusterSettings) -> k8s.V1ResourceRequirements:
    gpu = {"nvidia.com/gpu": str(s.serve_gpus)} if s.serve_gpus else {}
    return k8s.V1ResourceRequirements(requests={"cpu": s.serve_cpu, "memory": s.serve_memory, **gpu},
                                      limits={"cpu": s.serve_cpu_limit, "memory": s.serve_memory_limit, **gpu})


def registered_name(task: str) -> str:
    """The registered model a task's endpoint serves (``pipelines.train.registry.registered_name_for``)."""
    return f"lingbot-va-{task}"


def model_storage_uri(mlflow_uri: str, task: str, version: str) -> str:
    """The storage URI of a registered version: MLflow's ``/model-versions/get-artifact`` endpoint (proxied
    artifacts) for ``MODEL_DESCRIPTOR``.

    KServe requires a model location on the stable predictor of an InferenceService with a canary
    (``validateCanarySpecs``): ``predictor.model.storageUri``, which the storage initializer downloads to
    /mnt/models before the server starts (``http(s)://`` is one of its accepted schemes). Over HTTP from MLflow, so
    the endpoint needs no S3 credentials and no route to the object store (the platform's network rules); the file is
    sent as ``application/octet-stream``, which the storage initializer requires of a plain HTTP download.
    """
    return (f"{mlflow_uri.rstrip('/')}/model-versions/get-artifact?name={registered_name(task)}&version={version}"
            f"&path={MODEL_DESCRIPTOR}")


def _probe(path: str, period: int, failures: int | None = None) -> k8s.V1Probe:
    return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=path, port=HTTP_PORT), period_seconds=period,
                       failure_threshold=failures)


def serving_runtime(s: ClusterSettings) -> V1alpha1ServingRuntime:
    """The ``ServingRuntime`` of LingBot-VA: how KServe runs ``lingbot serve`` for any ``predictor.model`` of format
    ``MODEL_FORMAT``, shaped like the platform's own endpoint (REST + gRPC ports, a read-only root with writable
    data and /tmp). What differs per endpoint (the model, MLflow, the device, the token, resources) is the
    InferenceService's (``model_container``); KServe merges the two (``MergeServingRuntimeAndInferenceServiceSpecs``:
    the runtime's ``kserve-container`` patched by ``predictor.model``, args appended).

    The infra creates the same object: infra/kustomize/base/policy.yaml is rendered from here, the chart
    (charts/lingbot-platform) templates it and the tests compare.
    """
    container = k8s.V1Container(
        name=KSERVE_CONTAINER, image=s.image(GPU_IMAGE), command=["lingbot", "serve"],
        args=["--http_port", str(HTTP_PORT), "--grpc_port", str(GRPC_PORT)],
        # the server's default host (127.0.0.1) is unreachable from the Service
        env=[k8s.V1EnvVar(name="LINGBOT_SERVE_HOST", value="0.0.0.0"),
             k8s.V1EnvVar(name="LINGBOT_SERVE_DATA_DIR", value=SERVE_DATA), k8s.V1EnvVar(name="HOME", value="/tmp")],
        ports=[k8s.V1ContainerPort(name="http1", container_port=HTTP_PORT, protocol="TCP"),
               k8s.V1ContainerPort(name="h2c", container_port=GRPC_PORT, protocol="TCP")],
        startup_probe=_probe("/v2/health/live", 10, 60),  # the first load downloads the model from the registry
        readiness_probe=_probe("/v2/health/ready", 10), liveness_probe=_probe("/v2/health/live", 20),
        security_context=container_security(),
        volume_mounts=[k8s.V1VolumeMount(name="data", mount_path=SERVE_DATA),
                       k8s.V1VolumeMount(name="tmp", mount_path="/tmp")])
    return V1alpha1ServingRuntime(
        api_version="serving.kserve.io/v1alpha1", kind="ServingRuntime",
        metadata=k8s.V1ObjectMeta(name=s.serving_runtime, namespace=s.namespace, labels=labels("policy-server")),
        spec=V1alpha1ServingRuntimeSpec(
            # autoSelect: an InferenceService naming only the format gets this runtime (KServe's GetSupportingRuntimes)
            supported_model_formats=[V1alpha1SupportedModelFormat(name=MODEL_FORMAT, auto_select=True)],
            protocol_versions=list(PROTOCOLS), containers=[container],
            volumes=[k8s.V1Volume(name="data", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=SERVE_DATA_SIZE)),
                     k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource())]))


def _predictor(s: ClusterSettings, *, task: str, image: str | None, mlflow_uri: str, name: str | None,
               replicas: int, annotations: dict[str, str] | None, storage_uri: str | None = None,
               max_replicas: int | None = None, poll: bool = False) -> V1beta1PredictorSpec:
    """One Deployment of the task's ``lingbot serve``: ``predictor.model`` of format ``MODEL_FORMAT`` (the runtime
    ``serving_runtime`` supplies the container; ``image`` replaces the runtime's), plus the pod's placement (the
    edge nodes of the settings, if any), account and security context.

    ``storage_uri`` is the model's ``storageUri``: KServe's storage initializer downloads it to /mnt/models before
    the server starts. The server itself loads ``models:/lingbot-va-<task>@champion`` from the registry and, with
    ``poll``, follows the alias as it moves (a hot swap); without, a pod keeps the champion it loaded at start (the
    deploy step's canary pods, restarted by every deployment, take the new champion first: ``inference_service``)."""
    token = k8s.V1EnvVar(name="LINGBOT_SERVE_TOKEN", value_from=k8s.V1EnvVarSource(
        secret_key_ref=k8s.V1SecretKeySelector(name=s.serve_token_secret, key=TOKEN_KEY)))
    model = V1beta1ModelSpec(
        # name '' (the SDK's default): the CRD requires the field in a canary's model, the webhook refuses a
        # non-empty one in the stable predictor's (validatePredictor), and the container's name is the runtime's
        name="", model_format=V1beta1ModelFormat(name=MODEL_FORMAT), protocol_version=PROTOCOLS[0],
        storage_uri=storage_uri, image=image, resources=serve_resources(s),
        args=["--model", f"models:/{registered_name(task)}@champion", *([] if poll else ["--poll-interval-s", "0"])],
        env=[k8s.V1EnvVar(name="LINGBOT_SERVE_TRACKING_URI", value=mlflow_uri),
             k8s.V1EnvVar(name="LINGBOT_SERVE_DEVICE", value="cuda" if s.serve_gpus else "cpu"), token])
    return V1beta1PredictorSpec(
        name=name, model=model, min_replicas=replicas, max_replicas=max_replicas, annotations=annotations,
        service_account_name=s.serve_service_account, automount_service_account_token=False,
        node_selector=dict(s.edge_node_selector) or None, tolerations=tolerations(s.edge_tolerations) or None,
        security_context=pod_security(s))


def _endpoint(s: ClusterSettings, task: str, spec: V1beta1InferenceServiceSpec) -> V1beta1InferenceService:
    placement = {PLACEMENT_LABEL: EDGE_PLACEMENT} if s.edge_node_selector else {}
    return V1beta1InferenceService(
        api_version="serving.kserve.io/v1beta1", kind="InferenceService",
        metadata=k8s.V1ObjectMeta(name=registered_name(task), namespace=s.namespace,
                                  labels={**labels("policy-server", task), **placement},
                                  annotations={DEPLOYMENT_MODE_ANNOTATION: STANDARD_MODE}),
        spec=spec)


def infra_endpoint(s: ClusterSettings, *, task: str, mlflow_uri: str) -> V1beta1InferenceService:
    """The task's endpoint as the platform's infra installs it (infra/kustomize/base/policy.yaml, generated from
    here): the runtime's image, ``serve_replicas`` pods following ``models:/lingbot-va-<task>@champion`` as the
    alias moves (a hot swap inside the server, no rollout), no canary. The deploy step applies the same object with
    its rollout (``inference_service``)."""
    predictor = _predictor(s, task=task, image=None, mlflow_uri=mlflow_uri, name=None, replicas=s.serve_replicas,
                           max_replicas=s.serve_replicas, annotations=None, poll=True)
    return _endpoint(s, task, V1beta1InferenceServiceSpec(predictor=predictor))


def inference_service(s: ClusterSettings, *, task: str, image: str, mlflow_uri: str, rollout: str,
                      model_version: str) -> V1beta1InferenceService:
    """The task's policy endpoint on the edge GPU nodes, in KServe Standard mode, with a canary.

    Standard mode ignores ``predictor.canaryTrafficPercent`` (a Knative feature); KServe >= 0.20 runs ``spec.canary``
    in Standard mode as named extra Deployments, each behind its own Service (``predictor_service``). The stable pods
    keep the champion they loaded at start; the canary pods carry ``rollout`` (the deploying workflow's name) as a pod
    annotation, so every deployment restarts them and they serve the new champion first. The stable pods take it
    when they next restart (``kubectl rollout restart deployment/lingbot-va-<task>-predictor`` once the canary looks
    healthy).

    The robots split by episode, not by request: an episode's session (its KV cache) lives in one pod, so each robot
    addresses both Services and sends ``canary_percent`` % of its episodes, whole, to the canary (``robot_env``;
    ``services.robot_client.routing``). ``trafficPercent`` says the same share to KServe, whose own split (a weighted
    Gateway API route in releases after 0.20.0) is per request: fine for stateless calls, not for robot sessions.

    KServe's webhook (``validateCanarySpecs``) wants a model on the stable predictor and no ``maxReplicas`` on a
    canary (canaries run ``minReplicas`` pods): both predictors are ``predictor.model`` of format ``MODEL_FORMAT``
    (run by ``serving_runtime``), the stable one with the ``storageUri`` of ``model_version`` (the champion when the
    workflow deploys; ``model_storage_uri``; KServe merges each canary over the stable predictor, so the canary
    inherits it). The server still loads ``models:/lingbot-va-<task>@champion`` itself.
    """
    stable = _predictor(s, task=task, image=image, mlflow_uri=mlflow_uri, name=None, replicas=s.serve_replicas,
                        max_replicas=s.serve_replicas, annotations=None,
                        storage_uri=model_storage_uri(mlflow_uri, task, model_version))
    canary = _predictor(s, task=task, image=image, mlflow_uri=mlflow_uri, name=CANARY, replicas=1,
                        annotations={ROLLOUT_ANNOTATION: rollout})
    return _endpoint(s, task, V1beta1InferenceServiceSpec(
        predictor=stable, canary=[V1beta1CanarySpec(predictor=canary, traffic_percent=s.canary_percent)]))


def predictor_service(task: str, predictor: str | None = None) -> str:
    """The Service KServe's Standard mode makes for a predictor of the task's InferenceService ``lingbot-va-<task>``:
    ``<isvc>-predictor`` for the stable one, ``<isvc>-<name>-predictor`` for the canary ``name`` (KServe's
    ``PredictorServiceName``). Each selects only its own Deployment's pods; its ports are the container's, the first
    (REST) on 80."""
    return f"{registered_name(task)}-{predictor}-predictor" if predictor else f"{registered_name(task)}-predictor"


def robot_env(s: ClusterSettings, task: str) -> dict[str, str]:
    """``LINGBOT_ROBOT_*`` of a robot served by the task's deployed endpoint (``inference_service``): gRPC to the
    stable and canary Services in the cluster's DNS, ``canary_percent`` % of the episodes on the canary. Robots
    outside the cluster reach the same Services through whatever exposes them on the edge network."""
    def address(predictor: str | None) -> str:
        return f"{predictor_service(task, predictor)}.{s.namespace}.svc.cluster.local:{GRPC_PORT}"

    return {"LINGBOT_ROBOT_ENDPOINT": address(None), "LINGBOT_ROBOT_TRANSPORT": "grpc",
            "LINGBOT_ROBOT_CANARY_ENDPOINT": address(CANARY), "LINGBOT_ROBOT_CANARY_PERCENT": str(s.canary_percent)}


def infra_policy(s: ClusterSettings) -> list[dict]:
    """infra/kustomize/base/policy.yaml: the ServingRuntime and one endpoint per task (``infra_endpoint``) as the
    kustomize base installs them, unpinned (overlays/edge pins them to the settings' edge nodes; tested equal)."""
    unpinned = s.model_copy(update={"edge_node_selector": {}, "edge_tolerations": []})
    return [to_dict(serving_runtime(s)),
            *(to_dict(infra_endpoint(unpinned, task=task, mlflow_uri=s.mlflow_uri)) for task in s.tasks)]
