"""Typed model configuration and named presets for LingBot-VA.

The model shape lives in a frozen dataclass; runtime knobs (paths, endpoints, step options) do not belong here.
Every field is documented because the whole config is written into ``config.json`` next to the weights and must
be readable by whoever serves the checkpoint a year later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ACTION_DIM = 30
"""Unified action space (paper §4.1): 0-6 left EEF xyz+quat, 7-13 right EEF, 14-20 left joints, 21-27 right joints,
28 left gripper, 29 right gripper."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LingBotConfig:
    """Shape and training-objective hyper-parameters of the MoT video-action model."""

    # --- video stream: laid out like Wan2.2's WanTransformer3DModel -------------------------------------------
    latent_channels: int = 48
    """Channels of the Wan2.2 VAE latent (48 for Wan2.2-TI2V-5B)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """(t, h, w) patchify of the latent grid; Wan2.2 uses 1x2x2."""
    video_dim: int = 3072
    """Hidden width d_v of the video stream."""
    num_layers: int = 30
    """Depth, shared by both streams (one MoT block per layer)."""
    num_heads: int = 24
    """Attention heads of the joint self-attention (head dim = video_dim / num_heads)."""
    video_ffn_dim: int = 14336
    """Hidden size of the video FFN."""
    text_dim: int = 4096
    """Width of the frozen text encoder's output (umT5-XXL: 4096)."""
    freq_dim: int = 256
    """Sinusoidal timestep embedding size."""
    eps: float = 1e-6
    """Epsilon of the layer/RMS norms."""
    rope_theta: float = 10000.0
    """Base of the 3-D rotary embedding."""

    # --- action stream ------------------------------------------------------------------------------------------
    action_dim: int = 768
    """Hidden width d_a of the action stream (same depth as the video stream)."""
    action_ffn_dim: int = 3584
    """Hidden size of the action FFN; default keeps Wan's FFN ratio (14336 * 768 / 3072)."""
    action_mlp_hidden: int = 256
    """Hidden size of the single-layer action encoder/decoder MLPs (paper §4.2)."""
    action_channels: int = ACTION_DIM
    """Size of the unified action vector."""
    action_init: str = "interpolate"
    """'interpolate': action weights interpolated from the video weights and scaled by sqrt(d_v/d_a) (paper §3.3);
    'random': independent random init (the unstable baseline of Fig. 7)."""

    # --- sequence layout ----------------------------------------------------------------------------------------
    tau: int = 4
    """Actions per latent frame (temporal downsampling factor, paper §3.3)."""
    chunk_size: int = 4
    """Latent frames per autoregressive chunk at deployment (K)."""
    train_chunk_sizes: tuple[int, ...] = (1, 2, 3, 4)
    """K is sampled from these per training step (variable chunk size)."""
    attn_window_chunks: int | None = None
    """If set, tokens only attend to the last N chunks (training mask and KV-cache eviction agree)."""

    # --- objective ----------------------------------------------------------------------------------------------
    objective: str = "world_model"
    """'world_model': the paper's model (predict the video chunk, then decode its actions by inverse dynamics).
    'reactive': the baseline of the world-modelling claim: the same MoT, data and steps, but the action chunk is
    predicted from the observed history alone (no video prediction, no L_dyn / L_fdm)."""
    inv_loss_weight: float = 1.0
    """lambda in L = L_dyn + lambda * L_inv."""
    fdm_loss_weight: float = 0.0
    """Weight of L_fdm (Eq. 13); 0 disables the forward-dynamics copy (pretraining), >0 for post-training."""
    video_shift: float = 5.0
    """Timestep shift for video flow times (sigma' = shift*sigma / (1 + (shift-1)*sigma)), as in the reference."""
    action_shift: float = 1.0
    """Timestep shift for action flow times."""
    noisy_history_prob: float = 0.5
    """Probability of replacing a history chunk by (1-s_aug)*eps + s_aug*z (Eq. 10)."""
    noisy_history_min: float = 0.5
    """s_aug ~ U[noisy_history_min, 1]."""
    text_dropout: float = 0.1
    """Probability of dropping the instruction (for classifier-free guidance)."""

    # --- inference defaults (Alg. 1) -------------------------------------------------------------------------
    video_steps: int = 3
    """Euler steps of the video chunk."""
    video_s_end: float = 0.6
    """Partial denoising: integrate the video only up to this flow time."""
    video_cfg: float = 5.0
    """Classifier-free guidance scale for video."""
    action_steps: int = 10
    """Euler steps of the action chunk (integrated to s = 1)."""
    action_cfg: float = 1.0
    """Classifier-free guidance scale for actions."""
    action_temperature: float = 1.0
    """Scale of the action chunk's initial noise: 1 samples the learnt distribution; 0 integrates the flow from the
    prior's centre, a deterministic chunk near the distribution's mode (less jitter, no diversity)."""
    full_video_steps: int = 10
    """Step count of a full video denoise to s = 1 (the non-partial baseline the benchmark compares against)."""

    def __post_init__(self) -> None:
        if self.video_dim % self.num_heads:
            raise ValueError(f"video_dim={self.video_dim} is not divisible by num_heads={self.num_heads}")
        head = self.video_dim // self.num_heads
        if head % 2 or head < 6:
            raise ValueError(f"head dim {head} must be even and >= 6 for the 3-D rotary embedding")
        if len(self.patch_size) != 3 or any(p <= 0 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive ints, got {self.patch_size}")
        if self.patch_size[0] != 1:
            raise ValueError("temporal patch size must be 1 (one latent frame per token group)")
        for name in ("latent_channels", "video_dim", "num_layers", "video_ffn_dim", "text_dim", "action_dim",
                     "action_ffn_dim", "action_mlp_hidden", "action_channels", "tau", "chunk_size", "freq_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.objective not in ("world_model", "reactive"):
            raise ValueError(f"objective must be 'world_model' or 'reactive', got {self.objective!r}")
        if self.action_init not in ("interpolate", "random"):
            raise ValueError(f"action_init must be 'interpolate' or 'random', got {self.action_init!r}")
        if not self.train_chunk_sizes or min(self.train_chunk_sizes) < 1:
            raise ValueError(f"train_chunk_sizes must be non-empty positive ints, got {self.train_chunk_sizes}")
        if not 0.0 < self.video_s_end <= 1.0:
            raise ValueError(f"video_s_end must be in (0, 1], got {self.video_s_end}")
        if self.video_steps < 1 or self.action_steps < 1:
            raise ValueError("video_steps and action_steps must be >= 1")
        if not 0.0 <= self.action_temperature <= 1.0:
            raise ValueError(f"action_temperature must be in [0, 1], got {self.action_temperature}")
        if not 0.0 <= self.noisy_history_min <= 1.0:
            raise ValueError(f"noisy_history_min must be in [0, 1], got {self.noisy_history_min}")
        if self.attn_window_chunks is not None and self.attn_window_chunks < 1:
            raise ValueError(f"attn_window_chunks must be >= 1 or None, got {self.attn_window_chunks}")

    @property
    def head_dim(self) -> int:
        return self.video_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per video token before embedding (C * pt * ph * pw)."""
        return self.latent_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]

    def replace(self, **changes) -> LingBotConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LingBotConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model config fields: {unknown}")
        data = dict(data)
        for key in ("patch_size", "train_chunk_sizes"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


PRESETS: dict[str, LingBotConfig] = {
    # Unit tests: < 5M parameters, a forward pass well under a second on CPU.
    "tiny": LingBotConfig(
        latent_channels=16, video_dim=64, num_layers=2, num_heads=2, video_ffn_dim=160, text_dim=32, freq_dim=32,
        action_dim=32, action_ffn_dim=80, action_mlp_hidden=32, full_video_steps=10,
    ),
    # Meta-World demo on CPU: trains in minutes on 2 cores with the small VAE (48 latent channels).
    # attn_window_chunks: training windows hold the first frame + 4 chunks, so inference keeps the last 4 chunks
    # in its cache: the attention distances it sees are the ones training saw.
    # chunk_size 2 (8 control steps per plan, one of the trained sizes): re-planning twice as often corrects the
    # open-loop drift of a small model; on the same 20 held-out episodes K = 4 / 2 / 1 scored door-open
    # 0.55 / 0.70 / 0.65 and window-close 0.45 / 0.50 / 0.35 (bench/results/chunk_ab.json, chunk_ab_k1.json).
    "small": LingBotConfig(
        latent_channels=48, video_dim=256, num_layers=6, num_heads=4, video_ffn_dim=1024, text_dim=256,
        freq_dim=128, action_dim=128, action_ffn_dim=512, action_mlp_hidden=128, attn_window_chunks=4, chunk_size=2,
    ),
    # ~1B for GPU throughput work (bench/mfu.py): Wan-shaped video stream at d_v 2048, 14 layers, d_a 512.
    "base-1b": LingBotConfig(
        video_dim=2048, num_layers=14, num_heads=16, video_ffn_dim=8192, action_dim=512, action_ffn_dim=2048,
    ),
    # The paper's model: Wan2.2-5B video stream (d_v 3072, 30 layers) + a d_a = 768 action stream.
    "paper-5.3b": LingBotConfig(),
}


def get_preset(name: str, **overrides) -> LingBotConfig:
    """Return a named preset, optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg

