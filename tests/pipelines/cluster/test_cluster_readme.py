"""The README's cluster commands (apply, re-run, pick tasks, roll back, images, infra, render), run offline as far as
the real CLIs allow: `lingbot` for real (render, and its parser for the rest), `make -n`, `kubectl kustomize`, and
every other `kubectl` command line against an unreachable API server, where kubectl parses its flags and reads the
files before it gives up on the connection (an unknown flag or subcommand fails before that). What each command
selects (the run a delete removes, the Deployments a restart hits, the endpoint a rollback execs into) is checked
against the rendered objects."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
import yaml
from cluster_docs import default_settings, embedded, find, needs_crds, parse
from test_cluster_commands import parse_lingbot

from pipelines.cli import main
from pipelines.cluster.admission import KSERVE_CONTAINER
from pipelines.cluster.manifests import registered_name
from pipelines.cluster.schemas import load_documents
from pipelines.cluster.validate import validate_documents
from pipelines.cluster.workflows import RUN_COMPONENT
from pipelines.settings import REPO_ROOT

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: offline, cluster: {server: "https://127.0.0.1:1"}}]
contexts: [{name: offline, context: {cluster: offline, user: offline}}]
users: [{name: offline, user: {token: offline}}]
current-context: offline
"""
"""A cluster nobody listens on (port 1): kubectl can never reach a real one from these tests."""


