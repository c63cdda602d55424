"""Every command line the rendered pipelines run, checked by the real parsers: `lingbot` (with kserve's standard
flags under `lingbot serve`), torchrun's launcher and `dvc`; exact flags only (argparse would let an abbreviation or a
prefix typo through). `lingbot serve` is also resolved the way the server resolves it in its pod (flags over
``LINGBOT_SERVE_*``): it must listen on the pod's IP, on the ports the container declares and the probes use, with
the bearer token from a Secret and its data directory on a writable volume."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
from dataclasses import dataclass

import pytest
import yaml
from cluster_docs import IMAGE_ENTRYPOINT, find, pod_specs, pods, render_documents, serve_settings, template

from pipelines.cli import build_parser


@dataclass
class Command:
    where: str
    argv: list[str]
    container: dict
    pod: dict


def commands(docs) -> list[Command]:
    """The command line of every container of every pod the documents make (placeholders filled)."""
    out, made = [], pods(docs)
    for doc in made:
        for where, spec in pod_specs(doc, made):  # a predictor.model: as KServe merges it with its ServingRuntime
            for c in spec["containers"]:
                argv = [*(c.get("command") or IMAGE_ENTRYPOINT), *(c.get("args") or [])]
                out.append(Command(f"{where} container {c['name']}", argv, c, spec))
    return out


def _leaf(parser: argparse.ArgumentParser, args: list[str]) -> argparse.ArgumentParser:
    """The (sub)parser that handles the options of ``args``: `lingbot train posttrain ...` -> posttrain's."""
    for token in args:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or token.startswith("-"):
            break
        parser = sub.choices.get(token, parser)
    return parser


def parse_lingbot(args: list[str]) -> tuple[argparse.Namespace | None, list[str]]:
    """``lingbot <args>`` through the real parser: (namespace, problems)."""
    parser, err = build_parser(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            namespace = parser.parse_args(args)
    except SystemExit:
        return None, [f"`lingbot {' '.join(args[:2])} ...` is rejected: {err.getvalue().strip().splitlines()[-1]}"]
    flags = set(_leaf(parser, args)._option_string_actions)  # kserve's are there once `serve` has been parsed
    inexact = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in flags]
    return namespace, [f"{flag}: not a flag of `lingbot {args[0]}` (argparse took it as an abbreviation)"
                       for flag in inexact]


def _lingbot(args: list[str]) -> tuple[argparse.Namespace | None, list[str], list[str]]:
    namespace, problems = parse_lingbot(args)
    return namespace, args, problems


def cli_problems(command: Command) -> tuple[argparse.Namespace | None, list[str], list[str]]:
    """Parse one command with the parser of the program it runs: (namespace, `lingbot` arguments, problems)."""
    program, rest = command.argv[0], command.argv[1:]
    if program == "lingbot":
        return _lingbot(rest)
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        launcher = get_args_parser().parse_args(rest)
        if not (launcher.module and launcher.training_script == "pipelines.cli"):
            return None, [], [f"torchrun runs {launcher.training_script!r}, not `-m pipelines.cli`"]
        return _lingbot(launcher.training_script_args)
    if program == "dvc":
        from dvc.cli import parse_args

        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # its usage
                return parse_args(rest), [], []
        except (SystemExit, Exception) as err:  # dvc raises DvcParserError, argparse SystemExit
            return None, [], [f"`dvc {' '.join(rest[:1])} ...` is rejected by dvc's parser ({type(err).__name__})"]
    return None, [], [f"runs {program!r}, which no test parses"]


