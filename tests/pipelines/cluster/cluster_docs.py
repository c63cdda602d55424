"""Helpers of the cluster-pipeline tests: default settings (no env, no .env), rendered documents, lookups."""

import os

import pytest
import yaml

from pipelines.cluster.validate import find_crds_dir

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


def render_documents(settings=None):
    """``{path: [documents]}`` of a fresh render (default settings unless given)."""
    from pipelines.cluster.render import render

    return {path: parse(text) for path, text in render(settings or default_settings()).items()}


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
    from pipelines.cluster.validate import embedded_manifests

    wt = find(docs, "WorkflowTemplate")
    hits = [m for t, _, m in embedded_manifests(wt, docs) if t == template_name]
    assert len(hits) == 1 and isinstance(hits[0], dict), hits
    return hits[0]
