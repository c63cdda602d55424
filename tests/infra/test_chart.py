"""charts/lingbot-platform: `helm lint --strict` and `helm template` are clean with the default and the CI values
files, the rendered documents validate, values.schema.json rejects mistakes, one endpoint is rendered per task."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
import yaml
from infra_checks import CHART, CHART_SETS, KUSTOMIZE, NAMESPACE, effective_container, find, helm, validatable

from pipelines.cluster.validate import validate_documents

VALUES_FILES = CHART_SETS


def _flags(files) -> list[str]:
    return [f for v in files for f in ("-f", str(v))]


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_helm_lint_strict_is_clean(name):
    done = helm("lint", "--strict", str(CHART), *_flags(VALUES_FILES[name]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("name", list(VALUES_FILES))
def test_helm_template_documents_validate(rendered, name):
    docs = rendered(name)
    assert docs
    problems = validate_documents(validatable(docs))
    assert not problems, "\n".join(problems)


def test_default_values_install_every_service_and_one_edge_endpoint(rendered):
    docs = rendered("chart-default")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("StatefulSet", "lingbot-va-postgres"), ("StatefulSet", "lingbot-va-minio"), ("Job", "lingbot-va-minio-setup"),
            ("Deployment", "lingbot-va-mlflow"), ("Deployment", "lingbot-va-feast"), ("Role", "lingbot-va-pipeline"),
            ("InferenceService", "lingbot-va-reach-v3")} <= names
    (isvc,) = find(docs, "InferenceService")
    assert isvc["metadata"]["labels"]["platform.lingbot-va.io/placement"] == "edge"


def test_edge_values_render_one_endpoint_per_task(rendered):
    values = yaml.safe_load((CHART / "ci" / "edge-values.yaml").read_text())
    tasks = {t["name"]: t for t in values["policy"]["tasks"]}
    docs = rendered("chart-edge")
    services = {d["metadata"]["name"]: d for d in find(docs, "InferenceService")}
    assert set(services) == {f"lingbot-va-{t}" for t in tasks}
    for task, spec in tasks.items():
        isvc = services[f"lingbot-va-{task}"]
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
        predictors = [("champion", "predictor", isvc["spec"]["predictor"])]
        if "canary" in spec:
            (canary,) = isvc["spec"]["canary"]
            assert canary["trafficPercent"] == spec["canary"]["trafficPercent"]
            predictors.append((spec["canary"].get("alias", "challenger"), "canary[0]", canary["predictor"]))
        else:
            assert "canary" not in isvc["spec"]
        for alias, part, predictor in predictors:
            assert predictor["model"]["modelFormat"] == {"name": "lingbot-va"}  # run by the chart's ServingRuntime
            c = effective_container(docs, f"lingbot-va-{task}", part)
            assert c["args"][c["args"].index("--model") + 1] == f"models:/lingbot-va-{task}@{alias}"
            assert c["image"] == "registry.example.internal/lingbot/lingbot-va-cuda:0.1.0"
            gpus = str(spec.get("gpus", 1))
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == gpus
            if "resources" in spec:
                assert c["resources"]["limits"]["memory"] == spec["resources"]["limits"]["memory"]
            assert predictor["nodeSelector"] == {"platform.lingbot-va.io/node-pool": "edge-gpu"}
            assert {t["key"] for t in predictor["tolerations"]} == {"platform.lingbot-va.io/edge", "nvidia.com/gpu"}
            env = {e["name"]: e for e in c["env"]}
            assert env["LINGBOT_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "lingbot-policy-token",
                                                                               "key": "token"}
            assert env["LINGBOT_SERVE_MAX_SESSIONS"]["value"] == "32"  # policy.settings, for every task
    push = effective_container(docs, "lingbot-va-push-v3")
    assert {e["name"]: e.get("value") for e in push["env"]}["LINGBOT_SERVE_MAX_BATCH_SIZE"] == "4"
    assert not find(docs, "Secret"), "secrets.create=false renders no Secret"


def test_external_services_values_render_only_the_endpoints(rendered):
    docs = rendered("chart-external")
    assert not find(docs, "StatefulSet") and not find(docs, "Deployment") and not find(docs, "Job")
    (env,) = find(docs, "ConfigMap", "lingbot-va-env")
    assert env["data"]["MLFLOW_TRACKING_URI"] == "https://mlflow.example.internal"
    assert env["data"]["AWS_ENDPOINT_URL"] == "https://s3.eu-west-1.amazonaws.com"
    for isvc in find(docs, "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        assert "nodeSelector" not in predictor and "platform.lingbot-va.io/placement" not in isvc["metadata"]["labels"]
        c = effective_container(docs, isvc["metadata"]["name"])
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert {e["name"]: e.get("value") for e in c["env"]}["LINGBOT_SERVE_DEVICE"] == "cpu"


def test_chart_scripts_are_the_kustomize_ones(rendered):
    """The Postgres init and MinIO setup scripts exist once: the chart's files/ are links to the kustomize base's
    (helm follows them; kustomize may not read outside its root), and helm renders their content."""
    (setup,) = [d for d in find(rendered("chart-default"), "ConfigMap") if "setup.sh" in d.get("data", {})]
    for name in ("postgres-init.sh", "minio-setup.sh"):
        link = CHART / "files" / name
        assert link.is_symlink() and link.resolve() == (KUSTOMIZE / "base" / "files" / name).resolve(), name
    assert setup["data"]["setup.sh"] == (KUSTOMIZE / "base" / "files" / "minio-setup.sh").read_text().strip()


def test_feature_store_configs_load_in_feast(rendered, monkeypatch):
    """Every cluster feature_store.yaml (kustomize, chart) is a Feast RepoConfig, with env vars expanded as Feast
    expands them, and an unknown online-store field is rejected by the same check."""
    from feast.repo_config import RepoConfig

    monkeypatch.setenv("FEAST_DB_PASSWORD", "placeholder")
    texts = {"kustomize": (KUSTOMIZE / "base" / "files" / "feature_store.yaml").read_text()}
    for name in ("chart-default", "chart-edge"):
        (cm,) = find(rendered(name), "ConfigMap", "lingbot-va-feast-repo")
        texts[name] = cm["data"]["feature_store.yaml"]
    configs = {}
    for name, text in texts.items():
        raw = yaml.safe_load(os.path.expandvars(text))
        configs[name] = RepoConfig(repo_path="/tmp", **raw)
        assert configs[name].online_store.password == "placeholder"
        assert configs[name].project == "lingbot"
    assert configs["chart-default"].online_store.host == "lingbot-va-postgres"
    assert configs["kustomize"].online_store.host == "postgres"
    raw["online_store"]["pasword"] = "typo"
    with pytest.raises(ValueError):
        RepoConfig(repo_path="/tmp", **raw)


def test_values_schema_is_complete():
    """Draft-07, every object closed (additionalProperties false) except free-form Kubernetes maps, every key of
    values.yaml described, and values.yaml valid against it."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    open_objects = []

    def walk(node, path):
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node:
                open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "#")
    assert open_objects == ["#/properties/policy/properties/affinity"], open_objects  # a Kubernetes Affinity


