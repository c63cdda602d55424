"""Tests for the frozen Wan2.2 VAE and T5 text-encoder wrappers, using tiny seeded random models (no downloads)."""

import os

# Set before transformers/diffusers are imported anywhere so nothing can reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from model.encoders import TextEncoder, VideoVAE


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def vae() -> VideoVAE:
    return VideoVAE.small(seed=0)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder.small(width=32, layers=2, heads=4, max_length=16, seed=0)


def _frames(b: int = 1, t: int = 5, v: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, v, h, w, 3), generator=gen, dtype=torch.uint8)


# ---------------------------------------------------------------- VideoVAE


def test_vae_properties_and_frozen(vae: VideoVAE) -> None:
    assert vae.latent_channels == 48
    assert vae.temporal_compression == 4
    assert vae.spatial_compression == 16
    assert all(not p.requires_grad for p in vae.parameters())
    vae.train()
    assert not vae.training and not vae.vae.training


def test_vae_encode_shape_and_determinism(vae: VideoVAE) -> None:
    frames = _frames()
    z1 = vae.encode(frames)
    z2 = vae.encode(frames)
    assert z1.shape == (1, 2, 48, 4, 8)
    assert z1.dtype == torch.float32
    assert not z1.requires_grad
    assert torch.isfinite(z1).all()
    assert torch.equal(z1, z2)
    # numpy input (what LeRobot / drivers hand over) goes through the same path
    assert torch.equal(vae.encode(frames.numpy()), z1)


def test_vae_different_clips_give_different_latents(vae: VideoVAE) -> None:
    assert not torch.equal(vae.encode(_frames(seed=0)), vae.encode(_frames(seed=1)))


def test_vae_decode_shape(vae: VideoVAE) -> None:
    frames = _frames()
    out = vae.decode(vae.encode(frames), num_views=2)
    assert out.dtype == torch.uint8
    assert out.shape == frames.shape


