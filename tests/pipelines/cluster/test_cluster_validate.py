"""Offline validation: every rendered manifest passes, and for each check a planted error is caught and named."""

import copy
import functools

import pytest
from cluster_docs import CRDS, embedded, find, needs_crds, render_documents, template
from kubernetes import client as k8s

from pipelines.cluster.admission import DEPLOYMENT_MODE_ANNOTATION, STORAGE_URI_ENV, admission_problems
from pipelines.cluster.manifests import to_dict
from pipelines.cluster.schemas import load_crd_schemas
from pipelines.cluster.validate import validate_documents


@functools.cache
def _rendered():
    return render_documents()


def _posttrain():
    return _rendered()["pipelines/posttrain.yaml"]


def _pretrain():
    return _rendered()["pipelines/pretrain.yaml"]


def _deployment():
    pod = k8s.V1PodSpec(containers=[k8s.V1Container(name="web", image="nginx:1.27")])
    return to_dict(k8s.V1Deployment(
        api_version="apps/v1", kind="Deployment", metadata=k8s.V1ObjectMeta(name="web", namespace="lingbot"),
        spec=k8s.V1DeploymentSpec(selector=k8s.V1LabelSelector(match_labels={"app": "web"}),
                                  template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels={"app": "web"}),
                                                                 spec=pod))))


def _configmap():
    return to_dict(k8s.V1ConfigMap(api_version="v1", kind="ConfigMap", metadata=k8s.V1ObjectMeta(name="env"),
                                   data={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}))


def _job():
    pod = k8s.V1PodSpec(restart_policy="Never", containers=[k8s.V1Container(name="encode", image="x:1")])
    return to_dict(k8s.V1Job(api_version="batch/v1", kind="Job", metadata=k8s.V1ObjectMeta(name="encode"),
                             spec=k8s.V1JobSpec(completion_mode="Indexed", completions=4, parallelism=4,
                                                template=k8s.V1PodTemplateSpec(spec=pod))))


SUBJECTS = {  # name -> the clean documents a planted error goes into
    "pytorchjob": lambda: [embedded(_posttrain(), "train")],
    "elastic-pytorchjob": lambda: [embedded(_pretrain(), "train")],
    "isvc": lambda: [embedded(_posttrain(), "deploy"), find(_posttrain(), "ServingRuntime")],  # applied together
    "posttrain": _posttrain,
    "pretrain": _pretrain,
    "configmap": lambda: [_configmap()],
    "pvc": lambda: [find(_pretrain(), "PersistentVolumeClaim")],
    "deployment": lambda: [_deployment()],
    "job": lambda: [_job()],
}


def _master(docs):
    return docs[0]["spec"]["pytorchReplicaSpecs"]["Master"]


def _pod(docs):
    return _master(docs)["template"]["spec"]


def _predictor(docs):
    return docs[0]["spec"]["predictor"]


def _canary(docs):
    return docs[0]["spec"]["canary"][0]["predictor"]


def _model(docs):
    return _predictor(docs)["model"]


def _runtime(docs):
    return docs[1]


def _runtime_container(docs):
    return _runtime(docs)["spec"]["containers"][0]


def _format(docs):
    return _runtime(docs)["spec"]["supportedModelFormats"][0]


def _second_runtime(**format_fields):
    def mutate(docs):
        other = copy.deepcopy(_runtime(docs))
        other["metadata"]["name"] = "lingbot-va-b"
        for runtime in (_runtime(docs), other):
            runtime["spec"]["supportedModelFormats"][0].update(format_fields)
        docs.append(other)
    return mutate


def _duplicate_canary(docs):
    docs[0]["spec"]["canary"][0]["trafficPercent"] = 10
    docs[0]["spec"]["canary"].append(copy.deepcopy(docs[0]["spec"]["canary"][0]))


def _wt(docs):
    return find(docs, "WorkflowTemplate")


