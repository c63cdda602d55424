"""A small causal video autoencoder with the Wan2.2 VAE's latent layout, cheap enough to train on a CPU.

Wan2.2's VAE compresses 4x in time and 16x in space into 48 channels and is causal in time: latent frame 0 encodes
frame 0 alone, latent frame k >= 1 encodes frames 4k-3 .. 4k. ``FrameVAE`` keeps exactly that layout and causality,
but builds it from 2-D convolutions: every frame is encoded on its own to a 16x-downsampled feature map, and a latent
frame mixes the features of the frames it covers (one 1x1 convolution for the first frame, one for a group of 4).
Decoding mirrors it. A 3-D causal VAE at the same width costs ~20x more per step on a CPU, which is what made the
embedded default fall back to an untrained encoder that hid the scene from the policy.

It speaks diffusers' autoencoder API (``encode(x).latent_dist``, ``decode(z).sample``, ``save_pretrained`` /
``from_pretrained``, ``latents_mean`` / ``latents_std`` in the config), so ``model.encoders.VideoVAE`` wraps it and
diffusers' ``AutoencoderKLWan`` interchangeably.

Layouts: x (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k; z (B, C, F, H/16, W/16) with F = 1 + k.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class _Res(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                   nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class FrameVAE(ModelMixin, ConfigMixin):
    """Per-frame 2-D encoder/decoder + causal temporal grouping (see the module docstring)."""

    @register_to_config
    def __init__(
        self,
        z_dim: int = 48,
        dims: tuple[int, ...] = (32, 64, 128),
        temporal_compression: int = 4,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        if len(dims) != 3:
            raise ValueError(f"dims must hold 3 stage widths (2x pixel unshuffle + 3 stride-2 stages = 16x), got {dims}")
        d0, d1, d2 = dims
        tc = temporal_compression
        # (B*T, 3, H, W) -> pixel unshuffle 2 -> 3 stride-2 stages -> (B*T, d2, H/16, W/16)
        self.frame_encoder = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(12, d0, 3, padding=1), nn.SiLU(),
            nn.Conv2d(d0, d1, 3, stride=2, padding=1), _Res(d1),
            nn.Conv2d(d1, d2, 3, stride=2, padding=1), _Res(d2),
            nn.Conv2d(d2, d2, 3, stride=2, padding=1), _Res(d2), nn.GroupNorm(8, d2), nn.SiLU(),
        )
        self.first_in = nn.Conv2d(d2, 2 * z_dim, 1)  # latent frame 0 <- frame 0
        self.group_in = nn.Conv2d(tc * d2, 2 * z_dim, 1)  # latent frame k <- frames 4k-3 .. 4k
        self.first_out = nn.Conv2d(z_dim, d2, 1)
        self.group_out = nn.Conv2d(z_dim, tc * d2, 1)
        self.frame_decoder = nn.Sequential(
            _Res(d2), nn.Upsample(scale_factor=2), nn.Conv2d(d2, d2, 3, padding=1), _Res(d2),
            nn.Upsample(scale_factor=2), nn.Conv2d(d2, d1, 3, padding=1), _Res(d1),
            nn.Upsample(scale_factor=2), nn.Conv2d(d1, d0, 3, padding=1), nn.GroupNorm(8, d0), nn.SiLU(),
            nn.Conv2d(d0, 12, 3, padding=1), nn.PixelShuffle(2),
        )

    # --------------------------------------------------------------------------------------------------- encode
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, T, d2, h, w)."""
        b, c, t, h, w = x.shape
        f = self.frame_encoder(x.transpose(1, 2).reshape(b * t, c, h, w))
        return f.view(b, t, *f.shape[1:])

    def moments(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        """Posterior moments (B, 2C, F, h, w) of a clip; ``first``: the clip starts the episode (frame 0 alone)."""
        f = self._features(x)
        tc = self.config.temporal_compression
        out = []
        if first:
            out.append(self.first_in(f[:, 0]))
            f = f[:, 1:]
        if f.shape[1] % tc:
            raise ValueError(f"frames after the first must come in groups of {tc}, got {f.shape[1]}")
        for g in range(f.shape[1] // tc):
            out.append(self.group_in(f[:, g * tc : (g + 1) * tc].flatten(1, 2)))
        return torch.stack(out, dim=2)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        post = DiagonalGaussianDistribution(self.moments(x, first=True))
        return AutoencoderKLOutput(latent_dist=post) if return_dict else (post,)

    # --------------------------------------------------------------------------------------------------- decode
    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """(B, C, F, h, w) -> (B, 3, 1 + 4(F-1), H, W)."""
        b, _, n, h, w = z.shape
        tc = self.config.temporal_compression
        feats = [self.first_out(z[:, :, 0])[:, None]]
        if n > 1:
            g = z[:, :, 1:].transpose(1, 2).reshape(b * (n - 1), -1, h, w)
            g = self.group_out(g).view(b, (n - 1) * tc, -1, h, w)
            feats.append(g)
        f = torch.cat(feats, dim=1)  # (B, T, d2, h, w)
        t = f.shape[1]
        frames = self.frame_decoder(f.flatten(0, 1))  # (B*T, 3, H, W)
        x = frames.view(b, t, *frames.shape[1:]).transpose(1, 2)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode()).sample

