"""Admission rules the OpenAPI schemas do not encode: the API server's name rules and the webhooks of the training
operator (PyTorchJob) and KServe (InferenceService, ServingRuntime); Workflows go to ``argo_lint``."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pipelines.cluster.argo_lint import workflow_problems

DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
"""KServe's per-InferenceService deployment-mode annotation (pkg/constants: ``DeploymentMode``)."""
STANDARD_MODE = "Standard"
"""KServe >= 0.15 name of plain Deployment + Service mode; ``RawDeployment`` is its deprecated alias."""
LEGACY_STANDARD_MODE = "RawDeployment"
KSERVE_CONTAINER = "kserve-container"
"""The predictor container KServe treats as a custom implementation (pkg/constants: ``InferenceServiceContainerName``)."""
STORAGE_URI_ENV = "STORAGE_URI"
"""A custom container's model location (pkg/constants: ``CustomSpecStorageUriEnvVarKey``); KServe's storage
initializer downloads it to /mnt/models before the container starts."""
STORAGE_URI_PREFIXES = ("gs://", "s3://", "pvc://", "file://", "https://", "http://", "hdfs://", "webhdfs://",
                        "oci://", "oci+native://", "oci+fetch://", "hf://")
"""Storage URI schemes KServe's controller accepts (controller/v1beta1/inferenceservice/utils:
``SupportedStorageURIPrefixList``)."""
_PREDICTOR_IMPLEMENTATIONS = ("xgboost", "pytorch", "triton", "sklearn", "tensorflow", "onnx", "pmml", "lightgbm",
                              "paddle", "huggingface", "model")
"""``PredictorSpec.GetImplementations`` order (its JSON names); ``containers`` come last."""

RUNTIME_KINDS = ("ServingRuntime", "ClusterServingRuntime")
"""KServe's runtimes (serving.kserve.io/v1alpha1): what a ``predictor.model`` is run by."""
PROTOCOL_VERSIONS = ("v1", "v2", "grpc-v1", "grpc-v2")
"""KServe's inference protocols (pkg/constants: ``InferenceServiceProtocol``)."""
DEFAULT_PROTOCOL = "v1"
"""What KServe assumes for a ``predictor.model`` without ``protocolVersion`` (``ModelSpec.GetProtocol``)."""
BLOCKED_ENV_VARS = ("PYTHONPATH",)
"""Env vars KServe's webhooks refuse in predictor and runtime containers (pkg/validation: ``DefaultBlockedEnvVars``)."""
_STORAGE_SCHEME = re.compile(r"\w+?://")  # ValidateStorageURI: a URI without a scheme is a local path

PLACEMENT_LABEL = "platform.lingbot-va.io/placement"
"""Label marking where a workload is meant to run; ``edge`` = the robots' edge GPU nodes."""
EDGE_PLACEMENT = "edge"

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def doc_name(doc: Mapping) -> str:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "<no name>")
    return f"{doc.get('kind', '<no kind>')}/{name}"


def admission_problems(doc: Mapping, *, context: list[dict] | None = None) -> list[str]:
    """What the API server's name rules and the webhooks would reject that the OpenAPI schemas let through.

    ``context`` is the other documents applied together (a Workflow's ``workflowTemplateRef`` / ``templateRef``
    resolve against the WorkflowTemplates among them; references to templates elsewhere are not checked).
    """
    where = doc_name(doc)
    problems = [f"{where}: {p}" for p in _metadata_problems(doc)]
    kind = doc.get("kind")
    if kind == "PyTorchJob":
        problems += [f"{where}: {p}" for p in _pytorchjob_problems(doc)]
    elif kind == "InferenceService":
        problems += [f"{where}: {p}" for p in _inferenceservice_problems(doc, context or [])]
    elif kind in RUNTIME_KINDS:
        problems += [f"{where}: {p}" for p in _runtime_problems(doc, context or [])]
    elif kind in ("Workflow", "WorkflowTemplate"):
        problems += [f"{where}: {p}" for p in workflow_problems(doc, context or [])]
    return problems


