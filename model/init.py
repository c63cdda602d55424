"""Action-stream initialisation from the video stream (paper §3.3, Fig. 7).

Every action weight that has a video counterpart is that video weight interpolated to the action width and
scaled by alpha = sqrt(d_v / d_a). Interpolation is nearest-exact: it keeps the entries' statistics, so alpha
exactly compensates the smaller fan-in (at an exact 4x ratio, (bi)linear interpolation would average 2x2 entries and
shrink the output variance another 4x). The up/down projections between the widths start as the same
nearest-exact resampling operators, so at init the action stream behaves like a coarse copy of the video stream.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.layers import ActionBlock, VideoBlock


def _nearest_index(n_out: int, n_in: int, device=None) -> torch.Tensor:
    return ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * n_in / n_out).floor().long()


def resample(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Nearest-exact resampling of a tensor to ``shape`` (same rank)."""
    out = w
    for dim, n in enumerate(shape):
        if out.shape[dim] != n:
            out = out.index_select(dim, _nearest_index(n, out.shape[dim], out.device))
    return out


def resampling_operator(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) 0/1 matrix that picks the nearest input coordinate for each output coordinate."""
    op = torch.zeros(n_out, n_in)
    op[torch.arange(n_out), _nearest_index(n_out, n_in)] = 1.0
    return op


@torch.no_grad()
def _copy_linear(dst: nn.Linear, src: nn.Linear, alpha: float) -> None:
    dst.weight.copy_(resample(src.weight, tuple(dst.weight.shape)) * alpha)
    if dst.bias is not None and src.bias is not None:
        dst.bias.copy_(resample(src.bias, tuple(dst.bias.shape)))


@torch.no_grad()
def init_action_block_from_video(action: ActionBlock, video: VideoBlock) -> None:
    d_a, d_v = action.to_q.in_features, video.attn1.to_q.in_features
    alpha = math.sqrt(d_v / d_a)
    for name in ("to_q", "to_k", "to_v", "to_out"):
        _copy_linear(getattr(action, name), getattr(video.attn1, name), alpha)
    action.norm_q.weight.copy_(video.attn1.norm_q.weight)
    action.norm_k.weight.copy_(video.attn1.norm_k.weight)
    action.up.weight.copy_(resampling_operator(d_v, d_a))
    action.down.weight.copy_(resampling_operator(d_a, d_v))
    _copy_linear(action.ffn.fc1, video.ffn.fc1, alpha)
    _copy_linear(action.ffn.fc2, video.ffn.fc2, alpha)
    table = action.modulation.scale_shift_table
    table.copy_(resample(video.modulation.scale_shift_table, tuple(table.shape)))


@torch.no_grad()
def init_action_conditioning_from_video(action_cond: nn.Module, video_time: nn.Module) -> None:
    """Timestep MLP + 6-way modulation projection of the action stream, from the video stream's."""
    d_a, d_v = action_cond.time_proj.in_features, video_time.time_proj.in_features
    alpha = math.sqrt(d_v / d_a)
    _copy_linear(action_cond.time_embedder.linear_1, video_time.time_embedder.linear_1, 1.0)  # same fan-in
    _copy_linear(action_cond.time_embedder.linear_2, video_time.time_embedder.linear_2, alpha)
    # time_proj's rows are six stacked d-sized blocks (shift, scale, gate, ...): resample block-wise
    w = video_time.time_proj.weight.unflatten(0, (6, d_v))
    action_cond.time_proj.weight.copy_(resample(w, (6, d_a, d_a)).flatten(0, 1) * alpha)
    b = video_time.time_proj.bias.unflatten(0, (6, d_v))
    action_cond.time_proj.bias.copy_(resample(b, (6, d_a)).flatten())
