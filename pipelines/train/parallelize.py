"""Parallelism and precision applied around the model (never inside its layers): DeepSpeed ZeRO + schedules.

The DeepSpeed config is built from typed settings (and logged with the run), so every knob that shaped a run is
recorded. DeepSpeed's JIT-compiled ops go under the repo's ignored data dir (``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

from pipelines.settings import REPO_ROOT
from pipelines.train.settings import TrainSettings


def use_bf16(settings: TrainSettings) -> bool:
    if settings.precision == "bf16":
        return True
    return settings.precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def deepspeed_config(settings: TrainSettings, world_size: int, *, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON config of a run (one packed micro-batch per rank per micro-step); ``load_universal`` for
    an engine that resumes from a universal checkpoint (one saved at another world size)."""
    zero: dict = {"stage": settings.zero_stage}
    if settings.zero_stage >= 2:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if settings.zero_stage == 3:
        # gather every parameter on use; keeps small CPU runs simple (no persistent threshold surprises)
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": settings.grad_accum,
        "train_batch_size": settings.grad_accum * world_size,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(settings)},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config


def lr_lambda(settings: TrainSettings):
    """Linear warmup, then cosine to min_lr_ratio (pretraining) or constant (post-training)."""
    warm, total, floor = settings.warmup_steps, settings.steps, settings.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if settings.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


log = logging.getLogger(__name__)
STALE_BUILD_LOCK_S = 600.0  # an op build takes about a minute on 2 cores; a lock this old is left by a killed build


def use_repo_ops_cache() -> None:
    """Point DeepSpeed's JIT-compiled ops (the CPU shm comm op is built by ``init_distributed``) at the repo's
    ignored cache unless the caller chose a dir; call before the first ``deepspeed`` call.

    A build killed half-way leaves ``<op>/lock`` behind, and torch then waits for it forever: such locks older than
    ``STALE_BUILD_LOCK_S`` are removed (with a warning) so the next run rebuilds instead of hanging silently."""
    root = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions")))
    for lock in root.glob("*/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
            if age > STALE_BUILD_LOCK_S:
                lock.unlink()
                log.warning("removed the stale build lock %s (%.0f s old, left by a killed build)", lock, age)
        except FileNotFoundError:  # another rank removed it or the build finished meanwhile
            pass


def build_engine(model: torch.nn.Module, settings: TrainSettings, world_size: int, *, load_universal: bool = False):
    """Wrap the model in a DeepSpeed engine with AdamW and the stage's schedule; returns (engine, ds_config)."""
    use_repo_ops_cache()
    import deepspeed

    model.activation_checkpointing = settings.activation_checkpointing
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "scale_shift_table" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(settings.beta1, settings.beta2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    config = deepspeed_config(settings, world_size, load_universal=load_universal)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine, config
