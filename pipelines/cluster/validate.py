"""Offline validation of Kubernetes manifests: every problem the API server and the admission webhooks would reject,
each reported as ``Kind/name: field.path: cause`` (``schemas``, ``admission``, ``argo_lint`` hold the checks).

    problems = validate_documents(load_documents(Path("pipelines/posttrain.yaml")))
    assert not problems, "\\n".join(problems)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipelines.cluster.admission import admission_problems, doc_name
from pipelines.cluster.argo_lint import embedded_manifests
from pipelines.cluster.schemas import (
    DEFAULT_CRDS_DIR,
    KUBERNETES_VERSION,
    builtin_validator,
    crd_validator,
    find_crds_dir,
    schema_problems,
)


def validate_documents(docs: list[dict], *, crds_dir: Path | None = None) -> list[str]:
    """Every problem found in ``docs`` (schema, unknown fields, admission rules); an empty list means valid.

    ``crds_dir`` defaults to ``DEFAULT_CRDS_DIR``; a custom resource whose CRD is not there is reported as a problem
    (use ``find_crds_dir`` to skip where the folder is absent). Each problem reads ``Kind/name: field.path: cause``.
    """
    folder = find_crds_dir(crds_dir)
    missing = None if folder is not None else Path(crds_dir) if crds_dir is not None else DEFAULT_CRDS_DIR
    problems: list[str] = []
    for index, doc in enumerate(docs):
        if not isinstance(doc, Mapping):
            problems.append(f"document {index}: not a mapping but {type(doc).__name__}")
            continue
        problems += _validate_one(doc, folder, docs, prefix="", missing=missing)
    return problems


def _validate_one(doc: Mapping, crds_dir: Path | None, docs: list[dict], prefix: str,
                  missing: Path | None = None) -> list[str]:
    where = prefix + doc_name(doc)
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return [f"{where}: apiVersion and kind are required strings"]
    validator = builtin_validator(api_version, kind)
    if validator is None and crds_dir is not None:
        validator = crd_validator(str(crds_dir.resolve()), api_version, kind)
    if validator is None:
        known = f"Kubernetes {KUBERNETES_VERSION} built-ins" + (f" and the CRDs in {crds_dir}" if crds_dir else
                                                                  f" (no CRD folder at {missing})")
        return [f"{where}: no schema for {kind} {api_version} among {known}"]
    problems = schema_problems(validator, doc, where)
    problems += [prefix + p for p in admission_problems(doc, context=docs)]
    if kind in ("Workflow", "WorkflowTemplate") and api_version.startswith("argoproj.io/"):
        for template_name, manifest_index, embedded in embedded_manifests(doc, docs):
            inner = f"{where}: templates[{template_name}].resource.manifest[{manifest_index}]: "
            if isinstance(embedded, str):  # a parse error
                problems.append(inner + embedded)
            else:
                problems += _validate_one(embedded, crds_dir, docs, prefix=inner, missing=missing)
    return problems
