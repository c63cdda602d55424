"""`lingbot evaluate` (closed-loop rollouts + the promotion gate) and `lingbot promote --rollback`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.evaluate.settings import EvalSettings, GateSettings
from pipelines.settings import PlatformSettings, add_settings_flags, settings_from_flags

QUICK_EPISODES = 5


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="roll a model out in Meta-World and gate its promotion to champion")
    ev.add_argument("--model", required=True, help="models:/lingbot-va-<task>@challenger, models:/<name>/<version> "
                                                   "or a model directory")
    ev.add_argument("--task", action="append", required=True, help="Meta-World task (repeat for several)")
    ev.add_argument("--quick", action="store_true", help=f"{QUICK_EPISODES} episodes per task")
    ev.add_argument("--out", type=Path, default=None,
                    help="write the report JSON here (dvc metrics), and beside it <name>.csv (success per task) and "
                         "<name>-latency.csv (planning latency per task) for dvc plots")
    ev.add_argument("--no-gate", dest="gate", action="store_false", help="report only; never touch the registry")
    ev.add_argument("--no-fail", action="store_true",
                    help="exit 0 when the gate rejects (the decision is in the report and MLflow); for pipelines")
    add_settings_flags(ev, EvalSettings)
    ev.set_defaults(func=evaluate_command)

    pr = sub.add_parser("promote", help="show or move registry aliases by hand (champion, rollback)",
                        description="Aliases of lingbot-va-<task> (or --name): --show lists them; --version N "
                                    "points --alias (default champion) at version N, keeping the replaced champion "
                                    "as previous-champion; --rollback makes previous-champion the champion again.")
    who = pr.add_mutually_exclusive_group(required=True)
    who.add_argument("--task", help="the task whose lingbot-va-<task> model to act on")
    who.add_argument("--name", help="registered model name")
    what = pr.add_mutually_exclusive_group(required=True)
    what.add_argument("--show", action="store_true", help="print the aliases and versions (JSON)")
    what.add_argument("--version", help="the version to point --alias at")
    what.add_argument("--rollback", action="store_true", help="restore previous-champion as champion")
    pr.add_argument("--alias", default="champion", help="alias that --version moves (default: champion; moving "
                                                        "champion keeps the old one as previous-champion)")
    add_settings_flags(pr, GateSettings, fields=PlatformSettings.model_fields)  # the registry, not the rule
    pr.set_defaults(func=promote_command)


def evaluate_command(args: argparse.Namespace) -> int:
    import mlflow
    from tqdm import tqdm

    from pipelines.evaluate.rollout import evaluate, plot_csv, table
    from pipelines.tracking_store import resolve_model

    settings = settings_from_flags(EvalSettings, args)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    model_dir, name, version = resolve_model(args.model, settings.data_dir)
    episodes = QUICK_EPISODES if args.quick else settings.episodes
    video_dir = settings.data_dir / "eval" / (f"{name}-v{version}" if name else Path(model_dir).name) / settings.mode
    bar = tqdm(total=episodes * len(args.task), desc=f"evaluate[{settings.mode}]", unit="ep", disable=None)
    report = evaluate(model_dir, args.task, episodes=episodes, mode=settings.mode, eval_seed=settings.eval_seed,
                      workers=settings.workers, max_steps=settings.max_steps, control_rate_hz=settings.control_rate_hz,
                      videos_per_task=settings.videos, failure_videos_per_task=settings.failure_videos,
                      video_dir=video_dir, progress=lambda _r: bar.update(1))
    bar.close()
    report.update(model_uri=str(args.model), registered_name=name, model_version=version)
    print(table(report))
    code = 0
    if not args.gate or name is None:
        print("gate skipped" + ("" if args.gate else " (--no-gate)") + (": not a registry model" if name is None else ""))
    else:
        from pipelines.evaluate.gate import gate

        videos = [Path(v) for t in report["tasks"].values() for v in t["videos"]]
        decision = gate(report, settings, videos=videos)
        report["gate"] = {"passed": decision.passed, "reasons": list(decision.reasons)}
        verdict = "PASS: promoted to champion" if decision.passed else "FAIL: champion unchanged"
        print(f"gate {name} v{version}: {verdict}")
        for reason in decision.reasons:
            print(f"  - {reason}")
        code = 0 if decision.passed or args.no_fail else 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        success, latency = plot_csv(report)
        args.out.with_suffix(".csv").write_text(success)
        args.out.with_name(f"{args.out.stem}-latency.csv").write_text(latency)
    return code


def promote_command(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines.evaluate.gate import aliases, promote, rollback
    from pipelines.train.registry import registered_name_for

    settings = settings_from_flags(GateSettings, args, fields=PlatformSettings.model_fields)
    mlflow.set_tracking_uri(settings.mlflow_uri)
    client = mlflow.MlflowClient()
    name = args.name or registered_name_for("posttrain", args.task)
    if args.show:
        print(json.dumps({"registered_name": name, "aliases": aliases(client, name)}, indent=1))
    elif args.rollback:
        restored = rollback(client, name)
        print(f"{name}: champion is version {restored} again (the replaced one is now previous-champion)")
    else:
        replaced = promote(client, name, args.version, alias=args.alias)
        print(f"{name}: {args.alias} is version {args.version}"
              + (f" (was {replaced}; now previous-champion)" if replaced and args.alias == "champion" else ""))
    return 0