def _metadata_problems(doc: Mapping) -> Iterator[str]:
    meta = doc.get("metadata")
    if not isinstance(meta, Mapping):
        yield "metadata: required"
        return
    name, generate = meta.get("name"), meta.get("generateName")
    if not name and not generate:
        yield "metadata.name: required (or metadata.generateName)"
    if isinstance(name, str) and name and (len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name)):
        yield f"metadata.name: {name!r} is not a DNS-1123 subdomain (lower-case alphanumerics, '-', '.'; <= 253)"
    if isinstance(generate, str) and generate and not _DNS1123_SUBDOMAIN.match(generate.rstrip("-") or "x"):
        yield f"metadata.generateName: {generate!r} is not a DNS-1123 subdomain prefix"
    for key, value in (meta.get("labels") or {}).items():
        prefix, _, label = str(key).rpartition("/")
        if (prefix and not _DNS1123_SUBDOMAIN.match(prefix)) or len(label) > 63 or not _LABEL_NAME.match(label):
            yield f"metadata.labels: key {key!r} is not a valid label key"
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            yield f"metadata.labels.{key}: value {value!r} is not a valid label value (<= 63, alphanumerics, -_.)"


def _dns1035(name: Any) -> bool:
    return isinstance(name, str) and len(name) <= 63 and bool(_DNS1035_LABEL.match(name))


def _pytorchjob_problems(doc: Mapping) -> Iterator[str]:
    """kubeflow/training-operator v1.9 ``validatePyTorchJob``, plus: a Master is required (torchrun rendezvous)."""
    name, generate = (doc.get("metadata") or {}).get("name"), (doc.get("metadata") or {}).get("generateName")
    if name is not None and not _dns1035(name):
        yield f"metadata.name: {name!r} is not a DNS-1035 label (starts with a letter; a-z, 0-9, '-'; <= 63)"
    if name is None and isinstance(generate, str) and not _dns1035(generate + "x" * 5):
        yield (f"metadata.generateName: {generate!r} and the 5 characters the API server appends are not a DNS-1035 "
               "label (starts with a letter; a-z, 0-9, '-'; <= 63)")
    spec = doc.get("spec") if isinstance(doc.get("spec"), Mapping) else {}
    replicas = spec.get("pytorchReplicaSpecs") if isinstance(spec.get("pytorchReplicaSpecs"), Mapping) else {}
    if not replicas:
        yield "spec.pytorchReplicaSpecs: must define a Master (and optionally Workers)"
    if spec.get("elasticPolicy") is not None:
        if "Worker" not in replicas:
            yield "spec.pytorchReplicaSpecs.Worker: must be configured if an elastic policy is used"
        if (spec.get("elasticPolicy") or {}).get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            yield "spec.elasticPolicy.nProcPerNode: must not be used with spec.nprocPerNode"
    if replicas and "Master" not in replicas:
        yield "spec.pytorchReplicaSpecs.Master: required (exactly one Master: torchrun's rendezvous endpoint)"
    for rtype, rspec in replicas.items():
        path = f"spec.pytorchReplicaSpecs.{rtype}"
        if rtype not in ("Master", "Worker"):
            yield f"{path}: replica type must be Master or Worker"
        if not isinstance(rspec, Mapping):
            continue
        count = rspec.get("replicas")
        if rtype == "Master" and count != 1:
            yield f"{path}.replicas: must be 1 (got {count!r})"
        elif rtype != "Master" and count is not None and isinstance(count, int) and count < 1:
            yield f"{path}.replicas: must be at least 1 (got {count})"
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            yield f"{path}.template.spec.containers: must not be empty"
        elif not any(isinstance(c, Mapping) and c.get("name") == "pytorch" for c in containers):
            yield f"{path}.template.spec.containers: there is no container named 'pytorch' (the operator's default)"
        for i, container in enumerate(containers):
            if isinstance(container, Mapping) and not container.get("image"):
                yield f"{path}.template.spec.containers[{i}].image: required"


