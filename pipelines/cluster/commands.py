"""`lingbot render [--check] [--validate] [--print FILE] [--images] [--robot-env TASK]`: write the cluster manifests
from typed objects and ClusterSettings."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.settings import REPO_ROOT


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pipelines.cluster.render import OUTPUTS

    p = sub.add_parser("render", help="render pipelines/posttrain.yaml, pipelines/pretrain.yaml and the kustomize "
                                      "base's policy.yaml (settings: LINGBOT_CLUSTER_* env vars)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file differs")
    p.add_argument("--validate", action="store_true",
                   help="also validate the manifests offline (Kubernetes schemas, CRDs, admission rules)")
    p.add_argument("--print", dest="print_file", choices=sorted(OUTPUTS), default=None,
                   help="write nothing; print this file as rendered now (pipe it to `kubectl apply -f -`)")
    p.add_argument("--images", action="store_true",
                   help="write nothing; print `<Dockerfile> <image>` of every image the manifests reference "
                        "(what `make images` builds)")
    p.add_argument("--robot-env", metavar="TASK", default=None,
                   help="write nothing; print the LINGBOT_ROBOT_* settings of a robot served by TASK's deployed "
                        "endpoint (stable and canary Services, the share of episodes on the canary)")
    p.add_argument("--crds-dir", type=Path, default=None, help="CRD folder (default: ../shared/crds)")
    p.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root the files live under")
    p.set_defaults(func=render_command)


def render_command(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipelines.cluster.render import check, image_builds, render, write
    from pipelines.cluster.settings import ClusterSettings

    try:
        settings = ClusterSettings()
    except ValidationError as err:  # pydantic names the field; one line for the user
        raise ValueError(str(err).replace("\n", " ")) from None
    if args.robot_env:
        from pipelines.cluster.manifests import robot_env

        if args.robot_env not in settings.tasks:
            raise ValueError(f"--robot-env {args.robot_env}: not one of the deployed tasks {settings.tasks} "
                             "(LINGBOT_CLUSTER_TASKS)")
        for key, value in robot_env(settings, args.robot_env).items():
            print(f"{key}={value}")
        return 0
    if args.images:
        for dockerfile, image in image_builds(settings):
            print(dockerfile, image)
        return 0
    if args.print_file:
        print(render(settings)[args.print_file], end="")
        return 0
    code = 0
    if args.validate:
        code = _validate(render(settings), args.crds_dir)
    if args.check:
        stale = check(args.root, settings)
        for path in stale:
            print(f"{path}: differs from what `lingbot render` produces; run it and commit the result")
        if not stale:
            print("rendered manifests are up to date")
        return 1 if stale else code
    for path in write(args.root, settings):
        print(f"wrote {path}")
    return code


def _validate(rendered: dict[str, str], crds_dir: Path | None) -> int:
    import yaml

    from pipelines.cluster.schemas import DEFAULT_CRDS_DIR, find_crds_dir
    from pipelines.cluster.validate import validate_documents

    if find_crds_dir(crds_dir) is None:
        raise ValueError(f"no CRD folder at {crds_dir or DEFAULT_CRDS_DIR}; pass --crds-dir")
    bad = 0
    for path, text in rendered.items():
        problems = validate_documents([d for d in yaml.safe_load_all(text) if d], crds_dir=crds_dir)
        for problem in problems:
            print(f"{path}: {problem}")
        bad += len(problems)
    print(f"validation: {bad} problem(s)")
    return 1 if bad else 0
