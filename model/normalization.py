"""Action normalisation shared by training and serving (PAPER.md: per-dimension quantiles from the training split).

    a_norm = clip((a - q01) / (q99 - q01 + 1e-6) * 2 - 1, -clip, clip)

The statistics travel in the model directory (``save_pretrained(normalization=...)``) so a served policy
de-normalises exactly as it was trained, whatever happens to the feature store later.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EPS = 1e-6


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