def _inferenceservice_problems(doc: Mapping, context: list[dict]) -> Iterator[str]:
    """KServe's validating webhook (name, predictor, canary), its controller (storage URI, the runtime of a
    ``predictor.model`` among ``context``) and the platform's edge rule (Standard mode on edge nodes)."""
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    name = meta.get("name")
    if name is not None and not _dns1035(name):
        yield f"metadata.name: {name!r} is not a DNS-1035 label (starts with a letter; a-z, 0-9, '-'; <= 63)"
    mode = (meta.get("annotations") or {}).get(DEPLOYMENT_MODE_ANNOTATION)
    spec = doc.get("spec") if isinstance(doc.get("spec"), Mapping) else {}
    predictor = spec.get("predictor") if isinstance(spec.get("predictor"), Mapping) else {}
    if (meta.get("labels") or {}).get(PLACEMENT_LABEL) == EDGE_PLACEMENT:
        if mode != STANDARD_MODE:
            hint = f" ({LEGACY_STANDARD_MODE!r} is its deprecated alias)" if mode == LEGACY_STANDARD_MODE else ""
            yield (f"metadata.annotations.{DEPLOYMENT_MODE_ANNOTATION}: an edge InferenceService must run in "
                   f"{STANDARD_MODE!r} mode (plain Deployment, no Knative on robots' nodes), got {mode!r}{hint}")
        if not predictor.get("nodeSelector"):
            yield "spec.predictor.nodeSelector: an edge InferenceService must select the edge GPU nodes"
        if not predictor.get("tolerations"):
            yield "spec.predictor.tolerations: an edge InferenceService must tolerate the edge nodes' taints"
    yield from _predictor_problems(predictor)
    canaries = spec.get("canary") or []
    if canaries:
        yield from _canary_problems(mode, predictor, canaries)
    for part, merged in _kserve_predictors(spec):
        uri = _storage_uri(merged)
        if isinstance(uri, str) and _STORAGE_SCHEME.search(uri) and not uri.startswith(STORAGE_URI_PREFIXES):
            yield f"{part}: storage URI {uri!r} has no supported prefix ({', '.join(STORAGE_URI_PREFIXES)})"
        if part != "spec.predictor" and len(_implementations(merged)) > 1:
            yield (f"{part}: merged over the stable predictor (KServe's buildCanaryPredictor) it has "
                   f"{_implementations(merged)}: a canary must use the stable predictor's kind of implementation")
        if isinstance(merged.get("model"), Mapping):
            yield from _runtime_of(doc, merged, part, context)[1]


def _implementations(predictor: Mapping) -> list[str]:
    """KServe ``PredictorSpec.GetImplementations``: the framework / ``model`` fields set, then the custom container
    (the one named ``kserve-container``, or the first container when nothing else is set)."""
    found = [key for key in _PREDICTOR_IMPLEMENTATIONS if isinstance(predictor.get(key), Mapping)]
    containers = [c for c in predictor.get("containers") or [] if isinstance(c, Mapping)]
    if containers:
        found += ["containers" for c in containers if c.get("name") == KSERVE_CONTAINER]
        if not found:
            found.append("containers")
    return found


def _storage_uri(predictor: Mapping) -> str | None:
    """KServe ``GetImplementation().GetStorageUri()``: the first implementation's ``storageUri``; for a custom
    container, the ``STORAGE_URI`` env var of ``kserve-container``."""
    found = _implementations(predictor)
    if not found:
        return None
    if found[0] != "containers":
        return predictor[found[0]].get("storageUri")
    for container in predictor.get("containers") or []:
        if isinstance(container, Mapping) and container.get("name") == KSERVE_CONTAINER:
            return next((e.get("value") for e in container.get("env") or []
                         if isinstance(e, Mapping) and e.get("name") == STORAGE_URI_ENV), None)
    return None


