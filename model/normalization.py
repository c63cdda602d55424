"""Action normalisation shared by training and serving (PAPER.md: per-dimension quantiles from the training split).

    a_norm = clip((a - q01) / (q99 - q01 + 1e-6) * 2 - 1, -clip, clip)

The statistics travel in the model directory (``model.bundle.PolicyBundle``, as ``EmbodimentNorm``) so a served policy
de-normalises exactly as it was trained, whatever happens to the feature store later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.config import ACTION_DIM

EPS = 1e-6
SNAPSHOT_FORMAT = "lingbot.features/v1"
"""``format`` of a feature snapshot (``pipelines.data.features.snapshot``): the per-embodiment features a model trained
with, as a policy bundle stores them."""


@dataclass(frozen=True)
class ActionNormalizer:
    """Quantile normaliser for unified 30-dim actions (mean/std are kept for reference and diagnostics)."""

    q01: np.ndarray
    q99: np.ndarray
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    clip: float = 1.5

    def __post_init__(self) -> None:
        q01, q99 = np.asarray(self.q01, np.float32), np.asarray(self.q99, np.float32)
        if q01.shape != q99.shape or q01.ndim != 1:
            raise ValueError(f"q01 and q99 must be 1-D of equal length, got {q01.shape} and {q99.shape}")
        if not (np.isfinite(q01).all() and np.isfinite(q99).all()):
            raise ValueError("normalisation quantiles contain NaN or inf")
        if (q99 < q01).any():
            raise ValueError(f"q99 < q01 for channels {np.nonzero(q99 < q01)[0].tolist()}")
        object.__setattr__(self, "q01", q01)
        object.__setattr__(self, "q99", q99)

    @classmethod
    def fit(cls, actions: np.ndarray, clip: float = 1.5) -> ActionNormalizer:
        """Statistics of (N, D) actions (the training split only)."""
        actions = np.asarray(actions, np.float64)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"need a non-empty (N, D) array of actions, got shape {actions.shape}")
        if not np.isfinite(actions).all():
            raise ValueError("actions contain NaN or inf")
        q01, q99 = np.quantile(actions, [0.01, 0.99], axis=0)
        return cls(q01, q99, actions.mean(0).astype(np.float32), actions.std(0).astype(np.float32), clip)

    def _scale(self, like):
        if isinstance(like, torch.Tensor):
            q01 = torch.as_tensor(self.q01, device=like.device, dtype=like.dtype)
            q99 = torch.as_tensor(self.q99, device=like.device, dtype=like.dtype)
            return q01, q99
        return self.q01, self.q99

    def normalize(self, a):
        """Native-scale unified actions (..., D) -> [-clip, clip]."""
        q01, q99 = self._scale(a)
        out = (a - q01) / (q99 - q01 + EPS) * 2 - 1
        return out.clamp(-self.clip, self.clip) if isinstance(out, torch.Tensor) else np.clip(out, -self.clip, self.clip)

    def denormalize(self, a):
        """Inverse of ``normalize`` (exact for values that were not clipped)."""
        q01, q99 = self._scale(a)
        return (a + 1) / 2 * (q99 - q01 + EPS) + q01

    def to_dict(self) -> dict:
        out = {"q01": self.q01.tolist(), "q99": self.q99.tolist(), "clip": self.clip}
        if self.mean is not None:
            out["mean"] = np.asarray(self.mean).tolist()
            out["std"] = np.asarray(self.std).tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ActionNormalizer:
        if not isinstance(d, dict) or "q01" not in d or "q99" not in d:
            raise ValueError("normalisation stats need 'q01' and 'q99'")
        mean = np.asarray(d["mean"], np.float32) if d.get("mean") is not None else None
        std = np.asarray(d["std"], np.float32) if d.get("std") is not None else None
        return cls(np.asarray(d["q01"]), np.asarray(d["q99"]), mean, std, float(d.get("clip", 1.5)))


@dataclass(frozen=True, eq=False)
class EmbodimentNorm:
    """One embodiment's action normalisation as a model trained with it (the normaliser and the channels it drives),
    read from the feature snapshot a policy bundle stores, which is kept verbatim (state stats, limits and task
    features travel with it, and a saved bundle writes it back unchanged)."""

    embodiment: str
    normalizer: ActionNormalizer
    action_mask: np.ndarray
    """(30,) bool, True on the unified channels the embodiment drives."""
    snapshot: Mapping[str, Any]

    @classmethod
    def from_normalizer(cls, embodiment: str, normalizer: ActionNormalizer, action_mask: np.ndarray) -> EmbodimentNorm:
        """Without a feature store (hand-made data, tests): a snapshot of the action stats and the mask alone."""
        stats = {"action_q01": normalizer.q01, "action_q99": normalizer.q99, "action_mean": normalizer.mean,
                 "action_std": normalizer.std}
        stats = {k: np.asarray(v, np.float32) for k, v in stats.items() if v is not None}
        snap = {"format": SNAPSHOT_FORMAT, "entities": {"embodiment": embodiment, "task": None},
                "dtypes": {"norm_stats": {k: "float32" for k in stats}, "embodiment": {"action_mask": "bool"}},
                "norm_stats": {k: v.tolist() for k, v in stats.items()},
                "embodiment": {"action_mask": np.asarray(action_mask, bool).tolist()}, "task": None}
        return cls.from_snapshot(snap)

    @classmethod
    def from_snapshot(cls, snap: Any, where: str = "normalization") -> EmbodimentNorm:
        """The normaliser of a feature snapshot (``format`` ``SNAPSHOT_FORMAT``); ``where`` names it in errors."""
        if not isinstance(snap, Mapping) or snap.get("format") != SNAPSHOT_FORMAT:
            found = sorted(snap) if isinstance(snap, Mapping) else type(snap).__name__
            raise ValueError(f"{where} must be a feature snapshot (format {SNAPSHOT_FORMAT!r}), found {found}")
        stats, features = snap.get("norm_stats"), snap.get("embodiment")
        name = (snap.get("entities") or {}).get("embodiment")
        if not isinstance(stats, Mapping) or not isinstance(features, Mapping) or not name:
            raise ValueError(f"{where}: a feature snapshot needs norm_stats, embodiment and entities.embodiment")
        missing = [f"norm_stats.{k}" for k in ("action_q01", "action_q99") if stats.get(k) is None]
        missing += [] if features.get("action_mask") is not None else ["embodiment.action_mask"]
        if missing:
            raise ValueError(f"{where}: the snapshot of {name!r} lacks {missing}")
        mask = np.asarray(features["action_mask"], bool)
        if mask.shape != (ACTION_DIM,):
            raise ValueError(f"{where}: action_mask of {name!r} must have {ACTION_DIM} entries, got shape {mask.shape}")

        def vector(key: str) -> np.ndarray | None:
            return None if stats.get(key) is None else np.asarray(stats[key], np.float32)

        normalizer = ActionNormalizer(vector("action_q01"), vector("action_q99"), vector("action_mean"),
                                      vector("action_std"))
        return cls(str(name), normalizer, mask, snap)
