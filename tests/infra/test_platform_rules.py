"""The platform's rules over every rendered manifest set (kustomize base/dev/edge, chart default/edge/external):
least-privilege RBAC, bounded and non-root workloads, Secret templates, NetworkPolicies covering every workload
and admitting exactly the intended flows. Each check is also shown to catch a planted error."""

from __future__ import annotations

import pytest
from infra_checks import (
    ALL_SETS,
    CRDS,
    EDGE_ROBOT,
    connection_allowed,
    container,
    coverage_problems,
    flow_problems,
    mutated,
    rbac_problems,
    resolve,
    secret_problems,
    validatable,
    workload_problems,
    workloads,
)

from pipelines.cluster.validate import validate_documents


@pytest.mark.parametrize("name", ALL_SETS)
def test_rbac_is_namespaced_and_least_privilege(rendered, name):
    docs = rendered(name)
    assert not rbac_problems(docs), "\n".join(rbac_problems(docs))


@pytest.mark.parametrize("name", ALL_SETS)
def test_workloads_are_bounded_and_non_root(rendered, name):
    docs = rendered(name)
    assert list(workloads(docs))
    assert not workload_problems(docs), "\n".join(workload_problems(docs))


@pytest.mark.parametrize("name", ALL_SETS)
def test_secrets_are_placeholder_templates(rendered, name):
    docs = rendered(name)
    assert not secret_problems(docs), "\n".join(secret_problems(docs))


@pytest.mark.parametrize("name", ALL_SETS)
def test_network_policies_cover_every_workload(rendered, name):
    docs = rendered(name)
    assert not coverage_problems(docs), "\n".join(coverage_problems(docs))


@pytest.mark.parametrize("name", ALL_SETS)
def test_network_policies_admit_exactly_the_intended_flows(rendered, name):
    docs = rendered(name)
    assert resolve(docs, "policy") is not None
    assert not flow_problems(docs), "\n".join(flow_problems(docs))


@pytest.mark.parametrize(("name", "allowed"), [("kustomize-base", False), ("kustomize-edge", True),
                                               ("chart-default", False), ("chart-edge", True)])
def test_robots_on_the_edge_lan_reach_the_policy_endpoints_only_where_configured(rendered, name, allowed):
    docs = rendered(name)
    policy = resolve(docs, "policy")
    assert connection_allowed(docs, EDGE_ROBOT, policy, 8081) is allowed
    assert not connection_allowed(docs, EDGE_ROBOT, resolve(docs, "mlflow"), 5000)


@pytest.mark.parametrize("name", ALL_SETS)
def test_policy_server_env_names_are_serve_settings(rendered, name):
    """Every LINGBOT_SERVE_* variable given to the endpoints is a field of the policy server's settings."""
    from services.policy_server.settings import ServeSettings

    fields = {f"LINGBOT_SERVE_{f.upper()}" for f in ServeSettings.model_fields}
    docs = rendered(name)
    names = {e["name"] for w in workloads(docs) if "serving.kserve.io/inferenceservice" in w.labels
             for c in w.spec["containers"] for e in c.get("env") or []}
    assert {n for n in names if n.startswith("LINGBOT_SERVE_")} - fields == set()
    assert {"LINGBOT_SERVE_HOST", "LINGBOT_SERVE_TOKEN", "LINGBOT_SERVE_TRACKING_URI"} <= names


# ---------------------------------------------------------------------------------------------- planted errors


def _rule(doc, **rule):
    doc["rules"].append(rule)


def _unset(path):
    def change(doc):
        *parents, last = path
        node = doc
        for key in parents:
            node = node[key]
        del node[last]
    return change


def _container_change(update):
    return lambda doc: update(container(doc))


def _remove_egress_to(target):
    def change(doc):
        doc["spec"]["egress"] = [r for r in doc["spec"]["egress"]
                                 if not any((p.get("podSelector") or {}).get("matchLabels", {}).get(
                                     "app.kubernetes.io/name") == target for p in r.get("to") or [])]
    return change


def _add_doc(doc):
    return lambda docs: [*docs, doc]


CLUSTER_ROLE = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}
ROLE = ("Role", "lingbot-va-pipeline")
BINDING = ("RoleBinding", "lingbot-va-pipeline")
ISVC = ("InferenceService", "lingbot-va-reach-v3")