def _canary_problems(mode: Any, predictor: Mapping, canaries: Any) -> Iterator[str]:
    """KServe >= 0.20 ``validateCanarySpecs`` (pkg/apis/serving/v1beta1/inference_service_validation.go) and what
    it calls (``validateExactlyOneImplementation``, ``ComponentExtensionSpec.Validate``), plus the storage URI
    prefixes the controller accepts (``ValidateStorageURI``) and a platform rule (no Knative canary alongside)."""
    if mode not in (STANDARD_MODE, LEGACY_STANDARD_MODE):
        yield f"spec.canary: only supported in {STANDARD_MODE!r} mode (annotation {DEPLOYMENT_MODE_ANNOTATION})"
    if predictor.get("canaryTrafficPercent") is not None:
        yield "spec.predictor.canaryTrafficPercent: cannot be combined with spec.canary"
    if not isinstance(predictor.get("model"), Mapping) and not _storage_uri(predictor):
        yield ("spec.predictor: a canary requires a stable predictor with a model (predictor.model, or a storageUri; "
               f"a custom container: the {STORAGE_URI_ENV} env var of {KSERVE_CONTAINER!r})")
    stable_min = predictor.get("minReplicas") if isinstance(predictor.get("minReplicas"), int) else 1
    names, total = [predictor.get("name")], 0
    for i, canary in enumerate(canaries if isinstance(canaries, list) else []):
        if not isinstance(canary, Mapping):
            continue
        path = f"spec.canary[{i}].predictor"
        cpred = canary.get("predictor") if isinstance(canary.get("predictor"), Mapping) else {}
        cname = cpred.get("name")
        if not cname:
            yield f"{path}.name: required (it names the canary's Deployment)"
        elif cname in names:
            yield f"{path}.name: {cname!r} is not unique (among the canaries and the stable predictor)"
        names.append(cname)
        percent = canary.get("trafficPercent")
        if isinstance(percent, int):
            if not 0 <= percent <= 100:
                yield f"spec.canary[{i}].trafficPercent: must be between 0 and 100, got {percent}"
            total += percent
        found = _implementations(cpred)
        if len(found) != 1:
            yield (f"{path}: exactly one implementation (a framework, model, or the {KSERVE_CONTAINER!r} container) "
                   f"must be specified, got {found or 'none'}")
        if cpred.get("workerSpec") is not None:
            yield f"{path}.workerSpec: not allowed on a canary (multi-node is not supported for canaries)"
        max_replicas = cpred.get("maxReplicas")
        if isinstance(max_replicas, int) and max_replicas > 0:
            yield f"{path}.maxReplicas: not allowed on a canary (canaries use fixed replicas: minReplicas)"
        for field in ("autoScaling", "scaleMetric", "scaleMetricType", "scaleTarget"):
            if cpred.get(field) is not None:
                yield f"{path}.{field}: autoscaling fields are not allowed on a canary (fixed replicas)"
        cmin = cpred.get("minReplicas")
        if isinstance(cmin, int) and cmin < 0:
            yield f"{path}.minReplicas: must not be negative"
        if isinstance(max_replicas, int) and max_replicas < 0:
            yield f"{path}.maxReplicas: must not be negative"
        if isinstance(cmin, int) and cmin > stable_min:
            yield f"{path}.minReplicas: {cmin} exceeds the stable predictor's minReplicas ({stable_min})"
        concurrency = cpred.get("containerConcurrency")
        if isinstance(concurrency, int) and concurrency < 0:
            yield f"{path}.containerConcurrency: must not be negative"
    if total > 100:
        yield f"spec.canary: trafficPercent values sum to {total} > 100"


def _predictor_problems(predictor: Mapping) -> Iterator[str]:
    """KServe's webhook on the stable predictor: ``validateExactlyOneImplementation``, ``validatePredictor`` (no
    ``name`` in a framework / model spec) and ``validateBlockedEnvVars``."""
    found = _implementations(predictor)
    if len(found) != 1:
        yield (f"spec.predictor: exactly one implementation (a framework, model, or the {KSERVE_CONTAINER!r} "
               f"container) must be specified, got {found or 'none'}")
    for key in _PREDICTOR_IMPLEMENTATIONS:
        if isinstance(predictor.get(key), Mapping) and predictor[key].get("name"):
            yield f"spec.predictor.{key}.name: not allowed in a standard predictor (KServe names the container)"
    containers = [*(predictor.get("containers") or []), *(predictor.get("initContainers") or [])]
    if isinstance(predictor.get("model"), Mapping):
        containers.append({**predictor["model"], "name": "predictor.model"})
    yield from (f"spec.predictor: {p}" for p in _blocked_env_problems(containers))


def _blocked_env_problems(containers: Iterable[Any]) -> Iterator[str]:
    for c in containers:
        for env in (c.get("env") or []) if isinstance(c, Mapping) else []:
            if isinstance(env, Mapping) and env.get("name") in BLOCKED_ENV_VARS:
                yield f"setting {env['name']} in container {c.get('name')!r} is not allowed (KServe blocks it)"


