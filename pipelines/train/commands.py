"""`lingbot train pretrain|posttrain`: parse -> settings -> train -> report (run it under torchrun for N ranks)."""

from __future__ import annotations

import argparse
from pathlib import Path

_FLAGS = {  # CLI flag -> (type, help); unset flags fall back to LINGBOT_TRAIN_* env vars, then defaults
    "preset": (str, "model preset"),
    "task": (str, "post-training task"),
    "init_from": (str, "model directory or models:/<name>@<alias> to start from (post-training)"),
    "data_dir": (Path, "data root (latents, feast, runs, mlflow)"),
    "latents_dir": (Path, "encoded latents"),
    "run_dir": (Path, "checkpoints + final model"),
    "steps": (int, "optimizer steps"),
    "lr": (float, "peak learning rate"),
    "warmup_steps": (int, "linear warmup steps"),
    "grad_accum": (int, "micro-batches per step"),
    "token_budget": (int, "tokens per packed sequence"),
    "rows": (int, "packed sequences per micro-batch"),
    "fdm_loss_weight": (float, "L_fdm weight (stage default: 0 pretraining, 1 post-training)"),
    "zero_stage": (int, "DeepSpeed ZeRO stage 0-3"),
    "precision": (str, "auto | fp32 | bf16"),
    "checkpoint_every": (int, "checkpoint interval"),
    "val_every": (int, "validation interval"),
    "episode_start_prob": (float, "probability that a window starts at its episode's first frame"),
    "snapshot_every": (int, "also write a model directory every N steps (learning curves)"),
    "seed": (int, "seed"),
    "demos": (int, "train on the first N demos of each task (e.g. 10)"),
    "objective": (str, "world_model (default) | reactive (the baseline)"),
    "tracking_uri": (str, "MLflow tracking URI"),
    "max_steps_this_run": (int, "stop after this many steps (resume later)"),
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pre-train or post-train with DeepSpeed, tracked in MLflow")
    train.add_argument("stage", choices=["pretrain", "posttrain"])
    for name, (typ, help_) in _FLAGS.items():
        train.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    train.add_argument("--activation-checkpointing", action="store_true", default=None)
    train.add_argument("--no-register", dest="register_model", action="store_false", default=None)
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this run")
    resume.add_argument("--resume-if-present", dest="resume", action="store_const", const="auto",
                        help="continue from the latest checkpoint if there is one, else start (restartable pods)")
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipelines.train.settings import TrainSettings
    from pipelines.train.trainer import train

    overrides = {k: getattr(args, k) for k in [*_FLAGS, "activation_checkpointing", "register_model"]
                 if getattr(args, k) is not None}
    try:
        settings = TrainSettings(stage=args.stage, **overrides)
    except ValidationError as err:  # pydantic's message names the field; surface it as a user error
        raise ValueError(str(err).replace("\n", " ")) from None
    summary = train(settings, resume=args.resume)
    import os

    if int(os.environ.get("RANK", 0)) == 0:
        done = "finished" if summary["finished"] else "stopped"
        print(f"{settings.run_name} {done} at step {summary['step']}: loss {summary.get('loss', float('nan')):.4f}"
              + (f", val_loss {summary['val_loss']:.4f}" if "val_loss" in summary else "")
              + (f"; model {summary['model_dir']}" if "model_dir" in summary else ""))
    return 0