PLANTED = [
    # (set, (kind, name) to change or a function over the documents, change, check, expected problem)
    pytest.param("kustomize-base", ROLE, lambda d: d["rules"][0].update(verbs=["*"]), rbac_problems,
                 "verbs has a wildcard", id="rbac-wildcard-verb"),
    pytest.param("kustomize-base", ROLE, lambda d: _rule(d, apiGroups=[""], resources=["*"], verbs=["get"]),
                 rbac_problems, "resources has a wildcard", id="rbac-wildcard-resource"),
    pytest.param("chart-default", ROLE, lambda d: _rule(d, apiGroups=["*"], resources=["pods"], verbs=["get"]),
                 rbac_problems, "apiGroups has a wildcard", id="rbac-wildcard-group-in-chart"),
    pytest.param("kustomize-base", ROLE, lambda d: _rule(d, apiGroups=[""], resources=["secrets"], verbs=["get"]),
                 rbac_problems, "grants 'secrets'", id="rbac-reads-secrets"),
    pytest.param("kustomize-base", ROLE, lambda d: _rule(d, apiGroups=[""], resources=["pods/exec"], verbs=["create"]),
                 rbac_problems, "grants 'pods/exec'", id="rbac-pod-exec"),
    pytest.param("kustomize-base", ROLE, lambda d: d["rules"][5]["verbs"].append("delete"), rbac_problems,
                 "grants ['delete'] on 'pods'", id="rbac-extra-verb"),
    pytest.param("kustomize-base", None, _add_doc(CLUSTER_ROLE), rbac_problems, "cluster-wide RBAC",
                 id="rbac-cluster-role"),
    pytest.param("kustomize-base", BINDING, lambda d: d["roleRef"].update(kind="ClusterRole", name="admin"),
                 rbac_problems, "binds a ClusterRole", id="rbac-binds-cluster-role"),
    pytest.param("kustomize-base", BINDING,
                 lambda d: d["subjects"].append({"kind": "Group", "name": "system:authenticated",
                                                 "apiGroup": "rbac.authorization.k8s.io"}),
                 rbac_problems, "only ServiceAccounts", id="rbac-group-subject"),
    pytest.param("kustomize-base", ("Deployment", "mlflow"), _container_change(lambda c: c["resources"].pop("limits")),
                 workload_problems, "resources.limits lacks cpu, memory", id="deployment-without-limits"),
    pytest.param("chart-default", ("StatefulSet", "lingbot-va-postgres"),
                 _container_change(lambda c: c["resources"]["requests"].pop("memory")), workload_problems,
                 "resources.requests lacks memory", id="statefulset-without-memory-request"),
    pytest.param("kustomize-base", ISVC, _container_change(lambda c: c["resources"].pop("requests")),
                 workload_problems, "resources.requests lacks cpu, memory", id="endpoint-without-requests"),
    pytest.param("kustomize-base", ("StatefulSet", "minio"),
                 _container_change(lambda c: c["securityContext"].update(runAsUser=0)), workload_problems,
                 "runs as uid 0", id="container-as-root"),
    pytest.param("kustomize-base", ("Deployment", "feast"),
                 lambda d: d["spec"]["template"]["spec"]["securityContext"].update(runAsNonRoot=False),
                 workload_problems, "runAsNonRoot is not true", id="pod-may-run-as-root"),
    pytest.param("chart-edge", ("ServingRuntime", "lingbot-va"),
                 _container_change(lambda c: c["securityContext"].update(allowPrivilegeEscalation=True)),
                 workload_problems, "InferenceService/lingbot-va-push-v3 predictor container kserve-container: "
                 "allowPrivilegeEscalation is not false", id="endpoint-runtime-privilege-escalation"),
    pytest.param("kustomize-base", ("Job", "minio-setup"),
                 _container_change(lambda c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"])),
                 workload_problems, "adds capabilities", id="job-adds-capabilities"),
    pytest.param("kustomize-base", ("Secret", "postgres-auth"),
                 lambda d: d["stringData"].update(POSTGRES_PASSWORD="s3cr3t-Pa55"), secret_problems,
                 "POSTGRES_PASSWORD is not the placeholder", id="real-password-in-secret"),
    pytest.param("kustomize-base", ("Secret", "mlflow-store"),
                 lambda d: d["stringData"].update(MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:pw@postgres/mlflow"),
                 secret_problems, "MLFLOW_BACKEND_STORE_URI is not the placeholder", id="real-password-in-uri"),
    pytest.param("kustomize-base", ("Secret", "lingbot-va-s3"),
                 lambda d: d.update(data={"AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}), secret_problems, "uses data",
                 id="base64-secret-data"),
    pytest.param("kustomize-base", ISVC,
                 _container_change(lambda c: c["env"].append({"name": "LINGBOT_SERVE_TOKEN", "value": "abc"})),
                 secret_problems, "LINGBOT_SERVE_TOKEN is a literal value", id="literal-token-env"),
    pytest.param("chart-default", ISVC, lambda d: d["spec"]["predictor"]["model"].update(
                 storageUri="https://user:pw@mlflow.example/model-versions/get-artifact"),
                 secret_problems, "model.storageUri carries credentials", id="credentials-in-storage-uri"),
    pytest.param("kustomize-base", lambda docs: [d for d in docs if d["metadata"]["name"] != "mlflow"
                                                 or d["kind"] != "NetworkPolicy"], None, coverage_problems,
                 "Deployment/mlflow: no NetworkPolicy of its own for Ingress", id="workload-without-network-policy"),
    pytest.param("chart-default", lambda docs: [d for d in docs if not d["metadata"]["name"].endswith("default-deny")],
                 None, coverage_problems, "no default-deny", id="no-default-deny"),
    pytest.param("kustomize-base", ("NetworkPolicy", "minio"),
                 lambda d: d["spec"]["ingress"][0]["ports"].__setitem__(0, {"protocol": "TCP", "port": 9001}),
                 coverage_problems, "Service/minio port 9000: no NetworkPolicy admits", id="service-port-closed"),
    pytest.param("kustomize-base", ("NetworkPolicy", "postgres"), lambda d: d["spec"]["ingress"][0].pop("from"),
                 flow_problems, "robot pod -> postgres:5432 is allowed, should be denied", id="postgres-open-to-all"),
    pytest.param("kustomize-base", ("NetworkPolicy", "policy"), lambda d: d["spec"].update(egress=[{}]),
                 flow_problems, "policy -> internet:80 is allowed, should be denied", id="endpoint-egress-anywhere"),
    pytest.param("chart-default", ("NetworkPolicy", "lingbot-va-mlflow"), _remove_egress_to("postgres"),
                 flow_problems, "mlflow -> postgres:5432 is denied, should be allowed", id="mlflow-cut-off-postgres"),
    pytest.param("kustomize-base", ("Deployment", "mlflow"),
                 _container_change(lambda c: c.update(imagePullPolcy="Always")), validate_documents,
                 "imagePullPolcy", id="unknown-field-in-builtin-kind"),
    pytest.param("kustomize-base", ("Service", "mlflow"), lambda d: d["spec"]["ports"][0].update(port="5000x"),
                 validate_documents, "spec.ports[0].port", id="wrong-type-in-builtin-kind"),
    pytest.param("kustomize-base", ISVC, lambda d: d["spec"]["predictor"].update(minReplica=1), validate_documents,
                 "minReplica", id="unknown-field-in-inference-service"),
    pytest.param("kustomize-edge", ISVC, lambda d: d["spec"]["predictor"].pop("tolerations"), validate_documents,
                 "must tolerate the edge nodes", id="edge-endpoint-without-tolerations"),
    pytest.param("chart-edge", ISVC, lambda d: d["spec"]["canary"][0]["predictor"].pop("name"), validate_documents,
                 "canary[0].predictor.name", id="canary-without-name"),
]


@pytest.mark.parametrize(("name", "target", "change", "check", "expected"), PLANTED)
def test_checks_catch_planted_errors(rendered, name, target, change, check, expected):
    docs = rendered(name)
    if check is validate_documents:
        if target == ISVC and CRDS is None:
            pytest.skip("../shared/crds is absent: the InferenceService cannot be validated offline")
        docs = validatable(docs)
    assert not check(docs), f"{check.__name__} must pass on the unmodified {name}"
    if target is None:
        bad = change(docs)
    elif callable(target):
        bad = target(docs)
    else:
        bad = mutated(docs, *target, change)
    problems = check(bad)
    assert any(expected in p for p in problems), f"{expected!r} not in {problems}"
