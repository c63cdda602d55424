"""FrameVAE: Wan2.2's latent layout, causality, streaming parity, save/load with the fitted standardisation."""

import numpy as np
import pytest
import torch

from model.encoders import VideoVAE
from model.frame_vae import FrameVAE


@pytest.fixture(scope="module")
def vae():
    return VideoVAE.frame(latent_channels=16, dims=(8, 16, 16), seed=0)


def clip(t=9, v=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (1, t, v, size, size, 3), dtype=np.uint8)


def test_latent_layout_matches_wan(vae):
    z = vae.encode(torch.from_numpy(clip()))
    assert z.shape == (1, 3, 16, 2, 4)  # F = 1 + 8/4, 32/16 high, 2 views x 32/16 wide
    assert (vae.temporal_compression, vae.spatial_compression) == (4, 16)
    frames = vae.decode(z, num_views=2)
    assert frames.shape == (1, 9, 2, 32, 32, 3) and frames.dtype == torch.uint8


def test_encoding_is_causal_in_time(vae):
    a, b = clip(seed=0), clip(seed=0)
    b[0, 5:] = 255 - b[0, 5:]  # change the second group only
    za, zb = vae.encode(torch.from_numpy(a)), vae.encode(torch.from_numpy(b))
    assert torch.equal(za[:, :2], zb[:, :2]) and not torch.allclose(za[:, 2], zb[:, 2])


def test_stream_equals_whole_clip_encoding(vae):
    frames = clip(t=13)
    whole = vae.encode(torch.from_numpy(frames))[0]
    stream = vae.stream()
    parts = [stream.push(frames[0, :1]), stream.push(frames[0, 1:3]), stream.push(frames[0, 3:13])]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)


def test_standardisation_is_saved_and_reloaded(tmp_path):
    v = VideoVAE.frame(latent_channels=16, dims=(8, 16, 16), seed=1)
    raw = v.raw_latents(torch.from_numpy(clip()))
    mean, std = raw.mean((0, 1, 3, 4)), raw.std((0, 1, 3, 4))
    v.with_latent_stats(mean, std)
    z = v.encode(torch.from_numpy(clip()))
    assert torch.allclose(z * v.latents_std + v.latents_mean, raw, atol=1e-5)
    assert torch.allclose(z.mean((0, 1, 3, 4)), torch.zeros(16), atol=1e-4)
    v.save_pretrained(tmp_path / "vae")
    back = VideoVAE.from_pretrained(tmp_path / "vae")
    assert isinstance(back.vae, FrameVAE)
    assert torch.allclose(back.encode(torch.from_numpy(clip())), z, atol=1e-6)
    with pytest.raises(ValueError, match="positive stds"):
        v.with_latent_stats(mean, torch.zeros(16))
    with pytest.raises(ValueError, match="16 means"):
        v.with_latent_stats(mean[:3], std)


def test_wan_vae_takes_the_same_standardisation(tmp_path):
    v = VideoVAE.small(latent_channels=16, base_dim=8, num_res_blocks=1)
    v.with_latent_stats(torch.full((16,), 0.5), torch.full((16,), 0.25))
    v.save_pretrained(tmp_path / "wan")
    back = VideoVAE.from_pretrained(tmp_path / "wan")
    assert torch.allclose(back.latents_std.flatten(), torch.full((16,), 0.25))


def test_bad_dims_are_refused():
    with pytest.raises(ValueError, match="3 stage widths"):
        FrameVAE(z_dim=16, dims=(8, 16))
