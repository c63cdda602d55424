"""DeepSpeed checkpoints of a training run, resumable at another world size (elastic pods, 4-8 nodes).

A ZeRO-1/2/3 checkpoint holds one optimizer partition per data-parallel rank, and DeepSpeed refuses to load it at
another world size. When the latest checkpoint's partition count differs from the current world size, rank 0 converts
it once into DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``: one file per parameter and
state, unpartitioned) under ``<checkpoints>/universal/<tag>``, and every rank loads that with
``checkpoint.load_universal``, which re-partitions weights and Adam moments for the new world size. The conversion is
reused by a second restart from the same checkpoint and removed once the run saves a newer one.

The trainer's own state (step, position in the data stream, MLflow run id) is world-size independent, so nothing
per rank has to be mapped onto the new ranks.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

UNIVERSAL = "universal"  # sub-directory of the conversions; its `latest_universal` is written last


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag DeepSpeed's ``latest`` pointer names (written only once a checkpoint is complete), or None."""
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def partitions(tag_dir: Path) -> int:
    """Data-parallel ranks a checkpoint was saved by: one ZeRO optimizer partition file each (0 without ZeRO,
    whose single optimizer state loads at any world size)."""
    return len(list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt")))


def resume_point(ckpt_dir: Path, resume: bool | str, world: int, rank: int) -> tuple[Path, bool] | None:
    """Where ``engine.load_checkpoint`` should read: ``(directory, universal)``, or None to start fresh.

    ``resume="auto"`` starts fresh when there is no checkpoint; ``resume=True`` requires one. A checkpoint saved at
    another world size is converted to a universal checkpoint first (rank 0; the others wait)."""
    if not resume:
        return None
    tag = latest_tag(ckpt_dir)
    if tag is None:
        if resume == "auto":
            return None
        raise ValueError(f"--resume: no checkpoint under {ckpt_dir}")
    saved = partitions(ckpt_dir / tag)
    if saved in (0, world):
        return ckpt_dir, False
    if rank == 0:
        print(f"checkpoint {tag} was saved by {saved} ranks, resuming on {world}: loading it as a universal "
              "checkpoint", flush=True)
        to_universal(ckpt_dir, tag)
    if dist.is_initialized():
        dist.barrier()
    return ckpt_dir / UNIVERSAL, True


def load(engine, directory: Path, universal: bool) -> dict:
    """Load the latest checkpoint under ``directory`` into the engine; returns the client state.

    Two repairs after DeepSpeed's ZeRO-3 universal load (0.19): it gives every optimizer parameter group the
    hyperparameters of the first one, which would put weight decay on the no-decay group (norms, biases, modulation
    tables), so the groups get back the ones the engine was built with (the run's settings; the learning rate is the
    scheduler's); and it hands one ``step`` tensor to the states of all parameter groups, which AdamW increments in
    place once per group, so each state gets its own copy (shared, the Adam bias correction of every group but the
    first would run ahead by one step per group and step)."""
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    built = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in optimizer.param_groups]
    path, client = engine.load_checkpoint(str(directory))
    if path is None:
        raise ValueError(f"--resume: could not load the checkpoint under {directory}")
    if universal:
        for group, hyper in zip(optimizer.param_groups, built, strict=True):
            group.update(hyper)
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    return client


def to_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert checkpoint ``tag`` into ``<ckpt_dir>/universal/<tag>`` unless a finished conversion is there."""
    from deepspeed.checkpoint import ds_to_universal

    root = ckpt_dir / UNIVERSAL
    out = root / tag
    pointer = root / "latest_universal"  # ds_to_universal writes it after the conversion is complete
    if pointer.is_file() and pointer.read_text().strip() == tag and out.is_dir():
        return out
    shutil.rmtree(root, ignore_errors=True)  # an older or half-written conversion
    root.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(ckpt_dir / tag), output_folder=str(out),
        # serial: worker processes forked from a rank that holds a process group are not safe
        num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True,
        # ZeRO-1/2 conversion asks for the model's universal-checkpoint metadata, which describes tensor-parallel
        # layouts; a purely data-parallel model has none to describe, so the converter's empty default is right
        inject_missing_state=True,
    )
    ds_to_universal.main(args)
    return out


def step_tag(step: int) -> str:
    """The tag (sub-directory) of the checkpoint saved at ``step``."""
    return f"step{step:07d}"


def save(engine, ckpt_dir: Path, step: int, client: dict, keep: int) -> None:
    """Save checkpoint ``step<step>`` (every rank), keep the newest ``keep`` and drop stale universal conversions."""
    engine.save_checkpoint(str(ckpt_dir), tag=step_tag(step), client_state=client)
    if int(os.environ.get("RANK", 0)) == 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / UNIVERSAL, ignore_errors=True)  # derived from an older checkpoint now
    if dist.is_initialized():
        dist.barrier()
