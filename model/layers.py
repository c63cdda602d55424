"""Building blocks of the Mixture-of-Transformers: a Wan2.2 video block, a narrow action block, embeddings, RoPE.

Shape legend used in names: B batch rows, L tokens, T text tokens, H heads, D head dim, d_v / d_a stream widths.
Sub-module names of the video block follow diffusers' ``WanTransformerBlock`` (attn1, attn2, norm2, ffn,
scale_shift_table) so the weight adapter stays a short table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (Wan keeps its norms in fp32 for bf16 stability)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (flattened) timesteps in Wan's 0..1000 scale -> (N, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Linear -> activation -> Linear, the network's one two-layer perceptron. ``names``: the two layers' attribute
    names as the checkpoint this module loads from spells them (its state-dict keys).

    Uses: the paper's action encoder phi and decoder (hidden 256, SiLU), a block's feed-forward (GELU(tanh)), and,
    named ``linear_1``/``linear_2`` as diffusers names them, the timestep embedder (``TimestepEmbedding``, SiLU) and
    the text projection (``PixArtAlphaTextProjection``, GELU(tanh)).
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, activation: Callable[[torch.Tensor], torch.Tensor]
                 = F.silu, names: tuple[str, str] = ("fc1", "fc2")):
        super().__init__()
        self.names, self.activation = names, activation
        setattr(self, names[0], nn.Linear(in_dim, hidden))
        setattr(self, names[1], nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (getattr(self, name) for name in self.names)
        return second(self.activation(first(x)))


DIFFUSERS_NAMES = ("linear_1", "linear_2")


class TimeConditioning(nn.Module):
    """Per-token timestep conditioning: returns temb (B, L, d) and the 6-way modulation (B, L, 6, d).

    Timesteps take few distinct values (one per chunk and copy), so the MLPs run on the unique values only and
    the result is gathered back; at 10K tokens and d = 3072 this avoids a 0.7 GB modulation tensor per row.
    """

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = MLP(freq_dim, dim, dim, F.silu, DIFFUSERS_NAMES)
        self.time_proj = nn.Linear(dim, 6 * dim)

    def forward(self, t_BL: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        uniq, inverse = torch.unique(t_BL, return_inverse=True)
        sin = timestep_sinusoid(uniq, self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb_U = self.time_embedder(sin).to(dtype)
        proj_U = self.time_proj(F.silu(temb_U)).unflatten(-1, (6, -1))
        if uniq.numel() > 256:  # e.g. Wan's per-token timesteps: a plain gather
            return temb_U[inverse], proj_U[inverse]
        # few distinct values: gather by a one-hot matmul, whose backward is a matmul too (an indexing backward
        # is an accumulate-scatter onto a handful of rows, ~4% of a GPU training step)
        onehot = F.one_hot(inverse, uniq.numel()).to(temb_U.dtype)
        return onehot @ temb_U, (onehot @ proj_U.flatten(1)).unflatten(-1, (6, -1))


class RotaryEmbedding3D(nn.Module):
    """Wan's 3-D RoPE (t, h, w axes split the head dim), evaluated at arbitrary float positions.

    Float positions let action tokens sit at fractional times between latent frames. Angles are computed in
    float64 like diffusers' tables, so integer positions reproduce Wan exactly.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        hw = 2 * (head_dim // 6)
        self.split = (head_dim - 2 * hw, hw, hw)
        inv = [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64)[: d // 2] / d) for d in self.split]
        self.register_buffer("inv_freq_t", inv[0], persistent=False)
        self.register_buffer("inv_freq_h", inv[1], persistent=False)
        self.register_buffer("inv_freq_w", inv[2], persistent=False)

    def forward(self, pos_L3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos (..., 3) float -> cos, sin (..., head_dim/2) float32, one value per rotated pair."""
        pos = pos_L3.to(torch.float64)
        ang = torch.cat(
            [pos[..., 0:1] * self.inv_freq_t, pos[..., 1:2] * self.inv_freq_h, pos[..., 2:3] * self.inv_freq_w],
            dim=-1,
        )
        return torch.cos(ang).float(), torch.sin(ang).float()


def apply_rope(x_BLHD: torch.Tensor, cos_BLP: torch.Tensor, sin_BLP: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... as diffusers' Wan processor does."""
    x1, x2 = x_BLHD.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos_BLP.unsqueeze(-2), sin_BLP.unsqueeze(-2)  # broadcast over heads
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x_BLHD)


class Attention(nn.Module):
    """Q/K/V/O projections with RMS q/k norm across heads (WanAttention's parameter layout)."""

    def __init__(self, dim: int, heads: int, eps: float, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim or dim, dim)
        self.to_v = nn.Linear(kv_dim or dim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def qkv(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        ctx = x if ctx is None else ctx
        q = self.norm_q(self.to_q(x)).unflatten(-1, (self.heads, -1))
        k = self.norm_k(self.to_k(ctx)).unflatten(-1, (self.heads, -1))
        v = self.to_v(ctx).unflatten(-1, (self.heads, -1))
        return q, k, v

    def cross(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x, ctx)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=None if mask is None else mask[:, None]
        )
        return self.to_out(out.transpose(1, 2).flatten(2).type_as(x))


class Modulation(nn.Module):
    """A block's learned shift/scale/gate table added to the per-token timestep projection.

    A module of its own (not a bare parameter of the block) so that ZeRO-3, which gathers a module's parameters
    around its ``forward``, sees every use of it.
    """

    def __init__(self, dim: int, n: int = 6):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(1, n, dim) / dim**0.5)

    def forward(self, proj_BLnd: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, L, n, d) projection -> n tensors (B, L, d) in fp32."""
        table = self.scale_shift_table
        return tuple(m.squeeze(2) for m in (table.unsqueeze(0) + proj_BLnd.float()).chunk(table.shape[1], dim=2))


class VideoBlock(nn.Module):
    """One Wan2.2 transformer block, split around the joint self-attention that the MoT layer runs."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, eps: float):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = Attention(dim, heads, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.attn2 = Attention(dim, heads, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = MLP(dim, ffn_dim, dim, gelu_tanh)
        self.modulation = Modulation(dim)

    def pre_attention(self, x_BLd: torch.Tensor, proj_BL6d: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple]:
        mod = self.modulation(proj_BL6d)
        shift, scale = mod[0], mod[1]
        h = (self.norm1(x_BLd.float()) * (1 + scale) + shift).type_as(x_BLd)
        return self.attn1.qkv(h), mod

    def post_attention(
        self, x_BLd: torch.Tensor, attn_BLd: torch.Tensor, mod: tuple, ctx_BTd: torch.Tensor,
        ctx_mask_BLT: torch.Tensor | None,
    ) -> torch.Tensor:
        _, _, gate, c_shift, c_scale, c_gate = mod
        x = (x_BLd.float() + self.attn1.to_out(attn_BLd) * gate).type_as(x_BLd)
        x = x + self.attn2.cross(self.norm2(x.float()).type_as(x), ctx_BTd, ctx_mask_BLT)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class ActionBlock(nn.Module):
    """The action stream's block at width d_a.

    Own Q/K/V/O and FFN at d_a; Q/K/V are lifted into the video's attention space (d_v = heads x head_dim) by one
    up-projection so action tokens join the video tokens in a single self-attention, and the attention result is
    projected back to d_a before the action's own output projection and residual.
    """

    def __init__(self, dim: int, video_dim: int, ffn_dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, video_dim, bias=False)
        self.norm_q = nn.RMSNorm(video_dim, eps=eps)
        self.norm_k = nn.RMSNorm(video_dim, eps=eps)
        self.down = nn.Linear(video_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = MLP(dim, ffn_dim, dim, gelu_tanh)
        self.modulation = Modulation(dim)

    def pre_attention(self, x_BLd: torch.Tensor, proj_BL6d: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple]:
        mod = self.modulation(proj_BL6d)
        h = (self.norm1(x_BLd.float()) * (1 + mod[1]) + mod[0]).type_as(x_BLd)
        q = self.norm_q(self.up(self.to_q(h))).unflatten(-1, (self.heads, -1))
        k = self.norm_k(self.up(self.to_k(h))).unflatten(-1, (self.heads, -1))
        v = self.up(self.to_v(h)).unflatten(-1, (self.heads, -1))
        return (q, k, v), mod

    def post_attention(self, x_BLd: torch.Tensor, attn_BLD: torch.Tensor, mod: tuple) -> torch.Tensor:
        _, _, gate, c_shift, c_scale, c_gate = mod
        x = (x_BLd.float() + self.to_out(self.down(attn_BLD)) * gate).type_as(x_BLd)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


class MoTBlock(nn.Module):
    """One layer of the Mixture-of-Transformers: separate video/action weights, one joint self-attention."""

    def __init__(self, video: VideoBlock, action: ActionBlock):
        super().__init__()
        self.video = video
        self.action = action


class OutputHead(nn.Module):
    """Final adaLN (shift/scale from temb) followed by a projection module."""

    def __init__(self, dim: int, proj: nn.Module, eps: float):
        super().__init__()
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.proj = proj
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x_BLd: torch.Tensor, temb_BLd: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb_BLd.unsqueeze(2)).chunk(2, dim=2)
        h = (self.norm_out(x_BLd.float()) * (1 + scale.squeeze(2)) + shift.squeeze(2)).type_as(x_BLd)
        return self.proj(h)

