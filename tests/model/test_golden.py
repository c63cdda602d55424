"""Golden numerics: a fixed tiny model, fixed data and seeds must reproduce the recorded loss curve.

Any change to the maths (masks, noise sampling, modulation, RoPE, init) moves these numbers. When a change is meant
to move them, regenerate with `LINGBOT_UPDATE_GOLDEN=1 make test` and say why in the commit.
"""

import json
import os
from pathlib import Path

import torch

from model import LingBotVA, get_preset
from pipelines.data.synthetic import synthetic_episodes

GOLDEN = Path(__file__).parent.parent / "assets" / "golden_tiny_losses.json"


def loss_curve(steps: int = 5) -> list[dict[str, float]]:
    torch.manual_seed(0)
    config = get_preset("tiny", fdm_loss_weight=1.0)
    model = LingBotVA(config)
    data = synthetic_episodes(2, frames=9, latent_channels=config.latent_channels, text_dim=config.text_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen, curve = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        losses = model.compute_loss(data, generator=gen)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        curve.append({k: round(v.item(), 6) for k, v in losses.items()})
    return curve


def test_loss_curve_matches_golden():
    curve = loss_curve()
    if os.environ.get("LINGBOT_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(curve) == len(golden)
    for step, (got, want) in enumerate(zip(curve, golden, strict=True)):
        for key in want:
            assert abs(got[key] - want[key]) <= 1e-4 * max(1.0, abs(want[key])), (step, key, got[key], want[key])
