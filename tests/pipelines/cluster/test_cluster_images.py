"""Container images without a Docker engine: each Dockerfile parses, copies files that exist (and that the
.dockerignore lets through), runs the `lingbot` CLI as a non-root user; every platform image the manifests use (the
pipelines, the kustomize sets, the chart) is one `make images` builds, tagged from the same settings."""

import fnmatch
import json
import os
import re
import shutil
import subprocess

import pytest
from cluster_docs import default_settings, embedded, find, infra_checks, infra_documents, render_documents

from pipelines.cluster.images import CPU_IMAGE, GPU_IMAGE, IMAGES
from pipelines.cluster.render import image_builds
from pipelines.settings import REPO_ROOT

ALL_SETS = infra_checks().ALL_SETS

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text):
    """[(INSTRUCTION, arguments)] with comments dropped and backslash continuations joined."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the file ends inside a continued line"
    return out


def _copy_sources(rest):
    parts = [p for p in rest.split() if not p.startswith("--")]
    return parts[:-1]


def _dockerignore_allows(path):
    """Docker's last-match-wins rule over the root .dockerignore (patterns relative to the context root)."""
    allowed = True
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/") or pattern == "*":
            allowed = negate
    return allowed


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_builds_the_package_and_runs_lingbot_as_non_root(image):
    path = REPO_ROOT / IMAGES[image]
    instructions = parse_dockerfile(path.read_text())
    names = [word for word, _ in instructions]
    assert set(names) <= INSTRUCTIONS, set(names) - INSTRUCTIONS
    assert names[0] in ("ARG", "FROM") and "FROM" in names
    first_from = names.index("FROM")
    assert all(n == "ARG" for n in names[:first_from]), "only ARG may precede the first FROM"

    stages = [rest.split()[-1] for word, rest in instructions if word == "FROM" and " AS " in rest.upper()]
    for word, rest in instructions:
        if word == "COPY" and "--from=" not in rest:
            for source in _copy_sources(rest):
                assert (REPO_ROOT / source).exists(), f"{path.name}: COPY {source}: no such file"
                assert _dockerignore_allows(source), f"{path.name}: COPY {source} is excluded by .dockerignore"
        if word == "COPY" and "--from=" in rest:
            assert re.search(r"--from=(\S+)", rest).group(1) in stages
    installs = [rest for word, rest in instructions if word == "RUN" and "pip install" in rest]
    assert any(re.search(r"pip install .*(--editable )?\.$", r) for r in installs), "must install the project itself"
    labels = " ".join(rest for word, rest in instructions if word == "LABEL")
    assert f'org.opencontainers.image.title="{image}"' in labels

    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM"):]
    user = [rest for word, rest in final if word == "USER"]
    assert user and user[-1].split(":")[0] == str(default_settings().run_as_user), "must run as the non-root uid"
    assert json.loads(dict(final)["ENTRYPOINT"]) == ["lingbot"]
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "MUJOCO_GL=osmesa" in env and "libosmesa6" in (REPO_ROOT / IMAGES[image]).read_text()
    assert "LINGBOT_DATA_DIR=/home/lingbot/data" in env  # writable by the non-root user


def _images_in(node, params):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield re.sub(r"\{\{workflow\.parameters\.([\w-]+)\}\}", lambda m: params[m.group(1)], value)
            else:
                yield from _images_in(value, params)
    elif isinstance(node, list):
        for value in node:
            yield from _images_in(value, params)


def _pipeline_images(settings):
    used = set()
    for docs in render_documents(settings).values():
        wt = find(docs, "WorkflowTemplate")
        params = {p["name"]: p["value"] for p in wt["spec"]["arguments"]["parameters"]}
        used |= set(_images_in(docs, params))
        for t in wt["spec"]["templates"]:
            if "resource" in t:
                used |= set(_images_in(embedded(docs, t["name"]), params))
    return used


def test_every_image_the_manifests_use_is_built_here():
    settings = default_settings()
    built = {image for _, image in image_builds(settings)}
    assert _pipeline_images(settings) == {settings.image(CPU_IMAGE), settings.image(GPU_IMAGE)} == built
    # another registry and tag (LINGBOT_CLUSTER_REGISTRY / _TAG): the manifests and `make images` follow together
    moved = default_settings(registry="registry.example.internal/lingbot", tag="2.0.0")
    assert _pipeline_images(moved) == {image for _, image in image_builds(moved)}


@pytest.mark.parametrize("name", ALL_SETS)
def test_every_platform_image_of_the_infra_is_one_make_images_builds(name):
    """The kustomize sets and the chart (every CI values file) run only images `make images` builds: with the
    default settings, the very references; under another registry (ci/edge-values.yaml), the same names and tag."""
    settings = default_settings()
    docs = infra_documents(name)
    ours = {image for image in _images_in(docs, {}) if image.rpartition("/")[2].startswith("lingbot")}
    assert ours, f"{name} runs no platform image"
    for image in ours:
        registry, _, rest = image.rpartition("/")
        built = {ref for _, ref in image_builds(default_settings(registry=registry, tag=rest.partition(":")[2]))}
        assert image in built, f"{name}: {image} is no image `make images` builds ({sorted(built)})"
        if name.startswith("kustomize") or name == "chart-default":
            assert image in {ref for _, ref in image_builds(settings)}, f"{name}: {image} is not the settings' tag"


def test_make_images_builds_the_listed_images_with_docker():
    """`make images` (dry run: no Docker engine here) builds each `<Dockerfile> <image>` line of `lingbot render
    --images` from the repository root, and the shell it runs is valid."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # a fresh make, not a sub-make of `make test` (whose MAKELEVEL/MAKEFLAGS add "Entering directory" lines)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run([make, "-n", "--no-print-directory", "-o", ".venv/.installed", "images"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    script = done.stdout
    assert script.startswith(".venv/bin/lingbot render --images | while read -r dockerfile image; do")
    assert 'docker build -f "$dockerfile" -t "$image" . || exit 1' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    for dockerfile, _ in image_builds(default_settings()):
        assert (REPO_ROOT / dockerfile).is_file()


def test_parser_rejects_what_docker_would():
    with pytest.raises(AssertionError):
        parse_dockerfile("FROM python:3.11 \\\n")
    assert parse_dockerfile("# c\nFROM a AS b\nRUN x \\\n  # note\n  && y\n") == [("FROM", "a AS b"), ("RUN", "x && y")]