PLANTED_VALUES = [
    pytest.param({"mlfow": {"enabled": False}}, "Additional property mlfow is not allowed", id="typo-top-level-key"),
    pytest.param({"policy": {"taks": []}}, "Additional property taks is not allowed", id="typo-nested-key"),
    pytest.param({"policy": {"settings": {"maxSesions": 3}}}, "Additional property maxSesions", id="typo-serve-setting"),
    pytest.param({"policy": {"tasks": [{"name": "reach-v3", "canary": {"trafficPercent": 150}}]}},
                 "Must be less than or equal to 100", id="canary-over-100"),
    pytest.param({"policy": {"tasks": [{"name": "Reach_V3"}]}}, "Does not match pattern", id="task-not-a-dns-name"),
    pytest.param({"policy": {"tasks": [{"name": "reach-v3", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]}},
                 "limits is required", id="task-resources-without-limits"),
    pytest.param({"mlflow": {"replicas": "two"}}, "Invalid type", id="wrong-type"),
    # values maps merge into the defaults: null is how a values file removes a default key
    pytest.param({"minio": {"resources": {"limits": {"memory": None}}}}, "memory is required",
                 id="limits-without-memory"),
    pytest.param({"policy": {"edge": {"tolerations": [{"key": "x", "efect": "NoSchedule"}]}}},
                 "Additional property efect", id="typo-in-toleration"),
    pytest.param({"policy": {"tasks": [{"name": "reach-v3"}, {"name": "reach-v3"}]}}, "listed twice",
                 id="duplicate-task"),
    pytest.param({"policy": {"tasks": [{"name": "reach-v3", "minReplicas": 3}]}}, "minReplicas 3 > maxReplicas 1",
                 id="min-above-max-replicas"),
    pytest.param({"mlflow": {"enabled": False}}, "externalUri: String length must be greater than or equal to 1",
                 id="external-mlflow-without-uri"),
    pytest.param({"postgres": {"enabled": False}}, "externalHost: String length must be greater than or equal to 1",
                 id="external-postgres-without-host"),
    pytest.param({"policy": {"tasks": [{"name": "a-task-name-of-thirty-eight-characters"}]}}, "too long",
                 id="endpoint-name-too-long"),
]


@pytest.mark.parametrize(("values", "message"), PLANTED_VALUES)
def test_helm_lint_rejects_planted_value_errors(tmp_path, values, message):
    bad = tmp_path / "values.yaml"
    bad.write_text(yaml.safe_dump(values))
    lint = helm("lint", "--strict", str(CHART), "-f", str(bad))
    assert lint.returncode != 0, f"helm lint accepted {values}"
    assert message in lint.stdout + lint.stderr, lint.stdout + lint.stderr
    template = helm("template", "t", str(CHART), "--namespace", NAMESPACE, "-f", str(bad))
    assert template.returncode != 0 and message in template.stderr, template.stderr
