"""`lingbot` command line: thin entry points that parse, build, run and clean up."""

from __future__ import annotations

import argparse
import json
import sys


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
    from pipelines.demo import run_demo

    run_demo(steps=args.steps, preset=args.preset, seed=args.seed, output=args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lingbot", description="LingBot-VA platform")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="inspect model presets").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="parameter counts of a preset (built on the meta device)")
    info.add_argument("--preset", required=True)
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

    demo = sub.add_parser("demo", help="train a model briefly on synthetic data and sample an action chunk")
    demo.add_argument("--preset", default="tiny")
    demo.add_argument("--steps", type=int, default=600)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--output", default="data/demo/model", help="where the trained model directory is saved")
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