def serve_problems(namespace: argparse.Namespace, command: Command) -> list[str]:
    """What would keep robots from reaching the policy server in its pod, or the server from running there."""
    from services.policy_server.settings import ServeSettings

    c, problems = command.container, []
    settings = serve_settings(namespace, c)
    if settings.host not in ("0.0.0.0", "::"):
        problems.append(f"listens on {settings.host}: the Service reaches the pod on its pod IP (use --host 0.0.0.0)")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
    if ports.get("http1") != namespace.http_port:
        problems.append(f"REST on {namespace.http_port} (--http_port), the container declares http1={ports.get('http1')}")
    if not namespace.enable_grpc or ports.get("h2c") != namespace.grpc_port:
        problems.append(f"gRPC on {namespace.grpc_port} (--grpc_port), the container declares h2c={ports.get('h2c')}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
        if port is not None and port != namespace.http_port:
            problems.append(f"{probe} checks port {port}, REST is on {namespace.http_port}")
    token = [e for e in c.get("env") or [] if e["name"] == "LINGBOT_SERVE_TOKEN"]
    if settings.token is None or not token or "secretKeyRef" not in (token[0].get("valueFrom") or {}):
        problems.append("no bearer token from a Secret (LINGBOT_SERVE_TOKEN valueFrom.secretKeyRef)")
    mounts = [m["mountPath"] for m in c.get("volumeMounts") or []]
    if not any(str(settings.data_dir) == m or str(settings.data_dir).startswith(m.rstrip("/") + "/") for m in mounts):
        problems.append(f"data dir {settings.data_dir} is on the read-only root filesystem, not on a volume")
    gpu = "nvidia.com/gpu" in ((c.get("resources") or {}).get("limits") or {})
    if (settings.device == "cuda") != gpu:
        problems.append(f"device {settings.device} with{'' if gpu else 'out'} a GPU limit")
    fields = {f"LINGBOT_SERVE_{name.upper()}" for name in ServeSettings.model_fields}
    problems += [f"{e['name']} is no ServeSettings field" for e in c.get("env") or []
                 if e["name"].startswith("LINGBOT_SERVE_") and e["name"] not in fields]
    return problems


def all_problems(docs) -> list[str]:
    problems = []
    for command in commands(docs):
        namespace, args, found = cli_problems(command)
        if namespace is not None and args[:1] == ["serve"]:
            found += serve_problems(namespace, command)
        problems += [f"{command.where}: {p}" for p in found]
    return problems


@functools.cache
def _rendered():
    return render_documents()


EXPECTED = {  # the program and subcommand of each container (both replicas of a PyTorchJob run the same)
    "pipelines/posttrain.yaml": {
        "Pod/lingbot-va-posttrain.dvc-get container main": ["dvc", "get"],
        "Pod/lingbot-va-posttrain.prepare container main": ["lingbot", "data", "prepare"],
        "Pod/sample-encode-master container pytorch": ["torchrun", "-m", "pipelines.cli", "data", "encode"],
        "Pod/posttrain-reach-v3-sample-master container pytorch": ["torchrun", "-m", "pipelines.cli", "train",
                                                                   "posttrain"],
        "Pod/lingbot-va-posttrain.gate container main": ["lingbot", "evaluate"],
        "InferenceService/lingbot-va-reach-v3 predictor container kserve-container": ["lingbot", "serve"],
        "InferenceService/lingbot-va-reach-v3 canary[0] container kserve-container": ["lingbot", "serve"]},
    "pipelines/pretrain.yaml": {
        "Pod/lingbot-va-pretrain.dvc-get container main": ["dvc", "get"],
        "Pod/lingbot-va-pretrain.prepare container main": ["lingbot", "data", "prepare"],
        "Pod/sample-encode-master container pytorch": ["torchrun", "-m", "pipelines.cli", "data", "encode"],
        "Pod/sample-encode-worker container pytorch": ["torchrun", "-m", "pipelines.cli", "data", "encode"],
        "Pod/sample-train-master container pytorch": ["torchrun", "-m", "pipelines.cli", "train", "pretrain"],
        "Pod/sample-train-worker container pytorch": ["torchrun", "-m", "pipelines.cli", "train", "pretrain"]},
}


@pytest.mark.parametrize("path", sorted(EXPECTED))
def test_every_command_is_accepted_by_the_real_parser(path):
    docs = _rendered()[path]
    found = {c.where: c.argv[:len(EXPECTED[path].get(c.where, []))] for c in commands(docs)}
    assert found == EXPECTED[path]
    problems = all_problems(docs)
    assert not problems, "\n".join(problems)


def test_policy_server_in_its_pod_listens_on_the_pod_ip_with_rest_grpc_and_token():
    docs = _rendered()["pipelines/posttrain.yaml"]
    serves = [c for c in commands(docs) if c.argv[:2] == ["lingbot", "serve"]]
    assert len(serves) == 2  # the stable predictor and the canary
    for command in serves:
        namespace, _, problems = cli_problems(command)
        assert not problems and not serve_problems(namespace, command)
        settings = serve_settings(namespace, command.container)
        assert settings.host == "0.0.0.0" and (namespace.http_port, namespace.grpc_port) == (8080, 8081)
        assert settings.token.get_secret_value() == "from-secret" and settings.device == "cuda"
        assert settings.model == "models:/lingbot-va-reach-v3@champion" and settings.poll_interval_s == 0
        assert settings.tracking_uri == "http://mlflow.lingbot.svc.cluster.local:5000"


# ---------------------------------------------------------------------------------------------- planted errors
def _edit_manifest(name, old, new, count=1):
    def mutate(docs):
        res = template(find(docs, "WorkflowTemplate"), name)["resource"]
        assert res["manifest"].count(old) >= count, old
        res["manifest"] = res["manifest"].replace(old, new)
    return mutate


def _edit_serve(change):
    """``change(model)`` on the stable predictor's ``model`` of the deploy step's InferenceService."""
    def mutate(docs):
        res = template(find(docs, "WorkflowTemplate"), "deploy")["resource"]
        isvc = yaml.safe_load(res["manifest"])
        change(isvc["spec"]["predictor"]["model"])
        res["manifest"] = yaml.safe_dump(isvc, sort_keys=False)
    return mutate


def _edit_runtime(change):
    """``change(container)`` on the kserve-container of the ServingRuntime the endpoint runs in."""
    return lambda docs: change(find(docs, "ServingRuntime")["spec"]["containers"][0])


def _set_env(name, value):
    return lambda c: next(e for e in c["env"] if e["name"] == name).update(value=value)


def _probe_port(port):
    def change(container):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            container[probe]["httpGet"]["port"] = port
    return change


def _drop_flag(flag):
    def change(container):
        i = container["args"].index(flag)
        del container["args"][i:i + 2]
    return change


def _edit_args(name, old, new):
    def mutate(docs):
        args = template(find(docs, "WorkflowTemplate"), name)["container"]["args"]
        args[args.index(old)] = new
    return mutate


POST, PRE = "pipelines/posttrain.yaml", "pipelines/pretrain.yaml"
PLANTED = [
    pytest.param(POST, _edit_runtime(lambda c: c["env"].pop(0)),
                 "predictor container kserve-container: listens on 127.0.0.1", id="serve-default-host"),
    pytest.param(POST, _edit_serve(lambda c: c["env"].__setitem__(2, {"name": "LINGBOT_SERVE_TOKEN", "value": "x"})),
                 "no bearer token from a Secret", id="serve-literal-token"),
    pytest.param(POST, _edit_serve(lambda c: c["env"].append({"name": "LINGBOT_SERVE_HOSTNAME", "value": "x"})),
                 "LINGBOT_SERVE_HOSTNAME is no ServeSettings field", id="serve-unknown-env"),
    pytest.param(POST, _edit_runtime(lambda c: c["args"].__setitem__(2, "--grpc-port")), "unrecognized arguments",
                 id="serve-invented-flag"),
    pytest.param(POST, _edit_manifest("deploy", "- --poll-interval-s", "- --poll-interval"),
                 "--poll-interval: not a flag", id="serve-abbreviated-flag"),
    pytest.param(POST, _edit_runtime(lambda c: c["args"].__setitem__(c["args"].index("--grpc_port") + 1, "9000")),
                 "gRPC on 9000 (--grpc_port), the container declares h2c=8081", id="serve-grpc-port-not-declared"),
    pytest.param(POST, _edit_runtime(lambda c: c["ports"][1].update(name="grpc")), "the container declares h2c=None",
                 id="serve-grpc-port-unnamed"),
    pytest.param(POST, _edit_runtime(_probe_port(8000)), "checks port 8000", id="serve-probe-wrong-port"),
    pytest.param(POST, _edit_manifest("deploy", "name: LINGBOT_SERVE_TOKEN", "name: LINGBOT_SERVE_TOKN"),
                 "no bearer token from a Secret", id="serve-token-misnamed"),
    pytest.param(POST, _edit_runtime(_set_env("LINGBOT_SERVE_DATA_DIR", "/opt/models")),
                 "data dir /opt/models is on the read-only root", id="serve-data-dir-not-mounted"),
    pytest.param(POST, _edit_manifest("deploy", "value: cuda", "value: cpu"), "device cpu with a GPU limit",
                 id="serve-cpu-on-a-gpu"),
    pytest.param(POST, _edit_manifest("train", "- --zero-stage", "- --zero_stage"), "unrecognized arguments",
                 id="train-invented-flag"),
    pytest.param(POST, _edit_manifest("train", "- pipelines.cli", "- pipelines.train"), "not `-m pipelines.cli`",
                 id="torchrun-wrong-module"),
    pytest.param(POST, _edit_args("gate", "--episodes", "--episode"), "--episode: not a flag",
                 id="gate-abbreviated-flag"),
    pytest.param(PRE, _edit_manifest("encode", "- --episodes-dir", "- --episode-dir"), "unrecognized arguments",
                 id="encode-invented-flag"),
    pytest.param(POST, _edit_manifest("encode", "- --vae", "- --vae-path"), "unrecognized arguments",
                 id="encode-vae-flag"),
    pytest.param(PRE, _edit_args("prepare", "--text-encoder", "--text-encoder-path"), "unrecognized arguments",
                 id="prepare-text-encoder-flag"),
    pytest.param(POST, _edit_manifest("train", "- --init-from", "- --init"), "--init: not a flag",
                 id="posttrain-abbreviated-init-flag"),
    pytest.param(PRE, lambda docs: template(find(docs, "WorkflowTemplate"), "dvc-get")["container"]["args"].append(
                 "--revision"), "rejected by dvc's parser", id="dvc-invented-flag"),
]


@pytest.mark.parametrize("path, mutate, expected", PLANTED)
def test_planted_command_error_is_caught(path, mutate, expected):
    docs = copy.deepcopy(_rendered()[path])
    assert not all_problems(docs)
    mutate(docs)
    problems = all_problems(docs)
    assert any(expected in p for p in problems), "\n".join(problems) or "no problem reported"