def readme_commands() -> list[str]:
    """The command lines of the README's cluster section (its bash blocks, comments dropped)."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):text.index("## Layout")]
    lines = [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()]
    commands = [re.split(r"\s+# ", line)[0].strip() for line in lines]
    return [c for c in commands if c and not c.startswith("#")]


COMMANDS = readme_commands()


def _split(line: str) -> list[list[tuple[dict[str, str], list[str]]]]:
    """``a && b | c`` -> [[(env, argv of a)], [(env, argv of b), (env, argv of c)]]: the pipelines of an && chain."""
    chain = []
    for pipeline in line.split(" && "):
        commands = []
        for part in pipeline.split(" | "):
            words = shlex.split(part)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            commands.append((env, words))
        chain.append(commands)
    return chain


@pytest.fixture
def kubectl(tmp_path):
    """``kubectl(args, stdin)``: run the real kubectl against the unreachable cluster; it must get as far as the
    connection (flags, subcommand and files accepted)."""
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.fail("kubectl not found on PATH: the README's kubectl commands are checked with the real CLI")
    config = tmp_path / "kubeconfig"
    config.write_text(KUBECONFIG)

    def run(args: list[str], stdin: str = "") -> None:
        done = subprocess.run([binary, "--request-timeout=5s", *args], input=stdin, capture_output=True, text=True,
                              timeout=60, cwd=REPO_ROOT, env={**os.environ, "KUBECONFIG": str(config)})
        reached = "127.0.0.1:1" in done.stderr and ("refused" in done.stderr or "dial tcp" in done.stderr)
        assert done.returncode != 0 and reached and "unknown" not in done.stderr, \
            f"kubectl {' '.join(args)}: {done.stderr.strip()[-600:]}"

    return run


def _lingbot(argv: list[str], env: dict[str, str], monkeypatch, tmp_path) -> tuple[int, str]:
    """`lingbot <argv>` in-process, with only ``env`` of the LINGBOT_CLUSTER_* settings: (exit code, stdout)."""
    for key in [k for k in os.environ if k.startswith("LINGBOT_CLUSTER_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # no .env
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _selected(docs: list[dict], selector: str) -> list[dict]:
    """The documents a ``key=value[,key=value]`` label selector picks (kubectl's -l on files)."""
    wanted = dict(term.split("=", 1) for term in selector.split(","))
    return [d for d in docs if wanted.items() <= ((d.get("metadata") or {}).get("labels") or {}).items()]


def _option(argv: list[str], *names: str) -> str:
    hits = [argv[i + 1] for i, word in enumerate(argv[:-1]) if word in names]
    assert len(hits) == 1, f"expected one of {names} in {argv}"
    return hits[0]


def _positional(argv: list[str]) -> list[str]:
    """The words of a kubectl command line that are no flag nor a flag's value (flags here always take one)."""
    out, skip = [], False
    for word in argv[:argv.index("--") if "--" in argv else len(argv)]:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = "=" not in word
        else:
            out.append(word)
    return out


def check_kubectl(argv: list[str], stdin: str, kubectl) -> None:
    """What the kubectl command does, checked on the objects it names; then the real kubectl accepts it."""
    s = default_settings()
    verb, *rest = _positional(argv)
    if verb in ("apply", "delete") and "-k" in argv:
        done = subprocess.run(["kubectl", "kustomize", str(REPO_ROOT / _option(argv, "-k"))], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert validate_documents([d for d in yaml.safe_load_all(done.stdout) if d]) == []
    elif verb in ("apply", "delete"):
        source = _option(argv, "-f")
        docs = parse(stdin) if source == "-" else load_documents(REPO_ROOT / source)
        assert docs and validate_documents(docs) == []
        if verb == "delete":  # re-run: only the run goes; the pipeline and the runtime stay
            assert [d["kind"] for d in _selected(docs, _option(argv, "-l"))] == ["Workflow"]
            assert _option(argv, "-l") == f"app.kubernetes.io/component={RUN_COMPONENT}"
    elif verb == "exec":  # into the task's endpoint, where `lingbot` is and MLflow is reachable
        inner = argv[argv.index("--") + 1:]
        namespace, problems = parse_lingbot(inner[1:])
        assert inner[0] == "lingbot" and not problems, problems
        assert rest == [f"deploy/{registered_name(namespace.task)}-predictor"]
        assert _option(argv, "-c") == KSERVE_CONTAINER and namespace.tracking_uri == s.mlflow_uri
    elif verb == "rollout":  # KServe labels an endpoint's Deployments (predictor, canary) with its name
        assert rest == ["restart", "deployment"]
        key, _, value = _option(argv, "-l").partition("=")
        assert key == "serving.kserve.io/inferenceservice" and value.startswith("lingbot-va-")
    else:
        pytest.fail(f"no check for `kubectl {verb}`")
    if "-n" in argv:
        assert _option(argv, "-n") == s.namespace
    kubectl(argv, stdin)


def check_lingbot(argv: list[str], env: dict[str, str], monkeypatch, tmp_path) -> str:
    """Run `lingbot render ...` for real (a plain render into a scratch root: it must reproduce the committed
    files); any other `lingbot` command through the real parser. Returns what it prints."""
    if argv[:1] != ["render"]:
        namespace, problems = parse_lingbot(argv)
        assert namespace is not None and not problems, problems
        return ""
    writes = not {"--check", "--print", "--images", "--robot-env"} & set(argv)
    code, out = _lingbot([*argv, "--root", str(tmp_path)] if writes else argv, env, monkeypatch, tmp_path)
    assert code == 0, out
    if writes:
        for path in ("pipelines/posttrain.yaml", "pipelines/pretrain.yaml", "infra/kustomize/base/policy.yaml"):
            assert (tmp_path / path).read_text() == (REPO_ROOT / path).read_text(), path
    return out


@needs_crds  # the commands validate what they apply: without the CRDs every custom resource is a reported problem
@pytest.mark.parametrize("line", COMMANDS, ids=[" ".join(c.split()[:4]) for c in COMMANDS])
def test_readme_cluster_command_runs_offline(line, kubectl, monkeypatch, tmp_path):
    for pipeline in _split(line):
        out = ""
        for env, argv in pipeline:
            program = argv[0].rpartition("/")[2]
            assert not env or program == "lingbot", f"{line}: settings reach only `lingbot`"
            if program == "lingbot":
                out = check_lingbot(argv[1:], env, monkeypatch, tmp_path)
            elif program == "make":  # dry run: no Docker engine here
                done = subprocess.run(["make", "-n", "-o", ".venv/.installed", *argv[1:]], cwd=REPO_ROOT,
                                      capture_output=True, text=True, timeout=60)
                assert done.returncode == 0 and "docker build" in done.stdout, done.stderr
                out = ""
            elif program == "kubectl":
                check_kubectl(argv[1:], out, kubectl)
                out = ""
            else:
                pytest.fail(f"{line}: no check for {program!r}")


def _line(pattern: str) -> str:
    hits = sorted({c for c in COMMANDS if re.search(pattern, c)})
    assert len(hits) == 1, f"the README's cluster section should have one command matching {pattern!r}: {hits}"
    return hits[0]


def test_apply_rerun_pick_tasks_and_roll_back_are_one_command_each():
    apply = _line(r"^kubectl apply -f pipelines/posttrain\.yaml$")
    rerun = _line(r"^kubectl delete -f pipelines/posttrain\.yaml ")
    assert rerun.endswith(f"&& {apply}")
    _line(r"^LINGBOT_CLUSTER_TASKS=\S+ .*lingbot render --print pipelines/posttrain\.yaml \| kubectl apply -f -$")
    _line(r"lingbot promote --rollback .* && kubectl -n \S+ rollout restart deployment -l ")
    _line(r"^kubectl apply -f pipelines/pretrain\.yaml$")
    _line(r"^make images images-push$")


def test_picking_tasks_starts_a_new_run_of_exactly_those_tasks(monkeypatch, tmp_path):
    (env, argv), _ = _split(_line(r"LINGBOT_CLUSTER_TASKS="))[0]
    code, out = _lingbot(argv[1:], env, monkeypatch, tmp_path)
    docs = parse(out)
    tasks = env["LINGBOT_CLUSTER_TASKS"].split(",")
    run = find(docs, "Workflow")
    arguments = {p["name"]: p["value"] for p in run["spec"]["arguments"]["parameters"]}
    assert code == 0 and json.loads(arguments["tasks"]) == tasks
    committed = find(load_documents(REPO_ROOT / "pipelines/posttrain.yaml"), "Workflow")
    assert run["metadata"]["name"] != committed["metadata"]["name"]  # a new run, beside the committed file's
    assert embedded(docs, "deploy")["metadata"]["name"] == registered_name(tasks[0])  # the fan-out's first branch


def test_roll_back_targets_the_endpoint_the_deploy_step_makes():
    line = _line(r"lingbot promote --rollback")
    exec_part, restart_part = (shlex.split(p) for p in line.split(" && "))
    task = _option(exec_part, "--task")
    assert _option(restart_part, "-l") == f"serving.kserve.io/inferenceservice={registered_name(task)}"
    docs = load_documents(REPO_ROOT / "pipelines/posttrain.yaml")
    assert task in json.loads(find(docs, "WorkflowTemplate")["spec"]["arguments"]["parameters"][0]["value"])
