"""`lingbot train pretrain|posttrain`: parse -> settings -> train -> report (run it under torchrun for N ranks)."""

from __future__ import annotations

import argparse

from pipelines.settings import add_settings_flags, settings_from_flags
from pipelines.train.settings import STAGE_DEFAULTS, TrainSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pre-train or post-train with DeepSpeed, tracked in MLflow",
                           description="Train under torchrun (`torchrun --nproc_per_node N -m pipelines.cli train "
                                       "...`); every run is tracked in MLflow and its model registered.")
    stages = train.add_subparsers(dest="stage", required=True, metavar="{pretrain,posttrain}")
    for stage, help_ in (("pretrain", "pre-train on every task's latents (registers lingbot-va-base)"),
                         ("posttrain", "post-train one task from a pretrained model (registers lingbot-va-<task>)")):
        p = stages.add_parser(stage, help=help_, description=help_ + ". Unset flags fall back to LINGBOT_TRAIN_* "
                              "environment variables / .env, then to the defaults shown.")
        # the subcommand is the stage; pretraining takes no task and starts from scratch
        exclude = ("stage", "exclude_tasks") if stage == "posttrain" else ("stage", "task", "init_from")
        required = {"task": "required", "init_from": "required"} if stage == "posttrain" else {}
        add_settings_flags(p, TrainSettings, exclude=exclude, flags={"register_model": ["--register"]},
                           defaults={**STAGE_DEFAULTS[stage], **required})
        resume = p.add_mutually_exclusive_group()
        resume.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this run")
        resume.add_argument("--resume-if-present", dest="resume", action="store_const", const="auto",
                            help="continue from the latest checkpoint if there is one, else start (restartable pods)")
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipelines.train.trainer import train

    settings = settings_from_flags(TrainSettings, args, stage=args.stage)
    summary = train(settings, resume=args.resume)
    import os

    if int(os.environ.get("RANK", 0)) == 0:
        done = "finished" if summary["finished"] else "stopped"
        print(f"{settings.run_name} {done} at step {summary['step']}: loss {summary.get('loss', float('nan')):.4f}"
              + (f", val_loss {summary['val_loss']:.4f}" if "val_loss" in summary else "")
              + (f"; model {summary['model_dir']}" if "model_dir" in summary else ""))
    return 0