def _set(path_fn, key, value):
    def mutate(docs):
        path_fn(docs)[key] = value
    return mutate


def _pop(path_fn, key):
    def mutate(docs):
        path_fn(docs).pop(key)
    return mutate


def _two_canaries(docs):
    canary = docs[0]["spec"]["canary"][0]
    canary["trafficPercent"] = 60
    second = copy.deepcopy(canary)
    second["predictor"]["name"] = "canary-b"
    docs[0]["spec"]["canary"].append(second)


def _edit_manifest(name, old, new):
    def mutate(docs):
        res = template(_wt(docs), name)["resource"]
        assert old in res["manifest"]
        res["manifest"] = res["manifest"].replace(old, new)
    return mutate


def _step(docs, index):
    return template(_wt(docs), "posttrain")["steps"][index][0]


def _without_value(name):
    """The run passes no value for parameter ``name`` and the template has no default."""
    def mutate(docs):
        run = find(docs, "Workflow")["spec"]["arguments"]
        run["parameters"] = [p for p in run["parameters"] if p["name"] != name]
        next(p for p in _wt(docs)["spec"]["arguments"]["parameters"] if p["name"] == name).pop("value")
    return mutate


CR = [needs_crds]
PLANTED = [
    # PyTorchJob: CRD schema (strict) and the training operator's webhook
    pytest.param("pytorchjob", _set(lambda d: d[0]["spec"], "nprocsPerNode", "8"),
                 "Additional properties are not allowed ('nprocsPerNode'", id="pytorchjob-unknown-field", marks=CR),
    pytest.param("pytorchjob", _set(lambda d: d[0]["metadata"], "lables", {"a": "b"}),
                 "metadata: Additional properties are not allowed ('lables'", id="pytorchjob-unknown-metadata-field",
                 marks=CR),
    pytest.param("pytorchjob", _set(_master, "replicas", "1"), "'1' is not of type 'integer'",
                 id="pytorchjob-wrong-type", marks=CR),
    pytest.param("pytorchjob", lambda d: _pod(d)["containers"][0].update(name="trainer"),
                 "there is no container named 'pytorch'", id="pytorchjob-missing-pytorch-container", marks=CR),
    pytest.param("pytorchjob", _set(_master, "replicas", 2), "Master.replicas: must be 1",
                 id="pytorchjob-two-masters", marks=CR),
    pytest.param("pytorchjob", _pop(lambda d: d[0]["spec"], "pytorchReplicaSpecs"), "required property",
                 id="pytorchjob-no-replica-specs", marks=CR),
    pytest.param("pytorchjob", lambda d: d[0]["spec"]["pytorchReplicaSpecs"].update(
                 Worker=d[0]["spec"]["pytorchReplicaSpecs"].pop("Master")), "Master: required",
                 id="pytorchjob-no-master", marks=CR),
    pytest.param("pytorchjob", _set(lambda d: d[0]["metadata"], "name", "7-train"), "not a DNS-1035 label",
                 id="pytorchjob-bad-dns1035-name", marks=CR),
    pytest.param("elastic-pytorchjob", _pop(lambda d: d[0]["spec"]["pytorchReplicaSpecs"], "Worker"),
                 "Worker: must be configured if an elastic policy is used", id="pytorchjob-elastic-without-worker",
                 marks=CR),
    pytest.param("elastic-pytorchjob", _set(lambda d: d[0]["spec"]["elasticPolicy"], "nProcPerNode", 8),
                 "must not be used with spec.nprocPerNode", id="pytorchjob-elastic-nproc-twice", marks=CR),
    # InferenceService: CRD schema, KServe's rules, the edge rule
    pytest.param("isvc", _set(_predictor, "minReplicas", "1"), "'1' is not of type 'integer'",
                 id="isvc-wrong-type", marks=CR),
    pytest.param("isvc", _set(_predictor, "canaryTraficPercent", 10), "('canaryTraficPercent' was unexpected)",
                 id="isvc-unknown-field", marks=CR),
    pytest.param("isvc", lambda d: d[0]["metadata"].pop("annotations"), "must run in 'Standard' mode",
                 id="isvc-edge-missing-standard-annotation", marks=CR),
    pytest.param("isvc", lambda d: d[0]["metadata"]["annotations"].update({DEPLOYMENT_MODE_ANNOTATION: "Serverless"}),
                 "must run in 'Standard' mode", id="isvc-edge-serverless", marks=CR),
    pytest.param("isvc", lambda d: d[0]["metadata"]["annotations"].update(
                 {DEPLOYMENT_MODE_ANNOTATION: "RawDeployment"}), "deprecated alias", id="isvc-edge-legacy-mode",
                 marks=CR),
    pytest.param("isvc", _pop(_predictor, "tolerations"), "must tolerate the edge nodes' taints",
                 id="isvc-edge-without-tolerations", marks=CR),
    pytest.param("isvc", _pop(_predictor, "nodeSelector"), "must select the edge GPU nodes",
                 id="isvc-edge-without-node-selector", marks=CR),
    pytest.param("isvc", _set(lambda d: d[0]["spec"]["canary"][0], "trafficPercent", 101),
                 "101 is greater than the maximum of 100", id="isvc-canary-percent-over-100", marks=CR),
    pytest.param("isvc", _two_canaries, "trafficPercent values sum to 120", id="isvc-canaries-sum-over-100",
                 marks=CR),
    pytest.param("isvc", lambda d: d[0]["spec"]["canary"][0]["predictor"].pop("name"),
                 "canary[0].predictor.name: required", id="isvc-canary-without-name", marks=CR),
    pytest.param("isvc", _set(lambda d: d[0]["metadata"], "name", "lingbot.va"), "not a DNS-1035 label",
                 id="isvc-bad-dns1035-name", marks=CR),
    # KServe >= 0.20 validateCanarySpecs (and what it calls)
    pytest.param("isvc", _pop(_predictor, "model"), "a canary requires a stable predictor with a model",
                 id="isvc-canary-stable-without-model", marks=CR),
    pytest.param("isvc", _set(_model, "storageUri", "mlflow://lingbot-va-reach-v3/3"),
                 "spec.predictor: storage URI 'mlflow://lingbot-va-reach-v3/3' has no supported prefix",
                 id="isvc-storage-uri-unsupported-scheme", marks=CR),
    pytest.param("isvc", _set(_model, "storageUri", "models:/lingbot-va-reach-v3@champion"), None,
                 id="isvc-storage-uri-without-scheme-is-a-local-path", marks=CR),
    pytest.param("isvc", _set(_canary, "maxReplicas", 1), "canary[0].predictor.maxReplicas: not allowed on a canary",
                 id="isvc-canary-max-replicas", marks=CR),
    pytest.param("isvc", _set(_canary, "scaleTarget", 80), "canary[0].predictor.scaleTarget: autoscaling fields",
                 id="isvc-canary-scale-target", marks=CR),
    pytest.param("isvc", _set(_canary, "workerSpec", {}), "canary[0].predictor.workerSpec: not allowed on a canary",
                 id="isvc-canary-worker-spec", marks=CR),
    pytest.param("isvc", _set(_canary, "minReplicas", 2), "minReplicas: 2 exceeds the stable predictor's minReplicas",
                 id="isvc-canary-more-replicas-than-stable", marks=CR),
    pytest.param("isvc", _set(_predictor, "name", "canary"), "canary[0].predictor.name: 'canary' is not unique",
                 id="isvc-canary-named-like-stable", marks=CR),
    pytest.param("isvc", _duplicate_canary, "canary[1].predictor.name: 'canary' is not unique",
                 id="isvc-canary-duplicate-name", marks=CR),
    pytest.param("isvc", _set(_canary, "containers", [{"name": "kserve-container", "image": "x"}]),
                 "canary[0].predictor: exactly one implementation", id="isvc-canary-model-and-container", marks=CR),
    pytest.param("isvc", _pop(_canary, "model"), "exactly one implementation (a framework, model, or the "
                 "'kserve-container' container) must be specified, got none", id="isvc-canary-without-implementation",
                 marks=CR),
    pytest.param("isvc", lambda d: _canary(d).update(model=None, containers=[{"name": "kserve-container", "image": "x"}]),
                 "a canary must use the stable predictor's kind of implementation", id="isvc-canary-merged-two-kinds",
                 marks=CR),
    # predictor.model: KServe's webhook (validatePredictor, validateExactlyOneImplementation, blocked env) and its
    # controller's runtime selection (reconcileModel, GetSupportingRuntimes, MergeServingRuntimeAndInferenceServiceSpecs)
    pytest.param("isvc", _set(_model, "name", "server"), "spec.predictor.model.name: not allowed",
                 id="isvc-model-with-name", marks=CR),
    pytest.param("isvc", _set(_predictor, "containers", [{"name": "kserve-container", "image": "x"}]),
                 "spec.predictor: exactly one implementation", id="isvc-model-and-container", marks=CR),
    pytest.param("isvc", lambda d: _model(d)["env"].append({"name": "PYTHONPATH", "value": "/x"}),
                 "setting PYTHONPATH in container 'predictor.model' is not allowed", id="isvc-model-blocked-env", marks=CR),
    pytest.param("isvc", lambda d: d.pop(1), "spec.predictor.model: no ServingRuntime or ClusterServingRuntime among "
                 "the objects applied with it auto-selects model format {'name': 'lingbot-va'}",
                 id="isvc-model-without-runtime", marks=CR),
    pytest.param("isvc", _set(_format, "autoSelect", False), "auto-selects model format",
                 id="isvc-model-runtime-not-auto-selected", marks=CR),
    pytest.param("isvc", _set(lambda d: _model(d)["modelFormat"], "name", "onnx"), "auto-selects model format "
                 "{'name': 'onnx'}", id="isvc-model-format-nobody-serves", marks=CR),
    pytest.param("isvc", _set(lambda d: _model(d)["modelFormat"], "version", "2"), "auto-selects model format",
                 id="isvc-model-version-nobody-serves", marks=CR),
    pytest.param("isvc", _pop(_model, "protocolVersion"), "not protocol 'v1'; without protocolVersion KServe "
                 "assumes v1", id="isvc-model-default-protocol-v1", marks=CR),
    pytest.param("isvc", _set(lambda d: _runtime(d)["spec"], "disabled", True), "auto-selects model format",
                 id="isvc-model-runtime-disabled", marks=CR),
    pytest.param("isvc", _set(lambda d: _runtime(d)["metadata"], "namespace", "elsewhere"),
                 "auto-selects model format", id="isvc-model-runtime-in-another-namespace", marks=CR),
    pytest.param("isvc", _set(_model, "runtime", "triton"), "spec.predictor.model.runtime: no ServingRuntime or "
                 "ClusterServingRuntime 'triton'", id="isvc-model-named-runtime-missing", marks=CR),
    pytest.param("isvc", lambda d: _model(d).update(runtime="lingbot-va", modelFormat={"name": "onnx"}),
                 "ServingRuntime/lingbot-va does not support {'name': 'onnx'}", id="isvc-model-named-runtime-other-format",
                 marks=CR),
    pytest.param("isvc", lambda d: _model(d).update(runtime="lingbot-va", protocolVersion="v1"),
                 "ServingRuntime/lingbot-va does not support 'v1'", id="isvc-model-named-runtime-other-protocol",
                 marks=CR),
    pytest.param("isvc", _set(_runtime_container, "name", "server"), "has no container 'kserve-container' for the model",
                 id="isvc-model-runtime-without-kserve-container", marks=CR),
    # ServingRuntime: its CRD (strict) and KServe's ServingRuntime webhook
    pytest.param("isvc", _set(lambda d: _runtime(d)["spec"], "supportedModelFormat", []),
                 "('supportedModelFormat' was unexpected)", id="runtime-unknown-field", marks=CR),
    pytest.param("isvc", _set(_format, "autoSelect", "yes"), "'yes' is not of type 'boolean'",
                 id="runtime-wrong-type", marks=CR),
    pytest.param("isvc", _set(_format, "priority", 0), "0 is less than the minimum of 1",
                 id="runtime-priority-below-one", marks=CR),
    pytest.param("isvc", _set(_runtime_container, "name", "server"),
                 "ServingRuntime/lingbot-va: spec.containers: no container named 'kserve-container'",
                 id="runtime-without-kserve-container", marks=CR),
    pytest.param("isvc", lambda d: _runtime(d)["spec"].update(containers=[]), "spec.containers: required",
                 id="runtime-without-containers", marks=CR),
    pytest.param("isvc", lambda d: _runtime(d)["spec"]["protocolVersions"].append("v3"),
                 "'v3' is not one of KServe's protocols", id="runtime-unknown-protocol", marks=CR),
    pytest.param("isvc", lambda d: _runtime_container(d)["env"].append({"name": "PYTHONPATH", "value": "/x"}),
                 "ServingRuntime/lingbot-va: spec: setting PYTHONPATH", id="runtime-blocked-env", marks=CR),
    pytest.param("isvc", lambda d: (_format(d).update(priority=1), _runtime(d)["spec"]["supportedModelFormats"].append(
                 {"name": "lingbot-va", "version": "1", "autoSelect": True, "priority": 2})),
                 "different priorities assigned for the model format 'lingbot-va'", id="runtime-format-two-priorities",
                 marks=CR),
    pytest.param("isvc", _second_runtime(priority=1), "same priority 1 assigned for the model format 'lingbot-va' as "
                 "in ServingRuntime/lingbot-va-b", id="runtime-priority-clash", marks=CR),
    pytest.param("isvc", _set(lambda d: _runtime(d)["spec"], "workerSpec", {"containers": [
                 {"name": "worker-container", "image": "x"}, {"name": "b", "image": "x"}]}),
                 "multiple containers in workerSpec", id="runtime-worker-two-containers", marks=CR),
    # built-in kinds: strict Kubernetes OpenAPI schemas
    pytest.param("configmap", _set(lambda d: d[0], "date", {"a": "b"}), "('date' was unexpected)",
                 id="configmap-unknown-field"),
    pytest.param("pvc", _set(lambda d: d[0]["spec"], "accessMode", ["ReadWriteMany"]), "('accessMode' was unexpected)",
                 id="pvc-unknown-field"),
    pytest.param("deployment", lambda d: d[0]["spec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="x"),
                 "('imagePullPolicyy' was unexpected)", id="deployment-unknown-field"),
    pytest.param("deployment", _set(lambda d: d[0]["spec"], "replicas", "3"), "'3' is not of type 'integer'",
                 id="deployment-wrong-type"),
    pytest.param("job", _set(lambda d: d[0]["spec"], "completionsMode", "Indexed"), "('completionsMode' was unexpected)",
                 id="job-unknown-field"),
    pytest.param("job", _set(lambda d: d[0]["metadata"], "name", "Encode_Job"), "not a DNS-1123 subdomain",
                 id="job-bad-name"),
    pytest.param("job", _set(lambda d: d[0]["metadata"], "labels", {"shard": "a b"}), "not a valid label value",
                 id="job-bad-label-value"),
    # Argo Workflow / WorkflowTemplate: schema, references, parameters, embedded manifests
    pytest.param("posttrain", lambda d: _step(d, 1).update(template="trian"), "'trian' does not exist",
                 id="workflow-step-missing-template", marks=CR),
    pytest.param("posttrain", lambda d: _wt(d)["spec"].update(entrypoint="main"), "spec.entrypoint: template 'main'",
                 id="workflow-bad-entrypoint", marks=CR),
    pytest.param("posttrain", lambda d: _step(d, 0).pop("arguments"), "input 'path' of 'dvc-get' is not supplied",
                 id="workflow-step-missing-argument", marks=CR),
    pytest.param("posttrain", lambda d: template(_wt(d), "gate")["container"]["args"].append("{{inputs.parameters.x}}"),
                 "'{{inputs.parameters.x}}' is not an input parameter", id="workflow-undeclared-input", marks=CR),
    pytest.param("posttrain", lambda d: template(_wt(d), "gate")["container"]["args"].append(
                 "{{workflow.parameters.seed}}"), "'{{workflow.parameters.seed}}' is not a workflow parameter",
                 id="workflow-undeclared-parameter", marks=CR),
    pytest.param("posttrain", lambda d: template(_wt(d), "gate").update(script={"image": "x", "source": "y"}),
                 "must have exactly one template type", id="workflow-two-template-types", marks=CR),
    pytest.param("posttrain", lambda d: template(_wt(d), "gate").update(containr={}), "('containr' was unexpected)",
                 id="workflow-unknown-field", marks=CR),
    pytest.param("posttrain", lambda d: find(d, "Workflow")["spec"]["workflowTemplateRef"].update(name="nope"),
                 None, id="workflow-ref-to-cluster-template-is-not-checked", marks=CR),
    pytest.param("posttrain", _without_value("preset"), "arguments.parameters[preset]: no value",
                 id="workflow-parameter-without-value", marks=CR),
    pytest.param("posttrain", _edit_manifest("train", "name: pytorch", "name: trainer"),
                 "templates[train].resource.manifest[0]: PyTorchJob/", id="workflow-embedded-pytorchjob-error",
                 marks=CR),
    pytest.param("posttrain", _edit_manifest("deploy", "serving.kserve.io/deploymentMode: Standard", "x: y"),
                 "must run in 'Standard' mode", id="workflow-embedded-isvc-error", marks=CR),
    pytest.param("posttrain", _edit_manifest("deploy", "kind: InferenceService", "kind: [Inference"),
                 "not valid YAML once parameters are filled in", id="workflow-embedded-invalid-yaml", marks=CR),
    pytest.param("pretrain", _edit_manifest("encode", "kind: PyTorchJob", "kind: TorchJob"),
                 "no schema for TorchJob kubeflow.org/v1", id="workflow-embedded-unknown-kind", marks=CR),
]


@pytest.mark.parametrize("subject, mutate, expected", PLANTED)
def test_planted_error_is_caught(subject, mutate, expected):
    docs = copy.deepcopy(SUBJECTS[subject]())
    assert validate_documents(docs) == [], "the clean documents must pass before an error is planted"
    mutate(docs)
    problems = validate_documents(docs)
    if expected is None:  # a reference the cluster resolves: nothing to report offline
        assert problems == []
        return
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem reported"
    for problem in problems:  # each names the object it is about: Kind/name
        assert problem.split(":")[0].count("/") >= 1, problem


@needs_crds
@pytest.mark.parametrize("path", ["pipelines/posttrain.yaml", "pipelines/pretrain.yaml"])
def test_rendered_manifests_are_valid(path):
    docs = _rendered()[path]
    assert validate_documents(docs) == []
    wt = find(docs, "WorkflowTemplate")
    kinds = {t["name"]: embedded(docs, t["name"])["kind"] for t in wt["spec"]["templates"] if "resource" in t}
    assert kinds == ({"encode": "PyTorchJob", "train": "PyTorchJob", "deploy": "InferenceService"}
                     if "posttrain" in path else {"encode": "PyTorchJob", "train": "PyTorchJob"})


@needs_crds
def test_crd_schemas_are_strict_except_where_fields_are_preserved():
    schemas = load_crd_schemas(CRDS)
    assert {("kubeflow.org/v1", "PyTorchJob"), ("serving.kserve.io/v1beta1", "InferenceService"),
            ("argoproj.io/v1alpha1", "Workflow"), ("argoproj.io/v1alpha1", "WorkflowTemplate"),
            ("serving.kserve.io/v1alpha1", "ServingRuntime")} <= set(schemas)  # the last: pipelines/cluster/crds
    assert schemas[("kubeflow.org/v1", "PyTorchJob")]["properties"]["spec"]["additionalProperties"] is False
    # an Argo step's withItems is x-kubernetes-preserve-unknown-fields: any items, no false positive
    docs = copy.deepcopy(_posttrain())
    _step(docs, 0)["withItems"] = [{"path": "data/latents", "extra": {"nested": 1}}]
    assert not [p for p in validate_documents(docs) if "withItems" in p]


def test_missing_crd_folder_is_a_clear_problem_and_an_error(tmp_path):
    problems = validate_documents([embedded(_posttrain(), "train")], crds_dir=tmp_path / "absent")
    assert problems and "no schema for PyTorchJob kubeflow.org/v1" in problems[0] and "absent" in problems[0]
    with pytest.raises(ValueError, match="does not exist"):
        load_crd_schemas(tmp_path / "absent")
    assert validate_documents([find(_pretrain(), "PersistentVolumeClaim")], crds_dir=tmp_path / "absent") == []


ADMISSION = [  # admission rules alone: no CRDs needed
    pytest.param({"kind": "PyTorchJob", "metadata": {"name": "job"}, "spec": {"pytorchReplicaSpecs": {
        "Master": {"replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}}},
        "Chief": {"replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}}}}}},
        "replica type must be Master or Worker", id="pytorchjob-unknown-replica-type"),
    pytest.param({"kind": "PyTorchJob", "metadata": {"name": "job"}, "spec": {"pytorchReplicaSpecs": {
        "Master": {"template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}}}}}},
        "Master.replicas: must be 1 (got None)", id="pytorchjob-master-replicas-unset"),
    pytest.param({"kind": "PyTorchJob", "metadata": {"name": "job"}, "spec": {"pytorchReplicaSpecs": {
        "Master": {"replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch"}]}}}}}},
        "containers[0].image: required", id="pytorchjob-container-without-image"),
    pytest.param({"kind": "InferenceService", "metadata": {"name": "svc"}, "spec": {
        "predictor": {}, "canary": [{"trafficPercent": 5, "predictor": {"name": "c"}}]}},
        "only supported in 'Standard' mode", id="isvc-canary-needs-standard-mode"),
    pytest.param({"kind": "InferenceService", "metadata": {"name": "svc", "annotations": {
        DEPLOYMENT_MODE_ANNOTATION: "Standard"}}, "spec": {"predictor": {}, "canary": [
            {"trafficPercent": 5, "predictor": {"name": "c", "scaleMetric": "cpu"}}]}},
        "autoscaling fields are not allowed on a canary", id="isvc-canary-autoscaling"),
    pytest.param({"kind": "InferenceService", "metadata": {"name": "svc", "annotations": {
        DEPLOYMENT_MODE_ANNOTATION: "Standard"}}, "spec": {"predictor": {}, "canary": [
            {"trafficPercent": -5, "predictor": {"name": "c", "containers": [{"name": "kserve-container"}]}}]}},
        "trafficPercent: must be between 0 and 100, got -5", id="isvc-canary-negative-percent"),
    pytest.param({"kind": "InferenceService", "metadata": {"name": "svc", "annotations": {
        DEPLOYMENT_MODE_ANNOTATION: "Standard"}}, "spec": {"predictor": {"containers": [
            {"name": "kserve-container", "image": "x"}]}, "canary": [{"trafficPercent": 5, "predictor": {"name": "c"}}]}},
        "a canary requires a stable predictor with a model", id="isvc-canary-custom-container-without-storage-uri"),
    pytest.param({"kind": "Workflow", "metadata": {"generateName": "run-"}, "spec": {"templates": [
        {"name": "a", "container": {"image": "x"}}]}}, "spec.entrypoint: required", id="workflow-without-entrypoint"),
    pytest.param({"kind": "Workflow", "metadata": {"name": "w"}, "spec": {"entrypoint": "main", "templates": [
        {"name": "main", "dag": {"tasks": [{"name": "a", "template": "x", "dependencies": ["b"]},
                                           {"name": "x", "template": "main", "depends": "a", "dependencies": ["a"]}]}},
        {"name": "x", "container": {"image": "x"}}]}}, "dependency 'b' is not a task", id="workflow-dag-dependency"),
    pytest.param({"kind": "Workflow", "metadata": {"name": "w"}, "spec": {"entrypoint": "main", "templates": [
        {"name": "main", "dag": {"tasks": [{"name": "a", "template": "x", "depends": "a", "dependencies": ["a"]}]}},
        {"name": "x", "container": {"image": "x"}}]}}, "cannot use both 'depends' and 'dependencies'",
        id="workflow-dag-depends-and-dependencies"),
    pytest.param({"kind": "Workflow", "metadata": {"name": "w"}, "spec": {"entrypoint": "main", "templates": [
        {"name": "main", "container": {"image": "x"}}, {"name": "main", "container": {"image": "y"}}]}},
        "defined more than once", id="workflow-duplicate-template"),
    pytest.param({"kind": "ConfigMap", "metadata": {}}, "metadata.name: required", id="object-without-name"),
]


@pytest.mark.parametrize("doc, expected", ADMISSION)
def test_admission_rule(doc, expected):
    problems = admission_problems(doc)
    assert any(expected in p for p in problems), problems


def test_admission_accepts_a_well_formed_job():
    doc = {"kind": "PyTorchJob", "metadata": {"name": "job"}, "spec": {"pytorchReplicaSpecs": {
        "Master": {"replicas": 1, "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}}},
        "Worker": {"replicas": 3, "template": {"spec": {"containers": [{"name": "pytorch", "image": "x"}]}}}}}}
    assert admission_problems(doc) == []


@pytest.mark.parametrize("predictor", [
    pytest.param({"model": {"modelFormat": {"name": "lingbot-va"}, "runtime": "lingbot-va",
                            "storageUri": "s3://mlflow-artifacts/1/models/m-1/artifacts"}}, id="model"),
    pytest.param({"sklearn": {"storageUri": "gs://bucket/model"}}, id="framework-storage-uri"),
    pytest.param({"containers": [{"name": "kserve-container", "image": "x",
                                  "env": [{"name": STORAGE_URI_ENV, "value": "http://mlflow:5000/f.pkl"}]}]},
                 id="custom-container-storage-uri"),
])
def test_admission_accepts_a_canary_of_a_stable_model(predictor):
    """The shapes KServe's validateCanarySpecs admits: a model location on the stable predictor (predictor.model, a
    framework's storageUri, a custom container's STORAGE_URI) and a fixed-size canary with one implementation."""
    doc = {"kind": "InferenceService", "metadata": {"name": "svc", "annotations": {
        DEPLOYMENT_MODE_ANNOTATION: "Standard"}}, "spec": {"predictor": {"minReplicas": 2, **predictor}, "canary": [
            {"trafficPercent": 10, "predictor": {"name": "canary", "minReplicas": 2, **copy.deepcopy(predictor)}}]}}
    runtime = {"kind": "ServingRuntime", "metadata": {"name": "lingbot-va"}, "spec": {
        "supportedModelFormats": [{"name": "lingbot-va"}], "containers": [{"name": "kserve-container", "image": "x"}]}}
    assert admission_problems(doc, context=[doc, runtime]) == []