def _merge(base: Any, patch: Any) -> Any:
    """``mergo.Merge(base, patch, WithOverride)``: maps merged key by key, any non-empty value of ``patch`` wins."""
    if isinstance(base, Mapping) and isinstance(patch, Mapping):
        out = dict(base)
        for key, value in patch.items():
            if value not in (None, "", [], {}, 0, False):
                out[key] = _merge(base.get(key), value)
        return out
    return copy.deepcopy(patch)


def _kserve_predictors(spec: Mapping) -> list[tuple[str, dict]]:
    """``(path, predictor)`` of the Deployments KServe makes: the stable predictor, and each canary merged over it
    without its autoscaling fields (controller: ``buildCanaryPredictor``)."""
    stable = spec.get("predictor") if isinstance(spec.get("predictor"), Mapping) else {}
    out = [("spec.predictor", dict(stable))]
    for i, canary in enumerate(spec.get("canary") or []):
        cpred = canary.get("predictor") if isinstance(canary, Mapping) else None
        if isinstance(cpred, Mapping):
            merged = _merge(stable, cpred)
            for field in ("maxReplicas", "scaleTarget", "scaleMetric", "autoScaling"):
                merged.pop(field, None)
            out.append((f"spec.canary[{i}].predictor", merged))
    return out


def _supports(model: Mapping, runtime: Mapping, explicit: bool) -> bool:
    """``ModelSpec.RuntimeSupportsModel``: the model's format (and version, if given) among the runtime's supported
    formats; without an explicit ``runtime`` only the formats with ``autoSelect: true`` count."""
    fmt = model.get("modelFormat") if isinstance(model.get("modelFormat"), Mapping) else {}
    wanted = (fmt.get("name"), fmt.get("version"))
    offered = set()
    for f in (runtime.get("spec") or {}).get("supportedModelFormats") or []:
        if isinstance(f, Mapping) and (explicit or f.get("autoSelect") is True):
            offered |= {(f.get("name"), None), (f.get("name"), f.get("version"))}
    return wanted in offered


def _protocol_ok(runtime: Mapping, protocol: str | None) -> bool:
    """``ServingRuntimeSpec.IsProtocolVersionSupported``: any protocol when the runtime lists none."""
    listed = (runtime.get("spec") or {}).get("protocolVersions") or []
    return not protocol or not listed or protocol in listed


def _runtime_of(isvc: Mapping, predictor: Mapping, part: str, context: list[dict]) -> tuple[Mapping | None, list[str]]:
    """The runtime KServe's controller picks for ``predictor.model`` among the ``context`` documents
    (``Predictor.reconcileModel``: a named runtime, else ``ModelSpec.GetSupportingRuntimes``), and the problems."""
    model, path = predictor["model"], f"{part}.model"
    namespace = (isvc.get("metadata") or {}).get("namespace")
    runtimes = [d for d in context if isinstance(d, Mapping) and d.get("kind") in RUNTIME_KINDS
                and (d.get("kind") == "ClusterServingRuntime" or namespace is None
                     or (d.get("metadata") or {}).get("namespace") in (None, namespace))]
    runtimes.sort(key=lambda d: d.get("kind") == "ClusterServingRuntime")  # the namespace's runtimes come first
    spec_of = lambda d: d.get("spec") if isinstance(d.get("spec"), Mapping) else {}
    problems: list[str] = []
    fmt = (model.get("modelFormat") or {}) if isinstance(model.get("modelFormat"), Mapping) else {}
    if not fmt.get("name"):
        return None, [f"{path}.modelFormat.name: required"]
    if model.get("runtime"):
        named = [d for d in runtimes if (d.get("metadata") or {}).get("name") == model["runtime"]]
        if not named:
            return None, [f"{path}.runtime: no ServingRuntime or ClusterServingRuntime {model['runtime']!r} among "
                          "the objects applied with it"]
        runtime = named[0]
        if spec_of(runtime).get("disabled") is True:
            problems.append(f"{path}.runtime: {doc_name(runtime)} is disabled")
        if not _protocol_ok(runtime, model.get("protocolVersion")):
            problems.append(f"{path}.protocolVersion: {doc_name(runtime)} does not support {model['protocolVersion']!r}")
        if not _supports(model, runtime, explicit=True):
            problems.append(f"{path}.modelFormat: {doc_name(runtime)} does not support {fmt}")
    else:
        protocol = model.get("protocolVersion") or DEFAULT_PROTOCOL
        multinode = predictor.get("workerSpec") is not None
        candidates = [d for d in runtimes if spec_of(d).get("disabled") is not True
                      and spec_of(d).get("multiModel") is not True and _supports(model, d, explicit=False)
                      and _protocol_ok(d, protocol) and (spec_of(d).get("workerSpec") is not None) == multinode]
        if not candidates:
            hint = ""
            if any(_supports(model, d, explicit=False) for d in runtimes):
                hint = (f" (a runtime supports the format, but not protocol {protocol!r}"
                        f"{'; without protocolVersion KServe assumes v1' if not model.get('protocolVersion') else ''}"
                        " or not this multi-node setting)")
            return None, [f"{path}: no ServingRuntime or ClusterServingRuntime among the objects applied with it "
                          f"auto-selects model format {fmt}{hint}"]
        priority = lambda d: next((f.get("priority") or 0 for f in spec_of(d).get("supportedModelFormats") or []
                                   if isinstance(f, Mapping) and f.get("name") == fmt.get("name")), 0)
        runtime = sorted(candidates, key=lambda d: (d.get("kind") == "ClusterServingRuntime", -priority(d)))[0]
    containers = [c for c in spec_of(runtime).get("containers") or [] if isinstance(c, Mapping)]
    if not any(c.get("name") == KSERVE_CONTAINER for c in containers):
        problems.append(f"{path}: {doc_name(runtime)} has no container {KSERVE_CONTAINER!r} for the model "
                        "(KServe: failed to find kserve-container in ServingRuntime containers)")
    return runtime, problems


