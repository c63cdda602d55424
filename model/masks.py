"""Token metadata and the chunk-wise causal attention rule shared by training, the KV cache and recompute.

Every token carries three integers:
  * ``chunk`` — the block id: video chunk c -> 2c, action chunk c -> 2c + 1 (chunk 0 is the first frame alone);
  * ``kind``  — which copy of the sequence it belongs to (see the constants below);
  * ``seg``   — the episode inside a packed row (-1 for padding).

The rule (reference teacher forcing, extended with the forward-dynamics copies):
  CLEAN   -> CLEAN with chunk <= own                  (block-causal history; inside a block: bidirectional)
  NOISY   -> CLEAN with chunk < own, NOISY same chunk  (video c sees actions < c; actions c see clean video c)
  FDM_ACT -> CLEAN with chunk < own - 1, FDM_ACT same  (executed actions of chunk c, blind to video c)
  FDM_VID -> CLEAN with chunk < own, FDM_ACT of own + 1, FDM_VID same chunk  (Eq. 13: video c given actions c)
Training, the KV-cache session and the no-cache recompute all evaluate this one function, which is why their
outputs agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLEAN, NOISY, FDM_ACT, FDM_VID, PAD = 0, 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class TokenMeta:
    """Per-token attributes, each a LongTensor (B, L)."""

    chunk: torch.Tensor
    kind: torch.Tensor
    seg: torch.Tensor

    @staticmethod
    def cat(metas: list[TokenMeta]) -> TokenMeta:
        metas = [m for m in metas if m is not None and m.chunk.shape[1] > 0]
        if not metas:
            raise ValueError("no tokens")
        return TokenMeta(*(torch.cat([getattr(m, f) for m in metas], dim=1) for f in ("chunk", "kind", "seg")))

    @staticmethod
    def full(batch: int, length: int, chunk: int, kind: int, seg: int = 0, device=None) -> TokenMeta:
        def fill(v: int) -> torch.Tensor:
            return torch.full((batch, length), v, dtype=torch.long, device=device)

        return TokenMeta(fill(chunk), fill(kind), fill(seg))

    def __getitem__(self, idx) -> TokenMeta:
        return TokenMeta(self.chunk[idx], self.kind[idx], self.seg[idx])

    @property
    def length(self) -> int:
        return self.chunk.shape[1]


def _rule(qc, qk, qs, kc, kk, ks, window_chunks: int | None):
    """The attention rule on broadcastable integer tensors (dense masks and flex-attention mask_mods share it)."""
    k_clean = kk == CLEAN
    rule = (
        ((qk == CLEAN) & k_clean & (kc <= qc))
        | ((qk == NOISY) & ((k_clean & (kc < qc)) | ((kk == NOISY) & (kc == qc))))
        | ((qk == FDM_ACT) & ((k_clean & (kc < qc - 1)) | ((kk == FDM_ACT) & (kc == qc))))
        | ((qk == FDM_VID) & ((k_clean & (kc < qc)) | ((kk == FDM_ACT) & (kc == qc + 1)) | ((kk == FDM_VID) & (kc == qc))))
    )
    if window_chunks is not None:
        rule = rule & (torch.div(qc, 2, rounding_mode="floor") - torch.div(kc, 2, rounding_mode="floor") < window_chunks)
    # padding queries attend to padding keys only so no softmax row is empty; nothing attends to padding
    return ((qs == ks) & (qs >= 0) & rule) | ((qk == PAD) & (kk == PAD))


def allowed(q: TokenMeta, k: TokenMeta, window_chunks: int | None = None) -> torch.Tensor:
    """Boolean attention mask (B, Lq, Lk): True where query may attend key."""
    qs = (t[:, :, None] for t in (q.chunk, q.kind, q.seg))
    ks = (t[:, None, :] for t in (k.chunk, k.kind, k.seg))
    return _rule(*qs, *ks, window_chunks)


def mask_mod(q: TokenMeta, k: TokenMeta, window_chunks: int | None = None):
    """The same rule as a flex-attention ``mask_mod(b, h, q_idx, kv_idx)`` (block-sparse path on GPU)."""

    def mod(b, h, qi, ki):
        return _rule(q.chunk[b, qi], q.kind[b, qi], q.seg[b, qi], k.chunk[b, ki], k.kind[b, ki], k.seg[b, ki],
                     window_chunks)

    return mod
