"""Exponential moving average of the trained weights: what a run saves as its model.

Flow-matching and diffusion policies are sampled many times per episode, so the small step-to-step noise of the last
optimizer updates shows up as jittery, off-distribution action chunks; the average of the last few dozen updates is
the standard remedy (Diffusion Policy keeps an EMA model, openpi an ``ema_decay``). The decay warms up as
``min(decay, (1 + t) / (10 + t))`` so a short run (a 120-step post-training) averages over its last ~15 updates
rather than over its random start.

The average lives next to the parameters each rank owns: the full tensors under ZeRO-0/1/2 (identical on every
rank), the rank's partition (``ds_tensor``) under ZeRO-3, in fp32 whatever the training precision. ``swapped()``
puts it into the model for saving (ZeRO-3 then gathers the averaged shards) and restores the trained weights after.
It is saved beside each DeepSpeed checkpoint so ``--resume`` continues the same average; a checkpoint whose
average cannot be re-partitioned (ZeRO-3 at another world size) restarts it from the resumed weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _local(p: torch.nn.Parameter) -> torch.Tensor:
    """The part of ``p`` this rank owns: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class WeightEMA:
    """fp32 moving average of a module's parameters (the rank-local part of each)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.sharded = any(hasattr(p, "ds_tensor") for p in self.params)
        self.shadow = [_local(p).detach().float().clone() for p in self.params]
        self.updates = 0

    def rate(self) -> float:
        """This update's decay (warmed up over the first steps)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in; call once per optimizer step."""
        d = self.rate()
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(_local(p).float(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in the model for the duration of the block (saving, evaluation)."""
        backup = [_local(p).detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for s, p in zip(self.shadow, self.params, strict=True):
                    _local(p).copy_(s.to(_local(p).dtype))
            yield
        finally:
            with torch.no_grad():
                for b, p in zip(backup, self.params, strict=True):
                    _local(p).copy_(b)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _file(self, tag_dir: Path, rank: int) -> Path:
        return tag_dir / (f"ema_rank{rank:03d}.pt" if self.sharded else "ema.pt")

    def save(self, tag_dir: Path, rank: int, world: int) -> None:
        """Write the average into a checkpoint's tag directory (before DeepSpeed marks the checkpoint complete)."""
        if not self.sharded and rank != 0:
            return
        tag_dir.mkdir(parents=True, exist_ok=True)
        path = self._file(tag_dir, rank)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save({"decay": self.decay, "updates": self.updates, "world_size": world, "sharded": self.sharded,
                    "shadow": self.shadow}, tmp)
        os.replace(tmp, path)

    def load(self, tag_dir: Path | None, rank: int, world: int) -> bool:
        """Continue the average saved with a checkpoint; False (and the average restarted from the current weights)
        when there is none or its layout does not fit this run."""
        path = self._file(tag_dir, rank) if tag_dir is not None else None
        state = torch.load(path, map_location="cpu") if path is not None and path.is_file() else None
        ok = (state is not None and state["sharded"] == self.sharded
              and (not self.sharded or state["world_size"] == world)
              and [s.shape for s in state["shadow"]] == [s.shape for s in self.shadow])
        if not ok:
            if tag_dir is not None:
                log.warning("no usable weight average in %s (saved at another world size or by an older run): the "
                            "EMA restarts from the resumed weights", tag_dir)
            self.shadow = [_local(p).detach().float().clone() for p in self.params]
            self.updates = 0
            return False
        self.shadow = [s.float() for s in state["shadow"]]
        self.updates = int(state["updates"])
        return True
