"""`lingbot train pretrain|posttrain`: parse -> settings -> train -> report (run it under torchrun for N ranks)."""

from __future__ import annotations

import argparse
from pathlib import Path

_FLAGS = {  # CLI flag -> (type, help); unset flags fall back to LINGBOT_TRAIN_* env vars, then defaults
    "preset": (str, "model preset (tiny, small, paper-5.3b)"),
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
    "ema_decay": (float, "EMA of the weights saved as the model (0: the last trained weights)"),
    "seed": (int, "seed"),
    "demos": (int, "train on the first N demos of each task (e.g. 10)"),
    "exclude_tasks": (lambda v: [t for t in v.split(",") if t], "pretraining: comma-separated tasks to leave out "
                      "(held-out-task runs)"),
    "objective": (str, "world_model (default) | reactive (the baseline)"),
    "tracking_uri": (str, "MLflow tracking URI"),
    "max_steps_this_run": (int, "stop after this many steps (resume later)"),
}


def _default(stage: str, name: str) -> str:
    """What an unset flag means for ``stage``: LINGBOT_TRAIN_<NAME>, else the stage's or the field's default."""
    from pipelines.train.settings import STAGE_DEFAULTS, TrainSettings

    field = TrainSettings.model_fields[name]
    value = STAGE_DEFAULTS[stage].get(name, field.default)
    env = f"LINGBOT_TRAIN_{name.upper()}"
    return f"default: ${env}, else {value}" if value is not None else f"default: ${env}, else unset"


def add_parser(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="pre-train or post-train with DeepSpeed, tracked in MLflow",
                           description="Train under torchrun (`torchrun --nproc_per_node N -m pipelines.cli train "
                                       "...`); every run is tracked in MLflow and its model registered.")
    stages = train.add_subparsers(dest="stage", required=True, metavar="{pretrain,posttrain}")
    for stage, help_ in (("pretrain", "pre-train on every task's latents (registers lingbot-va-base)"),
                         ("posttrain", "post-train one task from a pretrained model (registers lingbot-va-<task>)")):
        p = stages.add_parser(stage, help=help_, description=help_ + ". Unset flags fall back to LINGBOT_TRAIN_* "
                              "environment variables / .env, then to the defaults shown.")
        for name, (typ, flag_help) in _FLAGS.items():
            if (stage, name) in (("pretrain", "task"), ("pretrain", "init_from"), ("posttrain", "exclude_tasks")):
                continue
            if stage == "posttrain" and name in ("task", "init_from"):
                detail = f"required: the flag or $LINGBOT_TRAIN_{name.upper()}"
            else:
                detail = _default(stage, name)
            p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                           help=f"{flag_help} ({detail})")
        p.add_argument("--activation-checkpointing", action="store_true", default=None,
                       help="recompute each MoT layer in the backward pass (less memory, more compute)")
        p.add_argument("--save-raw", action="store_true", default=None,
                       help="with an EMA, also write the last trained weights to <run>/snapshots/raw (A/B runs)")
        p.add_argument("--no-register", dest="register_model", action="store_false", default=None,
                       help="do not log and register the final model in MLflow (default: register, alias challenger)")
        resume = p.add_mutually_exclusive_group()
        resume.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of this run")
        resume.add_argument("--resume-if-present", dest="resume", action="store_const", const="auto",
                            help="continue from the latest checkpoint if there is one, else start (restartable pods)")
        p.set_defaults(func=run, task=None, init_from=None, exclude_tasks=None)


def _validation_message(err) -> str:
    """pydantic's errors as the flags the user gave: ``--steps: Input should be greater than or equal to 1``."""
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e.get("loc", ()))
        message = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"--{field.replace('_', '-')}: {message}" if field else message)
    return "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipelines.train.settings import TrainSettings
    from pipelines.train.trainer import train

    overrides = {k: getattr(args, k) for k in [*_FLAGS, "activation_checkpointing", "register_model", "save_raw"]
                 if getattr(args, k) is not None}
    try:
        settings = TrainSettings(stage=args.stage, **overrides)
    except ValidationError as err:  # one line naming the flag, not pydantic's report
        raise ValueError(_validation_message(err)) from None
    summary = train(settings, resume=args.resume)
    import os

    if int(os.environ.get("RANK", 0)) == 0:
        done = "finished" if summary["finished"] else "stopped"
        print(f"{settings.run_name} {done} at step {summary['step']}: loss {summary.get('loss', float('nan')):.4f}"
              + (f", val_loss {summary['val_loss']:.4f}" if "val_loss" in summary else "")
              + (f"; model {summary['model_dir']}" if "model_dir" in summary else ""))
    return 0
