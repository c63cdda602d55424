"""Cluster settings (``LINGBOT_CLUSTER_...`` env vars and ``.env``): what `lingbot render` bakes into the manifests.

Values a user changes per run (tasks, data version, preset, steps, base model, image, MLflow URI) are also Argo
parameters of the rendered workflows; everything else (sizes, placement, endpoints) is fixed at render time, so a
change here is a reviewed diff of the rendered files (`lingbot render --check` fails until it is rendered and
committed). Every rendered run is named after a digest of what it runs, so a changed value is a new run.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipelines.settings import parse_model_uri

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class Toleration(BaseModel):
    """One pod toleration (the fields of a Kubernetes ``Toleration``)."""

    key: str
    operator: str = Field("Exists", description="Exists or Equal")
    value: str | None = None
    effect: str | None = Field(None, description="NoSchedule, PreferNoSchedule or NoExecute; None = all")


class ClusterSettings(BaseSettings):
    """Where the platform runs on Kubernetes and how big its jobs are."""

    model_config = SettingsConfigDict(env_prefix="LINGBOT_CLUSTER_", env_file=".env", extra="ignore")

    namespace: str = Field("lingbot", description="namespace of every rendered object")
    registry: str = Field("ghcr.io/lingbot-va", description="container registry the images are pushed to")
    tag: str = Field("0.1.0", description="image tag (the package version by default)")
    service_account: str = Field("lingbot-va-pipeline", description="service account the workflows run as")
    run_as_user: int = Field(10001, ge=1, description="non-root uid of the images' `lingbot` user")

    # data: DVC reads dvc.lock from the git repo at the requested revision and the bytes from the S3 remote. The
    # infra (infra/kustomize, charts/lingbot-platform: Chart.yaml home, minio.buckets) is checked against both by
    # tests/pipelines/cluster/test_cluster_infra.py: one repository, one bucket the platform's MinIO user may read.
    git_repo: str = Field("https://github.com/lingbot-va/lingbot-va-platform.git",
                          description="the platform's git repository (DVC reads dvc.lock from it; the chart's home)")
    data_version: str = Field("main", description="default git revision (branch, tag, sha) of the DVC data")
    dvc_remote_url: str = Field("s3://lingbot-data/dvc", description="the DVC remote on the cluster's object store "
                                                                     "(s3://<bucket>/<prefix>; the bucket: one the "
                                                                     "infra creates, lingbot-data)")
    s3_endpoint: str = Field("http://minio.lingbot.svc.cluster.local:9000", description="S3 API endpoint")
    s3_region: str = Field("us-east-1", description="S3 region (MinIO ignores it; boto3 needs one)")
    s3_secret: str = Field("lingbot-va-s3", description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    mlflow_uri: str = Field("http://mlflow.lingbot.svc.cluster.local:5000", description="MLflow tracking URI")
    storage_class: str | None = Field(None, description="ReadWriteMany storage class of shared volumes "
                                                        "(None: the cluster default)")
    workspace_size: str = Field("200Gi", description="per-run volume of a post-training workflow")

    # GPU jobs
    gpus_per_node: int = Field(8, ge=1, description="nvidia.com/gpu per training pod (one pod per node)")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of training pods")
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", effect="NoSchedule")],
        description="tolerations of GPU pods (the NVIDIA device plugin's usual taint)")
    cpu_per_gpu: int = Field(8, ge=1, description="CPU cores requested per GPU (data loading, DeepSpeed)")
    memory_per_gpu_gi: int = Field(64, ge=1, description="memory requested per GPU (GiB)")
    shm_size: str = Field("64Gi", description="/dev/shm of training pods (NCCL, data-loader workers)")

    # the chain: data (DVC + the real encoders) -> pretrain -> lingbot-va-base -> post-train per task -> gate -> deploy
    preset: str = Field("paper-5.3b", description="model preset of the chain: pretraining's shape and the text width "
                                                  "prepare encodes for (post-training inherits the base model's)")
    vae_path: str = Field("weights/Wan2.2-TI2V-5B-Diffusers",
                          description="Wan2.2 VAE on the data volume, relative to its root (a diffusers pipeline "
                                      "root with vae/, or the vae folder): what encode runs")
    text_encoder_path: str = Field("weights/Wan2.2-TI2V-5B-Diffusers",
                                   description="umT5 text encoder + tokenizer on the data volume, relative to its root "
                                               "(a diffusers pipeline root, or one folder holding both): what "
                                               "prepare embeds the instructions with")
    base_model: str = Field("models:/lingbot-va-base@challenger",
                            description="registered model post-training starts from: pretraining registers "
                                        "lingbot-va-base (alias challenger on its newest version); pin a version "
                                        "(models:/lingbot-va-base/<n>) to post-train from that one")

    # post-training (pipelines/posttrain.yaml)
    tasks: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["reach-v3"],
        description="Meta-World tasks post-trained, gated and deployed by one run (comma-separated)")
    parallel_tasks: int = Field(2, ge=1, description="tasks post-trained at once (each takes posttrain_nodes nodes)")
    posttrain_steps: int = Field(300, ge=1, description="default post-training steps")
    posttrain_nodes: int = Field(1, ge=1, description="pods of the post-training PyTorchJob (1 Master + N-1 Workers)")
    posttrain_zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage of post-training")
    eval_episodes: int = Field(50, ge=1, description="default episodes of the simulation gate")
    eval_workers: int = Field(4, ge=1, description="parallel simulator processes of the gate")

    # serving (the task's InferenceService on the robots' edge GPU nodes)
    edge_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"platform.lingbot-va.io/node-pool": "edge-gpu"}, description="edge node labels")
    edge_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="platform.lingbot-va.io/edge", effect="NoSchedule"),
                                 Toleration(key="nvidia.com/gpu", effect="NoSchedule")],
        description="taints of the edge GPU nodes the policy server tolerates")
    serve_gpus: int = Field(1, ge=0, description="nvidia.com/gpu per policy-server pod")
    serve_replicas: int = Field(1, ge=1, description="policy-server pods of the stable predictor")
    serve_cpu: str = Field("2", description="CPU request of a policy-server pod")
    serve_memory: str = Field("8Gi", description="memory request of a policy-server pod")
    serve_cpu_limit: str = Field("4", description="CPU limit of a policy-server pod")
    serve_memory_limit: str = Field("16Gi", description="memory limit of a policy-server pod")
    serve_service_account: str = Field("lingbot-va-policy", description="service account of the policy-server pods "
                                                                        "(created by the platform's infra)")
    serving_runtime: str = Field("lingbot-va", description="ServingRuntime of LingBot-VA models (modelFormat "
                                                           "lingbot-va) in the namespace; the chart's is <release>")
    serve_token_secret: str = Field("lingbot-va-policy-token", description="Secret whose key `token` is the bearer "
                                                                            "token robots send (LINGBOT_SERVE_TOKEN)")
    canary_percent: int = Field(10, ge=0, le=100, description="share of the robots' episodes (robots split per "
                                                           "episode; KServe's trafficPercent) on the canary pods, "
                                                           "restarted by every deployment so they load the new "
                                                           "champion (0: dark)")

    # pretraining (pipelines/pretrain.yaml)
    pretrain_steps: int = Field(100_000, ge=1, description="pretraining steps")
    pretrain_nodes: int = Field(8, ge=1, description="pods (nodes) of the pretraining PyTorchJob")
    pretrain_min_nodes: int = Field(4, ge=1, description="elastic lower bound of pretraining nodes")
    pretrain_zero_stage: int = Field(3, ge=0, le=3, description="DeepSpeed ZeRO stage of pretraining")
    pretrain_checkpoint_every: int = Field(500, ge=1, description="DeepSpeed checkpoint interval (steps)")
    pretrain_max_restarts: int = Field(10, ge=0, description="elastic restarts before the job fails")
    encode_nodes: int = Field(4, ge=1, description="pods of pretraining's latent-encoding job (each encodes its "
                                                    "ranks' share; post-training encodes its data in one)")
    data_volume: str = Field("lingbot-va-data", description="ReadWriteMany PVC of the encoder weights and the "
                                                             "pretraining runs")
    data_volume_size: str = Field("20Ti", description="size of the data PVC")

    @field_validator("namespace", "service_account", "s3_secret", "data_volume", "serve_service_account",
                     "serve_token_secret", "serving_runtime")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value) or len(value) > 63:
            raise ValueError(f"{value!r} is not a DNS-1123 label (lower-case alphanumerics and '-', <= 63)")
        return value

    @field_validator("dvc_remote_url")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        if not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", value):
            raise ValueError(f"dvc_remote_url {value!r} must be s3://<bucket>[/<prefix>] (an S3 bucket name)")
        return value.rstrip("/")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, value):
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value

    @field_validator("tasks")
    @classmethod
    def _task_slugs(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("tasks: at least one task")
        for task in value:
            # a task ends up in object names and label values; the longest, KServe's Deployment and Service
            # lingbot-va-<task>-canary-predictor, must be a DNS label (<= 63)
            if not _DNS_LABEL.fullmatch(task) or len(task) > 35:
                raise ValueError(f"task {task!r} must be a lower-case slug (a-z, 0-9, '-'; <= 35 characters)")
        if len(set(value)) != len(value):
            raise ValueError(f"tasks {value} name a task twice (one endpoint per task)")
        return value

    @field_validator("vae_path", "text_encoder_path")
    @classmethod
    def _on_the_data_volume(cls, value: str) -> str:
        parts = value.strip("/").split("/")
        if value.startswith("/") or not value.strip("/") or ".." in parts:
            raise ValueError(f"{value!r} must be a path relative to the data volume's root (no '/' first, no '..')")
        return value.strip("/")

    @field_validator("base_model")
    @classmethod
    def _registry_uri(cls, value: str) -> str:
        if parse_model_uri(value) is None:
            raise ValueError(f"base_model {value!r} must be models:/<name>@<alias> or models:/<name>/<version>")
        return value

    @property
    def data_bucket(self) -> str:
        """The bucket of the DVC remote: what the data steps read and the infra must create and grant."""
        return self.dvc_remote_url.removeprefix("s3://").partition("/")[0]

    def image(self, name: str) -> str:
        """Full reference of one of the platform images (``IMAGES`` in ``pipelines.cluster.images``)."""
        return f"{self.registry}/{name}:{self.tag}"
