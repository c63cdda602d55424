"""Load Wan2.2 transformer weights (diffusers ``WanTransformer3DModel`` layout) into LingBot-VA's video stream.

The video stream keeps Wan's sub-module names inside each block, so the mapping is a short table of prefix
renames. Image-conditioning weights (Wan I2V) have no place in LingBot-VA and are rejected. After loading, the
action stream is re-initialised from the loaded video weights when the config asks for interpolation (paper §3.3).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from model.config import LingBotConfig
from model.lingbot_va import LingBotVA

# (diffusers pattern, our replacement); applied in order, first match wins
_RENAMES: list[tuple[str, str]] = [
    (r"^patch_embedding\.", "patch_embedding."),
    (r"^condition_embedder\.time_embedder\.", "video_time.time_embedder."),
    (r"^condition_embedder\.time_proj\.", "video_time.time_proj."),
    (r"^condition_embedder\.text_embedder\.", "text_embedder."),
    (r"^blocks\.(\d+)\.attn(\d)\.to_out\.0\.", r"blocks.\1.video.attn\2.to_out."),
    (r"^blocks\.(\d+)\.attn(\d)\.(to_q|to_k|to_v|norm_q|norm_k)\.", r"blocks.\1.video.attn\2.\3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.video.ffn.fc1."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.video.ffn.fc2."),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.video.norm2."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.video.modulation.scale_shift_table"),
    (r"^scale_shift_table$", "video_out.scale_shift_table"),
    (r"^proj_out\.", "video_out.proj."),
]
_UNSUPPORTED = re.compile(r"image_embedder|add_k_proj|add_v_proj|norm_added_k")


def convert_wan_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers Wan transformer state dict to LingBot-VA's video-stream names."""
    out = {}
    for key, value in state_dict.items():
        if _UNSUPPORTED.search(key):
            raise ValueError(f"Wan weight {key!r} belongs to image conditioning (Wan I2V), which LingBot-VA does not use")
        for pattern, repl in _RENAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"unexpected Wan weight {key!r}")
    return out


def config_from_wan(wan_config: dict, **overrides) -> LingBotConfig:
    """A LingBot-VA config whose video stream matches a diffusers Wan transformer config."""
    if wan_config.get("image_dim") or wan_config.get("added_kv_proj_dim"):
        raise ValueError("Wan image-conditioned (I2V) transformers are not supported")
    if wan_config.get("in_channels") != wan_config.get("out_channels", wan_config.get("in_channels")):
        raise ValueError("Wan transformer with in_channels != out_channels is not supported")
    fields = dict(
        latent_channels=wan_config["in_channels"],
        patch_size=tuple(wan_config.get("patch_size", (1, 2, 2))),
        video_dim=wan_config["num_attention_heads"] * wan_config["attention_head_dim"],
        num_layers=wan_config["num_layers"],
        num_heads=wan_config["num_attention_heads"],
        video_ffn_dim=wan_config["ffn_dim"],
        text_dim=wan_config["text_dim"],
        freq_dim=wan_config.get("freq_dim", 256),
        eps=wan_config.get("eps", 1e-6),
    )
    fields.update(overrides)
    return LingBotConfig(**fields)


@torch.no_grad()
def load_wan_transformer(model, state_dict: dict[str, torch.Tensor]):
    """Copy Wan weights into ``model``'s video stream (shapes checked), then re-derive the action stream."""
    converted = convert_wan_state_dict(state_dict)
    own = model.state_dict()
    video_keys = {k for k in own if not (".action." in k or k.startswith("action_"))}
    missing = sorted(video_keys - set(converted))
    if missing:
        raise ValueError(f"Wan state dict lacks {len(missing)} video-stream weights, e.g. {missing[:3]}")
    for key, value in converted.items():
        if key not in own:
            raise ValueError(f"Wan weight maps to unknown parameter {key!r}")
        if own[key].shape != value.shape:
            raise ValueError(f"shape mismatch for {key}: Wan {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        own[key].copy_(value.to(own[key].dtype))
    if model.config.action_init == "interpolate":
        model.init_action_stream_from_video()
    return model


def read_wan_directory(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of a local diffusers Wan transformer directory, read straight from its safetensors.

    Reading the shards directly avoids instantiating diffusers' model (a second full copy of 5B weights).
    """
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a diffusers Wan transformer directory (no config.json)")
    config = json.loads((path / "config.json").read_text())
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["diffusion_pytorch_model.safetensors"]
    missing = [s for s in shards if not (path / s).is_file()]
    if missing:
        raise ValueError(f"{path} lacks weight files {missing}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(path / shard)))
    return config, state


def from_wan_pretrained(path: str | os.PathLike, **config_overrides) -> LingBotVA:
    """Build LingBot-VA from a local diffusers Wan2.2 transformer directory (or a pipeline root with transformer/)."""
    wan_config, state = read_wan_directory(path)
    model = LingBotVA(config_from_wan(wan_config, **config_overrides))
    return load_wan_transformer(model, state)