def _runtime_problems(doc: Mapping, context: list[dict]) -> Iterator[str]:
    """KServe's ServingRuntime / ClusterServingRuntime webhook (pkg/webhook/admission/servingruntime) and
    ``ServingRuntimeSpec.IsValid``: containers required, no blocked env, one priority per auto-selected format and
    no other runtime of the same scope auto-selecting a format with the same priority, at most one worker container."""
    spec = doc.get("spec") if isinstance(doc.get("spec"), Mapping) else {}
    if spec.get("disabled") is True:
        return
    containers = [c for c in spec.get("containers") or [] if isinstance(c, Mapping)]
    if not containers:
        yield "spec.containers: required (at least one container)"
    elif spec.get("multiModel") is not True and not any(c.get("name") == KSERVE_CONTAINER for c in containers):
        yield f"spec.containers: no container named {KSERVE_CONTAINER!r} (what KServe runs a predictor.model in)"
    worker = spec.get("workerSpec") if isinstance(spec.get("workerSpec"), Mapping) else None
    yield from (f"spec: {p}" for p in _blocked_env_problems([*containers, *((worker or {}).get("containers") or [])]))
    for i, protocol in enumerate(spec.get("protocolVersions") or []):
        if protocol not in PROTOCOL_VERSIONS:
            yield f"spec.protocolVersions[{i}]: {protocol!r} is not one of KServe's protocols {PROTOCOL_VERSIONS}"
    if worker is not None:
        if len(worker.get("containers") or []) > 1:
            yield "spec.workerSpec.containers: setting multiple containers in workerSpec is not allowed"
        for field in ("pipelineParallelSize", "tensorParallelSize"):
            if isinstance(worker.get(field), int) and worker[field] < 1:
                yield f"spec.workerSpec.{field}: cannot be less than 1"
    formats = [f for f in spec.get("supportedModelFormats") or [] if isinstance(f, Mapping) and f.get("autoSelect")]
    priorities: dict[Any, Any] = {}
    for f in formats:
        seen = priorities.setdefault(f.get("name"), f.get("priority"))
        if seen is not None and f.get("priority") is not None and seen != f.get("priority"):
            yield f"spec.supportedModelFormats: different priorities assigned for the model format {f.get('name')!r}"
    name, namespace = (doc.get("metadata") or {}).get("name"), (doc.get("metadata") or {}).get("namespace")
    for other in context:
        if not isinstance(other, Mapping) or other.get("kind") != doc.get("kind") or other is doc:
            continue
        ometa, ospec = other.get("metadata") or {}, other.get("spec") if isinstance(other.get("spec"), Mapping) else {}
        if ometa.get("name") == name or ospec.get("disabled") is True or \
                (ospec.get("multiModel") is True) != (spec.get("multiModel") is True) or \
                (doc.get("kind") == "ServingRuntime" and ometa.get("namespace") != namespace):
            continue
        if not set(ospec.get("protocolVersions") or []) & set(spec.get("protocolVersions") or []):
            continue
        for f in formats:
            for g in ospec.get("supportedModelFormats") or []:
                if isinstance(g, Mapping) and g.get("autoSelect") and str(g.get("name")).lower() == \
                        str(f.get("name")).lower() and g.get("version") == f.get("version") and \
                        f.get("priority") is not None and f.get("priority") == g.get("priority"):
                    yield (f"spec.supportedModelFormats: same priority {f.get('priority')} assigned for the model "
                           f"format {f.get('name')!r} as in {doc_name(other)}")


