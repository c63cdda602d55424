"""What a model pass consumes: embedded ``Tokens`` of one stream, the ``KVCache`` of clean history, and flow time.

Flow time s in [0, 1]: s = 0 is noise, s = 1 data. The network keeps Wan's timestep t = 1000 * (1 - s).

Shape legend: B rows, L tokens, d width, H heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.masks import PAD, TokenMeta


def s_to_wan_t(s: torch.Tensor) -> torch.Tensor:
    """Flow time s (1 = data) -> Wan's timestep (0 = data, 1000 = noise)."""
    return 1000.0 * (1.0 - s)


@dataclass
class Tokens:
    """Embedded tokens of one stream for one model call."""

    x: torch.Tensor  # (B, L, d) embedded tokens
    t: torch.Tensor  # (B, L) Wan timesteps
    pos: torch.Tensor  # (B, L, 3) float RoPE positions (t, h, w)
    meta: TokenMeta

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def rows(self, rows: list[int]) -> Tokens:
        return Tokens(self.x[rows], self.t[rows], self.pos[rows], self.meta[rows])

    @staticmethod
    def cat(items: list[Tokens | None]) -> Tokens | None:
        """The given tokens one after another (dim L); None entries are skipped, None if nothing is left."""
        items = [t for t in items if t is not None]
        if not items:
            return None
        if len(items) == 1:
            return items[0]
        return Tokens(torch.cat([t.x for t in items], 1), torch.cat([t.t for t in items], 1),
                      torch.cat([t.pos for t in items], 1), TokenMeta.cat([t.meta for t in items]))

    @staticmethod
    def stack(items: list[Tokens]) -> Tokens:
        """Tokens of equal length stacked on the batch dim (one item: itself)."""
        if len(items) == 1:
            return items[0]
        meta = TokenMeta(*(torch.cat([getattr(t.meta, f) for t in items]) for f in ("chunk", "kind", "seg")))
        return Tokens(torch.cat([t.x for t in items]), torch.cat([t.t for t in items]),
                      torch.cat([t.pos for t in items]), meta)


class KVCache:
    """Per-layer keys/values (B, L, H, D) of clean history tokens, plus their metadata."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.meta: TokenMeta | None = None

    @property
    def length(self) -> int:
        return 0 if self.meta is None else self.meta.length

    def append(self, kv: list[tuple[torch.Tensor, torch.Tensor]], meta: TokenMeta) -> None:
        for i, (k, v) in enumerate(kv):
            self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], dim=1)
            self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], dim=1)
        self.meta = meta if self.meta is None else TokenMeta.cat([self.meta, meta])

    def extended(self, kv: list[tuple[torch.Tensor, torch.Tensor]], meta: TokenMeta) -> KVCache:
        """A new cache with ``kv`` appended; this one is left as it is (appends never write tensors in place)."""
        out = KVCache(len(self.k))
        out.k, out.v, out.meta = list(self.k), list(self.v), self.meta
        out.append(kv, meta)
        return out

    def keep(self, mask_L: torch.Tensor) -> None:
        """Keep only the tokens where mask_L is True (eviction / dropping provisional entries)."""
        if self.meta is None:
            return
        idx = mask_L.nonzero().squeeze(1)
        self.k = [k.index_select(1, idx) for k in self.k]
        self.v = [v.index_select(1, idx) for v in self.v]
        self.meta = self.meta[:, idx]

    def rows(self, rows: list[int]) -> KVCache:
        out = KVCache(len(self.k))
        if self.meta is not None:
            out.k = [k[rows] for k in self.k]
            out.v = [v[rows] for v in self.v]
            out.meta = self.meta[rows]
        return out

    @staticmethod
    def stack(caches: list[KVCache]) -> KVCache:
        """Caches stacked on the batch dim, each right-padded to the longest with zero keys/values and PAD metadata
        (one cache: itself)."""
        if len(caches) == 1:
            return caches[0]
        L = max(c.length for c in caches)
        out = KVCache(len(caches[0].k))
        for i in range(len(out.k)):
            # keys/values (B, L, H, D): pad dim 1 at its end
            out.k[i] = torch.cat([F.pad(c.k[i], (0, 0, 0, 0, 0, L - c.length)) for c in caches])
            out.v[i] = torch.cat([F.pad(c.v[i], (0, 0, 0, 0, 0, L - c.length)) for c in caches])
        out.meta = TokenMeta(*(torch.cat([F.pad(getattr(c.meta, f), (0, L - c.length), value=fill) for c in caches])
                               for f, fill in (("chunk", 0), ("kind", PAD), ("seg", -1))))
        return out
