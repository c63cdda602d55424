"""Helpers of the cluster-pipeline tests: default settings (no env, no .env), rendered documents, lookups."""

import contextlib
import copy
import functools
import importlib.util
import os
import re
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import yaml

from pipelines.cluster.schemas import find_crds_dir

CRDS = find_crds_dir()
needs_crds = pytest.mark.skipif(
    CRDS is None, reason="../shared/crds (the upstream PyTorchJob/InferenceService/Workflow CRDs) is absent: "
                         "custom resources cannot be validated offline")


def default_settings(**overrides):
    """ClusterSettings from the code's defaults only: a developer's LINGBOT_CLUSTER_* env or .env must not leak in."""
    from pipelines.cluster.settings import ClusterSettings

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("LINGBOT_CLUSTER_")}
    try:
        return ClusterSettings(_env_file=None, **overrides)
    finally:
        os.environ.update(saved)


def parse(text):
    return [d for d in yaml.safe_load_all(text) if d]


PIPELINES = ("pipelines/posttrain.yaml", "pipelines/pretrain.yaml")
"""The rendered pipeline files (``lingbot render`` also renders the kustomize base's policy.yaml)."""


def render_documents(settings=None):
    """``{path: [documents]}`` of the pipeline files of a fresh render (default settings unless given)."""
    from pipelines.cluster.render import render

    rendered = render(settings or default_settings())
    return {path: parse(rendered[path]) for path in PIPELINES}


def find(docs, kind, name=None):
    """The one document of ``kind`` (and ``name``) among ``docs``."""
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def template(doc, name):
    """A named template of a Workflow / WorkflowTemplate."""
    hits = [t for t in doc["spec"]["templates"] if t["name"] == name]
    assert len(hits) == 1, f"expected one template {name!r}"
    return hits[0]


def embedded(docs, template_name):
    """The manifest of a resource template, placeholders filled in (as validate sees it)."""
    from pipelines.cluster.argo_lint import embedded_manifests

    wt = find(docs, "WorkflowTemplate")
    hits = [m for t, _, m in embedded_manifests(wt, docs) if t == template_name]
    assert len(hits) == 1 and isinstance(hits[0], dict), hits
    return hits[0]


# ------------------------------------------------------------------------------------------- the pods they create
_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]+?)\s*\}\}")


def _fill(node, values):
    """``node`` with ``{{name}}`` placeholders replaced from ``values`` (any other by the word ``sample``)."""
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), "sample"), node)
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    return node


def pods(docs):
    """Every pod the pipeline documents make, as a ``Pod`` carrying the labels its controller sets (Argo, the training
    operator), or the ``InferenceService`` itself (``infra_checks.workloads`` expands its predictors): what the
    infra's rule checks (tests/infra/infra_checks.py) take. Placeholders are filled with the parameters' defaults."""
    from pipelines.cluster.argo_lint import embedded_manifests, template_inputs

    out = []
    for wt in [d for d in docs if d["kind"] == "WorkflowTemplate"]:
        spec, name = wt["spec"], wt["metadata"]["name"]
        params = {f"workflow.parameters.{p['name']}": str(p.get("value", ""))
                  for p in (spec.get("arguments") or {}).get("parameters") or []}
        called = template_inputs(wt, docs)  # what each template's first call passes (a fan-out: its first item)
        for t in spec["templates"]:
            if "container" not in t:
                continue
            values = {**params, **{f"inputs.parameters.{k}": v for k, v in called.get(t["name"], {}).items()}}
            pod_spec = {"serviceAccountName": t.get("serviceAccountName", spec.get("serviceAccountName")),
                        "securityContext": t.get("securityContext", spec.get("securityContext")),
                        "volumes": [*(spec.get("volumes") or []), *(t.get("volumes") or [])],
                        "containers": [{"name": "main", **t["container"]}]}
            labels = {**((t.get("metadata") or {}).get("labels") or {}), "workflows.argoproj.io/workflow": "sample"}
            out.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}.{t['name']}", "labels": labels},
                        "spec": _fill(pod_spec, values)})
        for _, _, manifest in embedded_manifests(wt, docs):
            if manifest["kind"] == "PyTorchJob":
                meta = manifest["metadata"]
                job = meta.get("name") or f"{meta['generateName']}sample"  # the API server completes a generateName
                for rtype, replica in manifest["spec"]["pytorchReplicaSpecs"].items():
                    template = replica["template"]
                    labels = {**((template.get("metadata") or {}).get("labels") or {}),
                              "training.kubeflow.org/job-name": job, "training.kubeflow.org/replica-type": rtype.lower()}
                    out.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{job}-{rtype.lower()}",
                                                                              "labels": labels},
                                "spec": template["spec"]})
            else:
                out.append(manifest)
    # the runtimes the InferenceServices' predictor.model resolve to (infra_checks.workloads merges them)
    out += [d for d in docs if d["kind"] in ("ServingRuntime", "ClusterServingRuntime")]
    return out


def pod_specs(doc, context=()):
    """``(where, pod spec)`` of a ``Pod`` from ``pods`` or of each predictor of an ``InferenceService`` (a
    ``predictor.model`` merged with its ServingRuntime among ``context``, as KServe makes the pods)."""
    from pipelines.cluster.admission import effective_predictors

    where = f"{doc['kind']}/{doc['metadata']['name']}"
    if doc["kind"] in ("ServingRuntime", "ClusterServingRuntime"):
        return []  # no pod of its own: it shapes the InferenceServices' pods
    if doc["kind"] != "InferenceService":
        return [(where, doc["spec"])]
    return [(f"{where} {part}", spec) for part, spec in effective_predictors(doc, list(context))]


IMAGE_ENTRYPOINT = ["lingbot"]
"""ENTRYPOINT of both images (test_cluster_images checks it): what a container without ``command`` runs."""


def serve_settings(namespace, container):
    """``ServeSettings`` as `lingbot serve` builds them in ``container``: the parsed flags (``namespace``) over the
    container's env (a value from a Secret stands in as ``from-secret``), nothing from this machine's environment or
    ``.env``."""
    from pipelines.settings import settings_from_flags
    from services.policy_server.settings import ServeSettings

    env = {e["name"]: e.get("value", "from-secret") for e in container.get("env") or []
           if "value" in e or "secretKeyRef" in (e.get("valueFrom") or {})}
    with tempfile.TemporaryDirectory() as empty, contextlib.chdir(empty), mock.patch.dict(os.environ, env, clear=True):
        return settings_from_flags(ServeSettings, namespace)


# ----------------------------------------------------------------------------------------------- the platform's infra
def infra_checks():
    """tests/infra/infra_checks.py: the platform's rule checks and its manifest sets, shared with tests/infra."""
    if "infra_checks" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "infra" / "infra_checks.py"
        spec = importlib.util.spec_from_file_location("infra_checks", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["infra_checks"] = module
        spec.loader.exec_module(module)
    return sys.modules["infra_checks"]


@functools.cache
def _infra(name):
    return infra_checks().render(name)


def infra_documents(name):
    """A fresh copy of one of ``infra_checks.ALL_SETS`` (kustomize-base, chart-default, ...), built once."""
    return copy.deepcopy(_infra(name))
