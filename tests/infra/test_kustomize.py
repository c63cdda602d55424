"""infra/kustomize: the base and the dev / edge overlays build offline, validate, and agree with the settings the
pipelines (pipelines/cluster/settings.py) and the policy server (services/policy_server/settings.py) use."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
import yaml
from infra_checks import KUSTOMIZE_SETS, NAMESPACE, REPO, effective_container, find, validatable

from pipelines.cluster.validate import validate_documents

NAMESPACED_EXCEPT = {"Namespace"}


@pytest.mark.parametrize("name", list(KUSTOMIZE_SETS))
def test_kustomize_builds_offline_into_one_namespace(rendered, name):
    docs = rendered(name)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Job", "InferenceService", "Role", "RoleBinding", "NetworkPolicy", "Secret",
            "ConfigMap", "Service", "ServiceAccount", "Namespace"} <= kinds
    for doc in docs:
        if doc["kind"] not in NAMESPACED_EXCEPT:
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


@pytest.mark.parametrize("name", list(KUSTOMIZE_SETS))
def test_kustomize_documents_validate(rendered, name):
    """Built-in kinds strictly against the Kubernetes schemas, the InferenceService against its CRD (+ admission)."""
    problems = validate_documents(validatable(rendered(name)))
    assert not problems, "\n".join(problems)


def _storage(doc: dict) -> str:
    return doc["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_dev_overlay_is_single_replica_small_and_cpu_only(rendered):
    base, dev = rendered("kustomize-base"), rendered("kustomize-dev")
    for kind in ("Deployment", "StatefulSet"):
        assert all(d["spec"].get("replicas", 1) == 1 for d in find(dev, kind))
    assert any(d["spec"]["replicas"] > 1 for d in find(base, "Deployment")), "the base should run replicated services"
    sizes = {d["metadata"]["name"]: _storage(d) for d in find(dev, "StatefulSet")}
    assert sizes == {"postgres": "2Gi", "minio": "10Gi"}
    assert {d["metadata"]["name"]: _storage(d) for d in find(base, "StatefulSet")} == {"postgres": "50Gi",
                                                                                        "minio": "200Gi"}
    c = effective_container(dev, "lingbot-va-reach-v3")
    assert "nvidia.com/gpu" not in c["resources"]["requests"] and "nvidia.com/gpu" not in c["resources"]["limits"]
    assert {e["name"]: e.get("value") for e in c["env"]}["LINGBOT_SERVE_DEVICE"] == "cpu"


def test_edge_overlay_pins_the_policy_endpoint_to_edge_gpu_nodes(rendered):
    from pipelines.cluster.settings import ClusterSettings

    s = ClusterSettings(_env_file=None)
    (isvc,) = find(rendered("kustomize-edge"), "InferenceService")
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["labels"]["platform.lingbot-va.io/placement"] == "edge"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    # the same node pool the pipelines' deploy step targets
    assert predictor["nodeSelector"] == s.edge_node_selector
    tolerated = {(t["key"], t.get("effect")) for t in predictor["tolerations"]}
    assert {(t.key, t.effect) for t in s.edge_tolerations} <= tolerated
    c = effective_container(rendered("kustomize-edge"), "lingbot-va-reach-v3")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {e["name"]: e.get("value") for e in c["env"]}["LINGBOT_SERVE_DEVICE"] == "cuda"
    # robots on the edge LAN may call it
    (policy,) = find(rendered("kustomize-edge"), "NetworkPolicy", "policy")
    assert {"ipBlock": {"cidr": "10.64.0.0/16"}} in policy["spec"]["ingress"][0]["from"]
    (base_isvc,) = find(rendered("kustomize-base"), "InferenceService")
    assert "nodeSelector" not in base_isvc["spec"]["predictor"]


def test_policy_endpoint_serves_the_champion_with_kserve_ports(rendered):
    from pipelines.cluster.settings import ClusterSettings

    s = ClusterSettings(_env_file=None)
    docs = rendered("kustomize-base")
    (isvc,) = find(docs, "InferenceService")
    assert isvc["spec"]["predictor"]["model"]["modelFormat"] == {"name": "lingbot-va"}
    c = effective_container(docs, "lingbot-va-reach-v3")  # the ServingRuntime's container with the model's fields
    assert c["command"] == ["lingbot", "serve"]
    args = c["args"]
    assert args[args.index("--model") + 1] == "models:/lingbot-va-reach-v3@champion"
    assert {p["containerPort"] for p in c["ports"]} == {8080, 8081}
    assert args[args.index("--http_port") + 1] == "8080" and args[args.index("--grpc_port") + 1] == "8081"
    env = {e["name"]: e for e in c["env"]}
    assert env["LINGBOT_SERVE_HOST"]["value"] == "0.0.0.0"
    assert env["LINGBOT_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lingbot-va-policy-token"
    assert env["LINGBOT_SERVE_TRACKING_URI"]["value"] == s.mlflow_uri
    assert "--poll-interval-s" not in args  # the infra's endpoint follows the alias as it moves (a hot swap)


def test_mlflow_server_uses_postgres_and_minio_from_the_secret(rendered):
    docs = rendered("kustomize-base")
    (mlflow,) = find(docs, "Deployment", "mlflow")
    c = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["mlflow", "server"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in c["args"]
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in c["args"]
    assert "--serve-artifacts" in c["args"]
    (secret_ref,) = [e["secretRef"]["name"] for e in c["envFrom"]]
    (secret,) = find(docs, "Secret", secret_ref)
    data = secret["stringData"]
    assert urlparse(data["MLFLOW_BACKEND_STORE_URI"]).scheme == "postgresql"
    assert urlparse(data["MLFLOW_BACKEND_STORE_URI"]).hostname in {s["metadata"]["name"] for s in find(docs, "Service")}
    assert data["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(data)
    assert {e["name"]: e.get("value") for e in c["env"]}["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # the bucket the artifacts go to is one the setup Job creates
    (job,) = find(docs, "Job", "minio-setup")
    buckets = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}["BUCKETS"]
    assert urlparse(data["MLFLOW_ARTIFACTS_DESTINATION"]).hostname in buckets.split()


def test_names_follow_the_pipelines_cluster_settings(rendered):
    """The workflows (pipelines/cluster) run as ClusterSettings.service_account, read ClusterSettings.s3_secret and
    reach MLflow / S3 at ClusterSettings.mlflow_uri / s3_endpoint: infra must provide exactly these."""
    from pipelines.cluster.settings import ClusterSettings

    s = ClusterSettings(_env_file=None)
    docs = rendered("kustomize-base")
    assert s.namespace == NAMESPACE
    assert find(docs, "ServiceAccount", s.service_account)
    (binding,) = find(docs, "RoleBinding", s.service_account)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": s.service_account, "namespace": NAMESPACE}]
    (secret,) = find(docs, "Secret", s.s3_secret)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    for uri in (s.mlflow_uri, s.s3_endpoint):
        host, port = urlparse(uri).hostname, urlparse(uri).port
        service_name, namespace = host.split(".")[:2]
        assert namespace == NAMESPACE, uri
        (service,) = find(docs, "Service", service_name)
        assert port in {p["port"] for p in service["spec"]["ports"]}, uri
    # MLflow 3 answers only Host headers it allows: the in-cluster name the pipelines use must be one of them
    (mlflow,) = find(docs, "Deployment", "mlflow")
    args = mlflow["spec"]["template"]["spec"]["containers"][0]["args"]
    (hosts,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--allowed-hosts=")]
    from fnmatch import fnmatch

    assert any(fnmatch(urlparse(s.mlflow_uri).netloc, h) for h in hosts)
    assert any(fnmatch("mlflow:5000", h) for h in hosts)


def test_feast_feature_store_matches_the_repo_and_is_valid():
    """The cluster feature_store.yaml keeps the repo's project and key serialisation, and Feast accepts it."""
    cluster = yaml.safe_load((REPO / "infra/kustomize/base/files/feature_store.yaml").read_text())
    local = yaml.safe_load((REPO / "infra/feast/feature_store.yaml").read_text())
    for key in ("project", "provider", "entity_key_serialization_version", "offline_store"):
        assert cluster[key] == local[key], key
    assert cluster["registry"]["registry_type"] == "sql" and cluster["online_store"]["type"] == "postgres"
