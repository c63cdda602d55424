"""JSON-schema validation of Kubernetes manifests: built-in kinds against the OpenAPI schemas bundled with
``kubernetes-validate`` (strict: unknown fields rejected), custom resources against their CRD's ``openAPIV3Schema``
made strict the same way, with ``metadata`` checked as an ``ObjectMeta``."""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

from pipelines.settings import REPO_ROOT

KUBERNETES_VERSION = "1.30"
"""Kubernetes version whose OpenAPI schemas built-in kinds are checked against (bundled by kubernetes-validate)."""

DEFAULT_CRDS_DIR = REPO_ROOT.parent / "shared" / "crds"
"""Where the upstream CRDs (PyTorchJob, InferenceService, Workflow) are kept as data, beside the project root."""

BUNDLED_CRDS_DIR = Path(__file__).resolve().parent / "crds"
"""Upstream CRDs the shared folder lacks (KServe's ServingRuntime), read beside it; see its README for the source."""

_CRD_OBJECTMETA_REF = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_MESSAGE_LIMIT = 300  # jsonschema repeats whole sub-documents in messages; a line should stay readable


# ----------------------------------------------------------------------------------------------------------- loading
def load_documents(path: Path) -> list[dict]:
    """The non-empty YAML documents of a manifest file (``---`` separated)."""
    return [doc for doc in yaml.safe_load_all(Path(path).read_text()) if doc]


def find_crds_dir(crds_dir: Path | None = None) -> Path | None:
    """``crds_dir`` (or ``DEFAULT_CRDS_DIR``) if it exists, else None (callers skip custom-resource checks)."""
    path = Path(crds_dir) if crds_dir is not None else DEFAULT_CRDS_DIR
    return path if path.is_dir() else None


def load_crd_schemas(crds_dir: Path) -> dict[tuple[str, str], dict]:
    """``{(apiVersion, kind): strict JSON schema}`` for every served version of every CRD in ``crds_dir/*.yaml``.

    A WorkflowTemplate gets the Workflow schema when no CRD of its own is present (its ``spec`` is a WorkflowSpec).
    Raises ``ValueError`` when the folder is missing or holds no CRD.
    """
    return dict(_load_crd_schemas(str(Path(crds_dir).resolve())))


@functools.lru_cache(maxsize=4)
def _load_crd_schemas(crds_dir: str) -> dict[tuple[str, str], dict]:
    folder = Path(crds_dir)
    if not folder.is_dir():
        raise ValueError(f"CRD folder {folder} does not exist")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes; the C loader is 10x faster
    schemas: dict[tuple[str, str], dict] = {}
    files = sorted(folder.glob("*.yaml"))
    files += [f for f in sorted(BUNDLED_CRDS_DIR.glob("*.yaml")) if f.name not in {g.name for g in files}]
    for file in files:
        for doc in yaml.load_all(file.read_text(), Loader=loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = doc["spec"]["group"], doc["spec"]["names"]["kind"]
            for version in doc["spec"]["versions"]:
                if version.get("served", True) and "schema" in version:
                    schemas[(f"{group}/{version['name']}", kind)] = _strict_root(version["schema"]["openAPIV3Schema"])
    if not schemas:
        raise ValueError(f"no CustomResourceDefinition found in {folder}/*.yaml")
    workflow = schemas.get(("argoproj.io/v1alpha1", "Workflow"))
    if workflow is not None and ("argoproj.io/v1alpha1", "WorkflowTemplate") not in schemas:
        template = copy.deepcopy(workflow)
        template["properties"].pop("status", None)
        schemas[("argoproj.io/v1alpha1", "WorkflowTemplate")] = template
    return schemas


def _strict_root(schema: dict) -> dict:
    root = _strict(schema)
    # The API server validates every CR's metadata as ObjectMeta whatever the CRD says ({type: object} here).
    root.setdefault("properties", {})["metadata"] = {"$ref": _CRD_OBJECTMETA_REF}
    return root


def _strict(node: Any) -> Any:
    """A copy of an OpenAPI v3 structural schema that rejects unknown fields and accepts ``nullable`` nulls."""
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k not in ("properties", "items", "additionalProperties", "anyOf", "allOf",
                                                       "oneOf", "not")}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in node:
        out["properties"] = {key: _strict(value) for key, value in node["properties"].items()}
    for key in ("items", "not"):
        if key in node:
            out[key] = _strict(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            out[key] = [_strict(sub) for sub in node[key]]
    if "additionalProperties" in node:
        out["additionalProperties"] = _strict(node["additionalProperties"])
    elif (node.get("type") == "object" or "properties" in node) and not node.get("x-kubernetes-preserve-unknown-fields"):
        # What the API server would prune silently is a mistake in a rendered manifest: reject it.
        out["additionalProperties"] = False
    return out


# ----------------------------------------------------------------------------------------------------- validators
@functools.lru_cache(maxsize=1)
def _kubernetes_schema_dir() -> Any:
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    wanted = tuple(int(x) for x in KUBERNETES_VERSION.split("."))
    versions = sorted((tuple(int(x) for x in entry.name[1:].split("-")[0].split(".")[:2]), entry.name)
                      for entry in root.iterdir() if entry.name.endswith("-local-strict"))
    usable = [name for version, name in versions if version <= wanted]
    if not usable:
        raise ValueError(f"kubernetes-validate bundles no schemas for Kubernetes <= {KUBERNETES_VERSION}")
    return root / usable[-1]


@functools.lru_cache(maxsize=1)
def _kubernetes_registry() -> Registry:
    definitions = json.loads((_kubernetes_schema_dir() / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


@functools.lru_cache(maxsize=64)
def builtin_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    # kubernetes-validate's file naming: rbac.authorization.k8s.io/v1 -> rbac-v1, apps/v1 -> apps-v1, v1 -> v1
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    file = _kubernetes_schema_dir() / f"{kind.lower()}-{group_version}.json"
    if not file.is_file():
        return None
    schema = json.loads(file.read_text())
    return jsonschema.Draft202012Validator(schema, registry=_kubernetes_registry())


@functools.lru_cache(maxsize=16)
def crd_validator(crds_dir: str, api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    schema = _load_crd_schemas(crds_dir).get((api_version, kind))
    if schema is None:
        return None
    # OpenAPI v3.0 schemas are JSON Schema draft-4 flavoured; ObjectMeta comes from the Kubernetes definitions.
    return jsonschema.Draft4Validator(schema, registry=_kubernetes_registry())


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def shorten(message: str) -> str:
    return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 3] + "..."


def schema_problems(validator: jsonschema.protocols.Validator, doc: Mapping, where: str) -> list[str]:
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        problems.append(f"{where}: {_path(error.absolute_path)}: {shorten(error.message)}")
    return problems
