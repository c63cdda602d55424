"""`lingbot` command line: thin entry points that parse, build, run and clean up."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _model_info(args: argparse.Namespace) -> int:
    from pipelines.model_info import model_info

    info = model_info(args.preset)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:>22}: {value:,}" if isinstance(value, int) else f"{key:>22}: {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DEFAULT_PARAMS, default_workspace, load_params, run_demo, stop_ui

    if args.stop:
        for workspace in [args.workspace] if args.workspace else [default_workspace(False), default_workspace(True)]:
            pid = stop_ui(workspace.resolve())
            print(f"stopped the MLflow UI of {workspace} (pid {pid})" if pid else f"no MLflow UI of {workspace} running")
        return 0
    params = load_params(args.params or DEFAULT_PARAMS, quick=args.quick)
    try:
        run_demo(params, args.workspace or default_workspace(args.quick), ui_port=args.ui_port)
    except (RuntimeError, TimeoutError) as err:  # a failed stage or service: its log is named, no traceback
        print(f"lingbot demo: error: {err}", file=sys.stderr)
        return 1
    return 0


def _version() -> str:
    """The installed distribution's version (pyproject's when run from a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lingbot-va-platform")
    except PackageNotFoundError:
        import tomllib

        from pipelines.settings import REPO_ROOT

        return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lingbot", description="LingBot-VA platform: data, training, gate, "
                                                                 "registry and serving of video-action policies")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect model presets").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="parameter counts of a preset (built on the meta device)")
    info.add_argument("--preset", required=True, help="model preset: tiny, small or paper-5.3b")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_model_info)

    from pipelines.data.commands import add_parser as add_data_parser

    add_data_parser(sub)
    from pipelines.train.commands import add_parser as add_train_parser

    add_train_parser(sub)
    from pipelines.evaluate.commands import add_parser as add_evaluate_parser

    add_evaluate_parser(sub)
    from pipelines.cluster.commands import add_parser as add_render_parser

    add_render_parser(sub)
    from services.policy_server.commands import add_parser as add_serve_parser

    add_serve_parser(sub)
    from services.fleet.commands import add_parser as add_fleet_parser

    add_fleet_parser(sub)
    from pipelines.settings_reference import add_parser as add_settings_parser

    add_settings_parser(sub)

    demo = sub.add_parser("demo", help="the whole lifecycle on this machine: dvc repro (data, training, gate), "
                                       "lingbot serve, a simulated fleet, a summary and the MLflow UI")
    demo.add_argument("--quick", action="store_true",
                      help="the reduced configuration (tiny model, 1 task, 3 demos, 32 px; a few minutes)")
    demo.add_argument("--params", type=Path, default=None, help="the demo's parameters (default: "
                                                                   "pipelines/demo_params.yaml)")
    demo.add_argument("--workspace", type=Path, default=None,
                      help="its DVC workspace (default data/demo; data/demo-quick with --quick)")
    demo.add_argument("--ui-port", type=int, default=None, help="MLflow UI port (default: the params'; 0: any free)")
    demo.add_argument("--stop", action="store_true", help="stop the MLflow UI a demo left running, and exit")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # user mistakes: one clear line, no traceback
        print(f"lingbot: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
