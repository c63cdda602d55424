"""The rendered pipelines against the platform's infra (infra/kustomize, charts/lingbot-platform), which is
installed first and owns what the pipelines share with it:

* ownership: the pipeline files contain no ServiceAccount, ConfigMap, Secret or RBAC object; every one they reference
  is defined by the infra (and a Secret key they read exists), and the pipelines' service account is bound to a Role
  granting what their steps do. Should one come back, it must equal the infra's object of the same name;
* the infra's own rules (tests/infra/infra_checks.py) hold for every pod the pipelines make: bounded and restricted
  containers, credentials only from Secrets, least-privilege RBAC, a NetworkPolicy of its own, the intended flows;
* the endpoint the deploy step applies is the infra's policy endpoint of the same name (ports, security contexts,
  resources, token, volumes, effective `lingbot serve` settings), except for the rollout: a canary and no alias
  polling.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from cluster_docs import (
    default_settings,
    embedded,
    find,
    infra_checks,
    infra_documents,
    pod_specs,
    pods,
    render_documents,
    serve_settings,
    template,
)

from pipelines.cli import build_parser
from pipelines.cluster.argo_lint import embedded_manifests

SHARED_KINDS = ("ServiceAccount", "ConfigMap", "Secret", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
"""Kinds the platform's infra owns: the pipeline files only reference them."""

ARGO_EXECUTOR = {("argoproj.io", "workflowtaskresults"): {"create", "patch"}, ("", "pods"): {"get", "watch"},
                 ("", "pods/log"): {"get"}}
"""What Argo's executor does as the workflow's service account: report outputs (>= 3.4), follow its pod and logs."""
RESOURCE_ACTION_VERBS = {"create": {"create"}, "apply": {"get", "create", "patch"}, "delete": {"delete"},
                         "patch": {"patch"}, "replace": {"update"}, "get": {"get"}}
"""Verbs of a resource template's action (``kubectl <action>``); waiting on a success condition adds ``get``."""

CHART_RELEASE = "lingbot-va"
REPO = Path(__file__).resolve().parents[3]


def chart_settings():
    """The settings the chart's NOTES tell a user to render with for release lingbot-va in namespace lingbot."""
    return default_settings(mlflow_uri=f"http://{CHART_RELEASE}-mlflow:5000",
                            s3_endpoint=f"http://{CHART_RELEASE}-minio:9000", s3_secret=f"{CHART_RELEASE}-s3",
                            service_account=f"{CHART_RELEASE}-pipeline",
                            serve_service_account=f"{CHART_RELEASE}-policy",
                            serve_token_secret=f"{CHART_RELEASE}-policy-token", serving_runtime=CHART_RELEASE)


@functools.cache
def _rendered(infra):
    return render_documents(chart_settings() if infra.startswith("chart") else default_settings())


def pipeline_documents(infra="kustomize-base"):
    """Both pipeline files' documents, rendered with the settings that go with ``infra``, in one list."""
    return [d for docs in copy.deepcopy(_rendered(infra)).values() for d in docs]


def all_documents(docs):
    """``docs`` and the manifests inside their Argo resource templates (placeholders filled)."""
    out = list(docs)
    for doc in docs:
        if doc["kind"] in ("Workflow", "WorkflowTemplate"):
            out += [m for _, _, m in embedded_manifests(doc, docs) if isinstance(m, dict)]
    return out


# ----------------------------------------------------------------------------------------------------- ownership
def _content(doc):
    """What two objects of the same kind and name must agree on."""
    kind = doc["kind"]
    if kind in ("Role", "ClusterRole"):
        return sorted((g, r, v) for rule in doc.get("rules") or [] for g in rule.get("apiGroups") or []
                      for r in rule.get("resources") or [] for v in rule.get("verbs") or [])
    if kind in ("RoleBinding", "ClusterRoleBinding"):
        return doc.get("roleRef"), sorted((s["kind"], s["name"], s.get("namespace")) for s in doc.get("subjects") or [])
    if kind == "ServiceAccount":
        return doc.get("automountServiceAccountToken"), doc.get("imagePullSecrets")
    if kind == "ConfigMap":
        return doc.get("data") or {}, doc.get("binaryData") or {}
    return doc.get("type", "Opaque"), sorted({*(doc.get("stringData") or {}), *(doc.get("data") or {})})  # Secret