def test_vae_single_view_single_frame(vae: VideoVAE) -> None:
    frames = _frames(t=1, v=1, h=32, w=48)
    z = vae.encode(frames)
    assert z.shape == (1, 1, 48, 2, 3)
    assert vae.decode(z).shape == frames.shape


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (_frames(t=4), r"T must be 1 \+ 4k.*T=4"),
        (_frames(h=60), r"divisible by 16.*H=60"),
        (_frames(w=40), r"divisible by 16.*W=40"),
        (_frames().float(), r"must be uint8.*float32"),
        (_frames()[:, :, 0], r"6 dims.*ndim=5"),
        (torch.zeros(1, 5, 2, 64, 64, 4, dtype=torch.uint8), r"3 \(RGB\) channels.*got 4"),
    ],
    ids=["t4", "h60", "w40", "float", "ndim5", "rgba"],
)
def test_vae_encode_rejects_bad_frames(vae: VideoVAE, frames: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        vae.encode(frames)


def test_vae_decode_rejects_bad_latents(vae: VideoVAE) -> None:
    with pytest.raises(ValueError, match="5 dims"):
        vae.decode(torch.zeros(1, 48, 4, 8))
    with pytest.raises(ValueError, match="48 channels"):
        vae.decode(torch.zeros(1, 2, 16, 4, 8))
    with pytest.raises(ValueError, match="num_views=3"):
        vae.decode(torch.zeros(1, 2, 48, 4, 8), num_views=3)


def test_vae_small_is_seeded() -> None:
    a = VideoVAE.small(latent_channels=16, base_dim=8, num_res_blocks=1, seed=3)
    b = VideoVAE.small(latent_channels=16, base_dim=8, num_res_blocks=1, seed=3)
    c = VideoVAE.small(latent_channels=16, base_dim=8, num_res_blocks=1, seed=4)
    frames = _frames(v=1, h=32, w=32)
    za = a.encode(frames)
    assert za.shape == (1, 2, 16, 2, 2)
    assert torch.equal(za, b.encode(frames))
    assert not torch.equal(za, c.encode(frames))


@pytest.mark.parametrize("layout", ["vae_folder", "pipeline_root"])
def test_vae_save_and_from_pretrained(vae: VideoVAE, tmp_path, layout: str) -> None:
    if layout == "vae_folder":
        vae.save_pretrained(tmp_path)
    else:
        vae.vae.save_pretrained(tmp_path / "vae")
    loaded = VideoVAE.from_pretrained(tmp_path)
    frames = _frames()
    assert loaded.latent_channels == 48
    assert all(not p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.encode(frames), vae.encode(frames))


def test_vae_from_pretrained_missing(tmp_path) -> None:
    missing = tmp_path / "does-not-exist"
    with pytest.raises(ValueError, match="does-not-exist"):
        VideoVAE.from_pretrained(missing)
    with pytest.raises(ValueError, match=r"no config\.json"):
        VideoVAE.from_pretrained(tmp_path)


# ---------------------------------------------------------------- TextEncoder


def test_text_encoder_shapes_and_mask(text_encoder: TextEncoder) -> None:
    texts = ["pick", "put the red cube in the bowl please", ""]
    emb, mask = text_encoder.encode(texts)
    assert emb.shape == (3, 16, 32)
    assert emb.dtype == torch.float32
    assert mask.shape == (3, 16)
    assert mask.dtype == torch.bool
    assert text_encoder.width == 32
    # byte-level tokenizer: one id per byte plus </s>, truncated to max_length
    assert mask.sum(dim=1).tolist() == [5, 16, 1]
    # mask is a contiguous prefix (right padding)
    for row in mask:
        n = int(row.sum())
        assert row[:n].all() and not row[n:].any()
    assert torch.all(emb[~mask] == 0)
    assert torch.all(emb[mask].abs().sum(dim=-1) > 0)
    assert not emb.requires_grad


def test_text_encoder_empty_string(text_encoder: TextEncoder) -> None:
    emb, mask = text_encoder.encode([""])
    assert mask[0, 0] and not mask[0, 1:].any()
    assert torch.isfinite(emb).all()
    # a bare string is accepted as a batch of one
    emb2, _ = text_encoder.encode("")
    assert torch.equal(emb, emb2)


def test_text_encoder_deterministic_and_discriminative(text_encoder: TextEncoder) -> None:
    a1, _ = text_encoder.encode(["open the drawer"])
    a2, _ = text_encoder.encode(["open the drawer"])
    b, _ = text_encoder.encode(["close the drawer"])
    assert torch.equal(a1, a2)
    assert not torch.allclose(a1, b)
    # a padded batch gives the same embedding as encoding alone (padding does not leak into real tokens)
    batch, _ = text_encoder.encode(["open the drawer", "x"])
    torch.testing.assert_close(batch[0], a1[0], rtol=1e-5, atol=1e-5)


def test_text_encoder_small_is_seeded() -> None:
    a, _ = TextEncoder.small(width=16, heads=2, max_length=8, seed=1).encode(["hi"])
    b, _ = TextEncoder.small(width=16, heads=2, max_length=8, seed=1).encode(["hi"])
    c, _ = TextEncoder.small(width=16, heads=2, max_length=8, seed=2).encode(["hi"])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_text_encoder_frozen(text_encoder: TextEncoder) -> None:
    assert all(not p.requires_grad for p in text_encoder.parameters())
    text_encoder.train()
    assert not text_encoder.model.training


def test_text_encoder_save_and_from_pretrained(text_encoder: TextEncoder, tmp_path) -> None:
    text_encoder.model.save_pretrained(tmp_path)
    text_encoder.tokenizer.save_pretrained(tmp_path)
    loaded = TextEncoder.from_pretrained(tmp_path, max_length=16)
    texts = ["stack the blocks", ""]
    emb, mask = text_encoder.encode(texts)
    emb2, mask2 = loaded.encode(texts)
    assert torch.equal(mask, mask2)
    assert torch.equal(emb, emb2)


def test_text_encoder_pipeline_root_layout(text_encoder: TextEncoder, tmp_path) -> None:
    text_encoder.model.save_pretrained(tmp_path / "text_encoder")
    text_encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = TextEncoder.from_pretrained(tmp_path, max_length=16)
    assert torch.equal(loaded.encode(["go"])[0], text_encoder.encode(["go"])[0])


def test_text_encoder_from_pretrained_missing(tmp_path) -> None:
    with pytest.raises(ValueError, match="nope"):
        TextEncoder.from_pretrained(tmp_path / "nope")


def test_vae_encode_accepts_numpy_single_frame() -> None:
    # uint8 arrays come straight from LeRobot / robot drivers; a single frame is the T = 1 + 4*0 case
    arr = np.zeros((1, 1, 1, 16, 16, 3), dtype=np.uint8)
    assert VideoVAE.small(latent_channels=8, base_dim=8, num_res_blocks=1).encode(arr).shape == (1, 1, 8, 1, 1)


def test_latent_stream_matches_whole_clip_encode(vae: VideoVAE) -> None:
    """Closed-loop control encodes frames as they arrive; the causal cache makes that exact."""
    g = torch.Generator().manual_seed(5)
    frames = torch.randint(0, 256, (1, 13, 2, 32, 32, 3), generator=g, dtype=torch.uint8)
    whole = vae.encode(frames)[0]  # (4, C, 2, 4)
    stream = vae.stream()
    parts = [stream.push(frames[0, :1]), stream.push(frames[0, 1:3]), stream.push(frames[0, 3:10]),
             stream.push(frames[0, 10:13])]
    assert [p.shape[0] for p in parts] == [1, 0, 2, 1]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-5)
    assert stream.frames_encoded == 13 and stream.latents_emitted == 4
    with pytest.raises(ValueError, match="differs from this episode"):
        stream.push(frames[0, :1, :1])
    with pytest.raises(ValueError, match="uint8"):
        stream.push(frames[0, :4].float())
