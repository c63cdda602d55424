"""Our video stream reproduces diffusers' WanTransformer3DModel after loading its weights."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from model import LingBotVA
from model.wan_adapter import config_from_wan, convert_wan_state_dict, load_wan_transformer

WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=8, out_channels=8,
                text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    wan = WanTransformer3DModel(**WAN_TINY).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every tensor non-trivial anyway
        for p in wan.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = load_wan_transformer(LingBotVA(config_from_wan(WAN_TINY)), wan.state_dict()).eval()
    return wan, ours


@pytest.mark.parametrize("per_token", [False, True], ids=["scalar-timestep", "per-token-timestep"])
def test_matches_diffusers(pair, per_token):
    wan, ours = pair
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 3, 6, 8, generator=g)
    text = torch.randn(2, 7, 16, generator=g)
    L = 3 * 3 * 4
    t = torch.rand(2, L, generator=g) * 1000 if per_token else torch.tensor([250.0, 900.0])
    with torch.no_grad():
        ref = wan(x, t, text, return_dict=False)[0]
        out = ours.forward_wan(x, t, text)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4


def test_every_wan_weight_is_used(pair):
    wan, ours = pair
    converted = convert_wan_state_dict(wan.state_dict())
    own = ours.state_dict()
    for key, value in converted.items():
        assert torch.equal(own[key], value), key


def test_rejects_image_conditioning_and_unknown_weights(pair):
    wan, _ = pair
    sd = dict(wan.state_dict())
    with pytest.raises(ValueError, match="image conditioning"):
        convert_wan_state_dict({**sd, "condition_embedder.image_embedder.ff.net.0.proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected Wan weight"):
        convert_wan_state_dict({**sd, "mystery.weight": torch.zeros(1)})
    sd.pop("proj_out.weight")
    with pytest.raises(ValueError, match="lacks"):
        load_wan_transformer(LingBotVA(config_from_wan(WAN_TINY)), sd)


def test_from_local_diffusers_directory(pair, tmp_path):
    from model.wan_adapter import from_wan_pretrained

    wan, _ = pair
    wan.save_pretrained(tmp_path / "transformer")
    model = from_wan_pretrained(tmp_path).eval()  # a pipeline root with transformer/ inside
    x, t, text = torch.randn(1, 8, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 16)
    with torch.no_grad():
        assert (model.forward_wan(x, t, text) - wan(x, t, text, return_dict=False)[0]).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="not a diffusers Wan transformer directory"):
        from_wan_pretrained(tmp_path / "missing")