def effective_predictors(isvc: Mapping, context: list[dict]) -> list[tuple[str, dict]]:
    """``(part, pod spec)`` of each Deployment KServe makes for ``isvc`` (``predictor``, ``canary[i]``): a
    ``predictor.model`` resolved against its runtime among ``context`` as the controller does
    (``MergeServingRuntimeAndInferenceServiceSpecs``: the runtime's ``kserve-container`` strategic-merge-patched by
    the model's container fields, args appended; the runtime's volumes, node selector, tolerations and pull secrets
    under the predictor's), a custom-container predictor as written. The offline stand-in for the real pods."""
    out = []
    for part, predictor in _kserve_predictors(isvc.get("spec") or {}):
        label = "predictor" if part == "spec.predictor" else part.removeprefix("spec.").removesuffix(".predictor")
        model = predictor.get("model")
        runtime = _runtime_of(isvc, predictor, part, context)[0] if isinstance(model, Mapping) else None
        if runtime is None:
            out.append((label, predictor))
            continue
        rspec = runtime.get("spec") or {}
        ours = {k: v for k, v in model.items() if k not in ("modelFormat", "runtime", "protocolVersion", "storageUri",
                                                               "runtimeVersion", "storage", "confidential")}
        containers = []
        for c in rspec.get("containers") or []:
            if c.get("name") == KSERVE_CONTAINER:
                merged = _strategic(c, ours)
                merged["args"] = [*(c.get("args") or []), *(model.get("args") or [])]
                merged["name"] = KSERVE_CONTAINER
                containers.insert(0, merged)
            else:
                containers.append(copy.deepcopy(c))
        pod = {k: v for k, v in predictor.items() if k != "model"}
        base = {k: rspec[k] for k in ("nodeSelector", "affinity", "tolerations", "volumes", "imagePullSecrets",
                                      "schedulerName", "resourceClaims") if k in rspec}
        pod = _strategic(base, pod)
        pod["containers"] = [*containers, *(predictor.get("containers") or [])]
        out.append((label, pod))
    return out


_MERGE_KEYS = {"env": "name", "ports": "containerPort", "volumeMounts": "mountPath", "volumes": "name",
               "imagePullSecrets": "name", "volumeDevices": "devicePath", "envFrom": None, "containers": "name"}
"""Kubernetes' strategic-merge keys of the lists a runtime and a predictor both set (None: replaced)."""


def _strategic(base: Mapping, patch: Mapping) -> dict:
    """A strategic merge patch of ``patch`` onto ``base`` for the container / pod fields above (maps merged, lists
    with a merge key merged by it, other lists and scalars replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in patch.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = _strategic(old, value)
        elif isinstance(old, list) and isinstance(value, list) and _MERGE_KEYS.get(key):
            merge_key = _MERGE_KEYS[key]
            merged = {item.get(merge_key): item for item in old if isinstance(item, Mapping)}
            for item in value:
                merged[item.get(merge_key)] = _strategic(merged.get(item.get(merge_key), {}), item)
            out[key] = list(merged.values())
        else:
            out[key] = copy.deepcopy(value)
    return out