def _walk(node, path=""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def _name(doc):
    """``metadata.name``, or the ``generateName`` prefix the API server completes (a post-training job)."""
    return doc["metadata"].get("name") or f"{doc['metadata']['generateName']}*"


def references(doc):
    """``(kind, name, key or None, where)`` of every ServiceAccount, Secret, ConfigMap and Role ``doc`` uses."""
    where = f"{doc['kind']}/{_name(doc)}"
    for path, node in _walk(doc):
        at = f"{where} {path}"
        if isinstance(node.get("serviceAccountName"), str):
            yield "ServiceAccount", node["serviceAccountName"], None, at
        for field, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
            if isinstance(node.get(field), dict):
                yield kind, node[field]["name"], None, at
        for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
            if isinstance(node.get(field), dict):
                yield kind, node[field]["name"], node[field]["key"], at
        if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
            yield "Secret", node["secret"]["secretName"], None, at
        if isinstance(node.get("configMap"), dict) and "name" in node["configMap"]:
            yield "ConfigMap", node["configMap"]["name"], None, at
    if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
        yield doc["roleRef"]["kind"], doc["roleRef"]["name"], None, where


def ownership_problems(pipeline_docs, infra_docs):
    """Same kind and name -> same content; referenced -> defined by the infra (a Secret's key included)."""
    problems, owned = [], {(d["kind"], d["metadata"]["name"]): d for d in infra_docs}
    docs = all_documents(pipeline_docs)
    for doc in docs:
        key = (doc["kind"], _name(doc))
        if doc["kind"] in SHARED_KINDS and key in owned and _content(doc) != _content(owned[key]):
            problems.append(f"{key[0]}/{key[1]}: the infra's object of this name differs ({_content(owned[key])} "
                            f"there, {_content(doc)} here): whichever is applied last wins")
    for doc in docs:
        for kind, name, data_key, where in references(doc):
            target = owned.get((kind, name))
            if target is None:
                problems.append(f"{where}: {kind}/{name} is not defined by the infra")
            elif data_key is not None and data_key not in {*(target.get("stringData") or {}),
                                                           *(target.get("data") or {})}:
                problems.append(f"{where}: {kind}/{name} has no key {data_key!r}")
    return problems


def needed_permissions(pipeline_docs):
    """``{service account: {(apiGroup, resource, verb)}}`` that the workflows' steps need."""
    needs = {}
    for wt in [d for d in pipeline_docs if d["kind"] == "WorkflowTemplate"]:
        wanted = needs.setdefault(wt["spec"]["serviceAccountName"], set())
        wanted |= {(g, r, v) for (g, r), verbs in ARGO_EXECUTOR.items() for v in verbs}
        resources = {t["name"]: t["resource"] for t in wt["spec"]["templates"] if "resource" in t}
        for name, _, manifest in embedded_manifests(wt, pipeline_docs):
            group = manifest["apiVersion"].rpartition("/")[0]
            action = resources[name]
            verbs = RESOURCE_ACTION_VERBS[action["action"]] | ({"get"} if action.get("successCondition") else set())
            wanted |= {(group, manifest["kind"].lower() + "s", v) for v in verbs}
    return needs


def permission_problems(pipeline_docs, infra_docs):
    """The workflows' service accounts are bound (RoleBinding in the namespace) to Roles granting what they do."""
    roles = {d["metadata"]["name"]: d for d in infra_docs if d["kind"] == "Role"}
    problems = []
    for account, wanted in needed_permissions(pipeline_docs).items():
        granted = set()
        for binding in [d for d in infra_docs if d["kind"] == "RoleBinding"]:
            if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in binding.get("subjects") or []):
                role = roles.get(binding["roleRef"]["name"])
                granted |= set(_content(role)) if role is not None and binding["roleRef"]["kind"] == "Role" else set()
        problems += [f"ServiceAccount/{account} may not {v} {r!r} of group {g!r} (no Role bound to it grants it)"
                     for g, r, v in sorted(wanted - granted)]
    return problems


