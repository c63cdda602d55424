"""Parameter counts of a model preset, computed without allocating weights (meta device)."""

from __future__ import annotations

import dataclasses

import torch

from model import LingBotVA, get_preset


def model_info(preset: str) -> dict:
    config = get_preset(preset)
    with torch.device("meta"):
        model = LingBotVA(config)
    counts = model.stream_parameters()
    return {
        "preset": preset,
        "total_params": counts["total"],
        "video_stream_params": counts["video_stream"],
        "action_stream_params": counts["action_stream"],
        "config": dataclasses.asdict(config),
    }