INFRA_SETS = ["kustomize-base", "chart-default"]


@pytest.mark.parametrize("path", ["pipelines/posttrain.yaml", "pipelines/pretrain.yaml"])
def test_pipeline_files_contain_nothing_the_infra_owns(path):
    docs = all_documents(_rendered("kustomize-base")[path])
    assert [f"{d['kind']}/{_name(d)}" for d in docs if d["kind"] in SHARED_KINDS] == []


@pytest.mark.parametrize("infra", INFRA_SETS)
def test_everything_the_pipelines_use_is_the_infras(infra):
    docs, owned = pipeline_documents(infra), infra_documents(infra)
    used = {(kind, name, key) for d in all_documents(docs) for kind, name, key, _ in references(d)}
    prefix = "lingbot-va"
    assert used == {("ServiceAccount", f"{prefix}-pipeline", None), ("Secret", f"{prefix}-s3", None),
                    ("ServiceAccount", f"{prefix}-policy", None), ("Secret", f"{prefix}-policy-token", "token")}
    assert ownership_problems(docs, owned) == []
    assert permission_problems(docs, owned) == []


OLD_ROLE = {  # what pipelines/*.yaml used to carry: no pods get/watch, no pods/log
    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
    "metadata": {"name": "lingbot-va-pipeline", "namespace": "lingbot"},
    "rules": [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
              {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"],
               "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
              {"apiGroups": ["serving.kserve.io"], "resources": ["inferenceservices"],
               "verbs": ["get", "list", "watch", "create", "patch", "update"]}]}
OLD_CONFIGMAP = {  # and the endpoints' ConfigMap, whose name the chart's <release>-env takes for release lingbot-va
    "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "lingbot-va-env", "namespace": "lingbot"},
    "data": {"MLFLOW_TRACKING_URI": "http://mlflow.lingbot.svc.cluster.local:5000",
             "MLFLOW_S3_ENDPOINT_URL": "http://minio.lingbot.svc.cluster.local:9000",
             "AWS_ENDPOINT_URL": "http://minio.lingbot.svc.cluster.local:9000", "AWS_DEFAULT_REGION": "us-east-1"}}


def _isvc_env(change):
    """Apply ``change`` to the env of the deploy step's predictor (in the manifest text of the resource template)."""
    def mutate(docs, infra_docs):
        wt = find(docs, "WorkflowTemplate", "lingbot-va-posttrain")
        res = template(wt, "deploy")["resource"]
        isvc = yaml.safe_load(res["manifest"])
        change(isvc["spec"]["predictor"]["model"]["env"])
        res["manifest"] = yaml.safe_dump(isvc, sort_keys=False)
    return mutate


def _drop_rule(resource):
    def mutate(docs, infra_docs):
        role = next(d for d in infra_docs if d["kind"] == "Role" and d["metadata"]["name"] == "lingbot-va-pipeline")
        role["rules"] = [r for r in role["rules"] if resource not in r["resources"]]
    return mutate


def _drop_infra(kind, name):
    def mutate(docs, infra_docs):
        infra_docs[:] = [d for d in infra_docs if (d["kind"], d["metadata"]["name"]) != (kind, name)]
    return mutate


def _token_ref(**ref):
    return _isvc_env(lambda env: next(e for e in env if e["name"] == "LINGBOT_SERVE_TOKEN")["valueFrom"]
                     ["secretKeyRef"].update(ref))


PLANTED = [
    pytest.param("kustomize-base", lambda docs, _: docs.append(copy.deepcopy(OLD_ROLE)), ownership_problems,
                 "Role/lingbot-va-pipeline: the infra's object of this name differs", id="role-owned-twice"),
    pytest.param("chart-default", lambda docs, _: docs.append(copy.deepcopy(OLD_CONFIGMAP)), ownership_problems,
                 "ConfigMap/lingbot-va-env: the infra's object of this name differs", id="configmap-owned-twice"),
    pytest.param("kustomize-base", _token_ref(name="policy-token"), ownership_problems,
                 "Secret/policy-token is not defined by the infra", id="token-secret-undefined"),
    pytest.param("kustomize-base", _token_ref(key="TOKEN"), ownership_problems,
                 "Secret/lingbot-va-policy-token has no key 'TOKEN'", id="token-key-missing"),
    pytest.param("chart-default", _drop_infra("ServiceAccount", "lingbot-va-policy"), ownership_problems,
                 "ServiceAccount/lingbot-va-policy is not defined by the infra", id="policy-account-undefined"),
    pytest.param("kustomize-base", _drop_rule("pods/log"), permission_problems,
                 "may not get 'pods/log' of group ''", id="role-without-pods-log"),
    pytest.param("chart-default", _drop_rule("inferenceservices"), permission_problems,
                 "may not patch 'inferenceservices' of group 'serving.kserve.io'", id="role-cannot-deploy"),
    pytest.param("kustomize-base", _drop_infra("RoleBinding", "lingbot-va-pipeline"), permission_problems,
                 "may not create 'pytorchjobs' of group 'kubeflow.org'", id="account-unbound"),
]


@pytest.mark.parametrize("infra, mutate, check, expected", PLANTED)
def test_planted_ownership_error_is_caught(infra, mutate, check, expected):
    docs, owned = pipeline_documents(infra), infra_documents(infra)
    assert check(docs, owned) == []
    mutate(docs, owned)
    problems = check(docs, owned)
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem reported"


# ------------------------------------------------------------------------------------------- the infra's rules
EXPECTED_WORKLOADS = {"pipelines/posttrain.yaml": 7, "pipelines/pretrain.yaml": 6}
"""dvc-get + prepare + encode Master + train Master + gate + the endpoint's predictor and canary; dvc-get + prepare +
encode and train Master/Worker."""


def _rule_problems(docs):
    ic, made = infra_checks(), pods(docs)
    return ic.workload_problems(made) + ic.secret_problems(made) + ic.rbac_problems(all_documents(docs))


@pytest.mark.parametrize("path", sorted(EXPECTED_WORKLOADS))
def test_pipeline_pods_pass_the_infras_rules(path):
    docs = copy.deepcopy(_rendered("kustomize-base")[path])
    assert len(list(infra_checks().workloads(pods(docs)))) == EXPECTED_WORKLOADS[path]
    problems = _rule_problems(docs)
    assert not problems, "\n".join(problems)


def _with_pipeline_pods(docs, infra="kustomize-base"):
    """The infra's documents with the pipelines' pods in place of the infra's endpoint (the same InferenceService
    and ServingRuntime)."""
    return [d for d in infra_documents(infra) if d["kind"] not in ("InferenceService", "ServingRuntime")] + pods(docs)


def network_problems(docs):
    """The pipelines' pods under the infra's NetworkPolicies: each has policies of its own, the intended flows hold
    (the endpoint being the pipeline's), and robots reach every port the endpoint's containers declare."""
    ic = infra_checks()
    combined = _with_pipeline_pods(docs)
    problems = ic.coverage_problems(combined) + ic.flow_problems(combined)
    for workload in ic.workloads(pods(docs)):
        if "serving.kserve.io/inferenceservice" not in workload.labels:
            continue
        endpoint = ic.Endpoint(workload.where, workload.labels)
        for c in workload.spec["containers"]:
            for port in c.get("ports") or []:
                if not ic.connection_allowed(combined, ic.ROBOT, endpoint, port["containerPort"]):
                    problems.append(f"{workload.where}: robots cannot reach port {port['containerPort']} "
                                    f"({port.get('name')})")
    return problems


@pytest.mark.parametrize("path", sorted(EXPECTED_WORKLOADS))
def test_pipeline_pods_are_covered_by_the_infras_network_policies(path):
    docs = copy.deepcopy(_rendered("kustomize-base")[path])
    problems = network_problems(docs)
    assert not problems, "\n".join(problems)


def _gate(docs):
    return template(find(docs, "WorkflowTemplate"), "gate")["container"]


def _edit_manifest(name, old, new):
    def mutate(docs):
        res = template(find(docs, "WorkflowTemplate"), name)["resource"]
        assert old in res["manifest"], old
        res["manifest"] = res["manifest"].replace(old, new)
    return mutate


RULES = [
    pytest.param(lambda d: _gate(d)["securityContext"].pop("readOnlyRootFilesystem"), _rule_problems,
                 "Pod/lingbot-va-posttrain.gate container main: the root filesystem is writable", id="gate-writable-root"),
    pytest.param(lambda d: find(d, "WorkflowTemplate")["spec"]["securityContext"].pop("seccompProfile"),
                 _rule_problems, "Pod/lingbot-va-posttrain.dvc-get container main: seccompProfile is not RuntimeDefault",
                 id="argo-pods-without-seccomp"),
    pytest.param(lambda d: _gate(d)["resources"].pop("limits"), _rule_problems,
                 "gate container main: resources.limits lacks cpu, memory", id="gate-unbounded"),
    pytest.param(_edit_manifest("train", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"),
                 _rule_problems, "Pod/posttrain-reach-v3-sample-master container pytorch: the root filesystem is writable",
                 id="training-writable-root"),
    pytest.param(_edit_manifest("train", "limits:\n", "requests_:\n"), _rule_problems,
                 "Pod/posttrain-reach-v3-sample-master container pytorch: resources.limits lacks cpu, memory",
                 id="training-unbounded"),
    pytest.param(_edit_manifest("deploy", "runAsNonRoot: true", "runAsNonRoot: false"), _rule_problems,
                 "InferenceService/lingbot-va-reach-v3 predictor container kserve-container: runAsNonRoot is not true",
                 id="endpoint-may-run-as-root"),
    pytest.param(lambda d: _gate(d)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), _rule_problems,
                 "AWS_SECRET_ACCESS_KEY is a literal value", id="gate-literal-credential"),
    pytest.param(lambda d: d.append(copy.deepcopy({**OLD_ROLE, "rules": [{"apiGroups": [""], "resources": ["secrets"],
                                                                          "verbs": ["get"]}]})),
                 _rule_problems, "grants 'secrets'", id="pipeline-role-reads-secrets"),
    pytest.param(lambda d: find(d, "ServingRuntime")["spec"]["containers"][0]["ports"][1].update(containerPort=9000),
                 network_problems, "robots cannot reach port 9000 (h2c)", id="endpoint-port-closed-by-network-policy"),
]


@pytest.mark.parametrize("mutate, check, expected", RULES)
def test_planted_rule_violation_is_caught(mutate, check, expected):
    docs = copy.deepcopy(_rendered("kustomize-base")["pipelines/posttrain.yaml"])
    assert check(docs) == []
    mutate(docs)
    problems = check(docs)
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem reported"


# ------------------------------------------------------------------------------------ the endpoint it deploys
ROLLOUT_SETTINGS = {"poll_interval_s", "tracking_uri"}
"""Where the deploy step's endpoint differs from the infra's by design: it never polls the alias (the canary
restarts take the new champion instead), and it names MLflow by its cluster-wide DNS name."""


def _effective(container):
    parser = build_parser()
    argv = [*(container.get("command") or ["lingbot"]), *(container.get("args") or [])]
    assert argv[:2] == ["lingbot", "serve"], argv
    namespace = parser.parse_args(argv[1:])
    settings = serve_settings(namespace, container).model_dump(exclude=ROLLOUT_SETTINGS)
    return {**settings, "http_port": namespace.http_port, "grpc_port": namespace.grpc_port}


def endpoint_differences(pipeline_isvc, infra_isvc, pipeline_docs, infra_docs):
    """Where a predictor of the pipeline's InferenceService differs from the infra's endpoint of the same name, both
    as KServe runs them (a predictor.model merged with its ServingRuntime, from ``*_docs``): pod and container
    fields compared as written, except the command line and env, compared by their effect."""
    differences = []
    ours_meta, theirs_meta = pipeline_isvc["metadata"], infra_isvc["metadata"]
    for field in ("name", "labels", "annotations"):
        if ours_meta.get(field) != theirs_meta.get(field):
            differences.append(f"metadata.{field}: {ours_meta.get(field)} != {theirs_meta.get(field)}")
    theirs = pod_specs(infra_isvc, infra_docs)[0][1]
    for where, ours in pod_specs(pipeline_isvc, pipeline_docs)[:2]:
        # KServe rejects maxReplicas on a canary (validateCanarySpecs): it runs minReplicas pods
        fixed = {"maxReplicas"} if "canary" in where else set()
        for field in sorted({*ours, *theirs} - {"containers", "name", "annotations", "minReplicas", *fixed}):
            if ours.get(field) != theirs.get(field):
                differences.append(f"{where}.{field}: {ours.get(field)} != {theirs.get(field)}")
        (c,), (t,) = ours["containers"], theirs["containers"]
        for field in sorted({*c, *t} - {"command", "args", "env", "imagePullPolicy"}):
            if c.get(field) != t.get(field):
                differences.append(f"{where} container.{field}: {c.get(field)} != {t.get(field)}")
        ours_env, theirs_env = _effective(c), _effective(t)
        differences += [f"{where} `lingbot serve` {key}: {ours_env.get(key)} != {theirs_env.get(key)}"
                        for key in sorted({*ours_env, *theirs_env}) if ours_env.get(key) != theirs_env.get(key)]
        token = [e for e in c.get("env") or [] if e["name"] == "LINGBOT_SERVE_TOKEN"]
        if token != [e for e in t.get("env") or [] if e["name"] == "LINGBOT_SERVE_TOKEN"]:
            differences.append(f"{where}: the token comes from {token}, the infra's from another Secret or key")
    return differences


def _infra_endpoint():
    docs = infra_documents("kustomize-edge")
    return find(docs, "InferenceService"), docs


def test_deployed_endpoint_is_the_infras_endpoint_but_for_the_rollout():
    docs = copy.deepcopy(_rendered("kustomize-base")["pipelines/posttrain.yaml"])
    isvc, (infra, infra_docs) = embedded(docs, "deploy"), _infra_endpoint()
    assert isvc["metadata"]["name"] == infra["metadata"]["name"] == "lingbot-va-reach-v3"  # the same object
    assert endpoint_differences(isvc, infra, docs, infra_docs) == []
    (_, pod), *_ = pod_specs(isvc, docs)
    ports = {(p["name"], p["containerPort"]) for p in pod["containers"][0]["ports"]}
    assert ports == {("http1", 8080), ("h2c", 8081)}  # gRPC: the robots' primary protocol
    assert "canary" not in infra["spec"] and isvc["spec"]["canary"][0]["predictor"]["name"] == "canary"


def _runtime_spec(doc):
    """What two ServingRuntimes of the same name must agree on: the spec (the chart adds imagePullPolicy)."""
    spec = copy.deepcopy(doc["spec"])
    for c in spec.get("containers") or []:
        c.pop("imagePullPolicy", None)
    return spec


@pytest.mark.parametrize("infra", INFRA_SETS)
def test_serving_runtime_is_the_infras(infra):
    """posttrain.yaml carries the ServingRuntime its endpoints need (so the file is complete); the infra creates the
    same object, so applying one over the other changes nothing."""
    ours = find(pipeline_documents(infra), "ServingRuntime")
    theirs = find(infra_documents(infra), "ServingRuntime")
    assert ours["metadata"]["name"] == theirs["metadata"]["name"]
    assert _runtime_spec(ours) == _runtime_spec(theirs)


CHART_ENDPOINTS = [
    pytest.param("chart-default", {}, id="chart-default"),
    pytest.param("chart-external", {  # ci/external-services-values.yaml: CPU endpoints, no edge pinning
        "mlflow_uri": "https://mlflow.example.internal", "serve_gpus": 0, "edge_node_selector": {},
        "edge_tolerations": [], "serve_memory": "4Gi", "serve_memory_limit": "8Gi"}, id="chart-external"),
]


@pytest.mark.parametrize("infra, overrides", CHART_ENDPOINTS)
def test_the_charts_endpoints_are_the_typed_builders(infra, overrides):
    """One source of the endpoint: ``manifests.infra_endpoint`` (which also renders the kustomize base's). The chart
    templates it from its values; for the same settings every endpoint it renders is the builder's, pods as KServe
    makes them included, but for Helm's own labels."""
    from pipelines.cluster import manifests

    s = chart_settings().model_copy(update=overrides)
    docs = infra_documents(infra)
    runtime = manifests.to_dict(manifests.serving_runtime(s))
    assert _runtime_spec(find(docs, "ServingRuntime")) == _runtime_spec(runtime)
    endpoints = [d for d in docs if d["kind"] == "InferenceService"]
    assert endpoints
    for theirs in endpoints:
        task = theirs["metadata"]["labels"]["platform.lingbot-va.io/task"]
        ours = manifests.to_dict(manifests.infra_endpoint(s, task=task, mlflow_uri=s.mlflow_uri))
        assert ours["metadata"]["name"] == theirs["metadata"]["name"]
        assert ours["metadata"]["labels"].items() <= theirs["metadata"]["labels"].items()  # Helm adds its own
        assert ours["metadata"]["annotations"] == theirs["metadata"]["annotations"]
        (_, pod), = pod_specs(ours, [runtime])
        (_, chart_pod), = pod_specs(theirs, docs)
        chart_pod = {k: v for k, v in chart_pod.items() if k != "labels"}  # the chart's pod labels (task, variant)
        for c in chart_pod["containers"]:
            c.pop("imagePullPolicy", None)
        assert chart_pod == pod, task


def _model(isvc, runtime):
    return isvc["spec"]["predictor"]["model"]


def _runtime_container(isvc, runtime):
    return runtime["spec"]["containers"][0]


DRIFT = [
    pytest.param(_runtime_container, lambda c: c["ports"].pop(), "container.ports", id="no-grpc-port"),
    pytest.param(_model, lambda c: c["resources"].pop("limits"), "container.resources", id="no-limits"),
    pytest.param(_runtime_container, lambda c: c["securityContext"].pop("readOnlyRootFilesystem"),
                 "container.securityContext", id="writable-root"),
    pytest.param(_model, lambda c: c["env"].pop(), "`lingbot serve` token", id="no-token"),
    pytest.param(_model, lambda c: c["args"].extend(["--host", "127.0.0.1"]), "`lingbot serve` host",
                 id="loopback-host"),
    pytest.param(_model, lambda c: c["args"].extend(["--grpc_port", "9081"]), "`lingbot serve` grpc_port",
                 id="other-grpc-port"),
]


@pytest.mark.parametrize("target, change, expected", DRIFT)
def test_planted_endpoint_drift_is_caught(target, change, expected):
    docs = copy.deepcopy(_rendered("kustomize-base")["pipelines/posttrain.yaml"])
    isvc, runtime = copy.deepcopy(embedded(docs, "deploy")), find(docs, "ServingRuntime")
    infra, infra_docs = _infra_endpoint()
    assert endpoint_differences(isvc, infra, docs, infra_docs) == []
    change(target(isvc, runtime))
    differences = endpoint_differences(isvc, infra, docs, infra_docs)
    assert any(expected in d for d in differences), "\n".join(differences) or "no difference reported"


# ------------------------------------------------------------------------------------- one data bucket, one repo
def _dvc_remotes(pipeline_docs):
    """``s3://bucket/prefix`` of every ``dvc get`` the workflows run (its ``--remote-config url=...``)."""
    return {a.removeprefix("url=") for d in pipeline_docs if d["kind"] == "WorkflowTemplate"
            for t in d["spec"]["templates"] if "container" in t and t["container"].get("command") == ["dvc"]
            for a in t["container"]["args"] if a.startswith("url=")}


def _allows(policy, action, resource):
    return any(s["Effect"] == "Allow" and action in s["Action"] and any(fnmatch.fnmatchcase(resource, r)
                                                                        for r in s["Resource"])
               for s in policy["Statement"])


def data_bucket_problems(pipeline_docs, infra_docs):
    """The bucket the data steps read is one the infra's MinIO setup Job creates, and its policy (the platform
    user's: the S3 keys the pipeline pods get) lets them list and read it."""
    (job,) = [d for d in infra_docs if d["kind"] == "Job" and d["metadata"]["name"].endswith("minio-setup")]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    created = env["BUCKETS"].split()
    (setup,) = [d for d in infra_docs if d["kind"] == "ConfigMap" and "lingbot-rw.json" in (d.get("data") or {})]
    policy = json.loads(setup["data"]["lingbot-rw.json"])
    problems = []
    for url in sorted(_dvc_remotes(pipeline_docs)):
        bucket = urlparse(url).hostname
        if bucket not in created:
            problems.append(f"dvc remote {url}: bucket {bucket!r} is not created by the infra (it creates {created})")
        if not _allows(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}") or \
                not _allows(policy, "s3:GetObject", f"arn:aws:s3:::{bucket}/dvc/files/md5/00/0"):
            problems.append(f"dvc remote {url}: the platform's MinIO user may not list and read bucket {bucket!r}")
    return problems


@pytest.mark.parametrize("infra", INFRA_SETS)
def test_the_data_step_reads_a_bucket_the_infra_creates_and_grants(infra):
    docs = pipeline_documents(infra)
    s = chart_settings() if infra.startswith("chart") else default_settings()
    assert _dvc_remotes(docs) == {s.dvc_remote_url} and s.data_bucket == "lingbot-data"
    assert data_bucket_problems(docs, infra_documents(infra)) == []


@pytest.mark.parametrize("infra", INFRA_SETS)
def test_a_dvc_remote_outside_the_infras_buckets_is_caught(infra):
    s = (chart_settings if infra.startswith("chart") else default_settings)()
    docs = [d for docs in render_documents(s.model_copy(update={"dvc_remote_url": "s3://lingbot-va/dvc"})).values()
            for d in docs]
    problems = data_bucket_problems(docs, infra_documents(infra))
    assert any("bucket 'lingbot-va' is not created by the infra" in p for p in problems), problems
    assert any("may not list and read bucket 'lingbot-va'" in p for p in problems), problems


def test_one_git_repository_everywhere():
    """The repository DVC reads is the chart's home: one organisation, one URL (ClusterSettings.git_repo)."""
    s = default_settings()
    chart = yaml.safe_load((REPO / "charts" / "lingbot-platform" / "Chart.yaml").read_text())
    assert chart["home"] == s.git_repo.removesuffix(".git")
    dvc_args = {a for d in pipeline_documents() if d["kind"] == "WorkflowTemplate" for t in d["spec"]["templates"]
                if "container" in t and t["container"].get("command") == ["dvc"] for a in t["container"]["args"]}
    assert s.git_repo in dvc_args
    assert urlparse(s.git_repo).path.split("/")[1] == s.registry.rpartition("/")[2]  # ghcr.io/<the same org>
