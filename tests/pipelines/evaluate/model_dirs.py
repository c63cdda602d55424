"""Self-contained tiny model directories like training writes (shared by the evaluation tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model import LingBotVA, get_preset
from model.bundle import ActionSpace, PolicyBundle
from model.encoders import VideoVAE
from model.normalization import ActionNormalizer, EmbodimentNorm
from model.policy import ChunkPolicy
from pipelines.data.embodiments import METAWORLD_CAMERAS, get_adapter

TASK = "reach-v3"


def write_model_dir(path: Path, *, nan: bool = False, seed: int = 0) -> Path:
    """A self-contained tiny policy bundle like training writes (VAE, instruction embeddings, stats)."""
    config = get_preset("tiny", chunk_size=2)
    torch.manual_seed(seed)
    model = LingBotVA(config)
    if nan:
        with torch.no_grad():
            for p in model.action_out.parameters():
                p.fill_(float("nan"))
    adapter = get_adapter("metaworld-sawyer")
    rng = np.random.default_rng(0)
    state = np.column_stack([rng.uniform(-0.3, 0.3, 500), rng.uniform(0.4, 0.8, 500), rng.uniform(0.05, 0.3, 500),
                             rng.uniform(0, 1, 500)])
    unified = adapter.to_unified(rng.uniform(-1, 1, (500, 4)), state)
    norm = EmbodimentNorm.from_normalizer(adapter.name, ActionNormalizer.fit(unified), adapter.mask)
    vae = VideoVAE.small(latent_channels=config.latent_channels, base_dim=8, num_res_blocks=1, seed=0)
    text = {TASK: torch.randn(4, config.text_dim, generator=torch.Generator().manual_seed(1))}
    space = ActionSpace(embodiments=(adapter.name,), tasks=(TASK,), tau=config.tau, instructions={TASK: None},
                        cameras=METAWORLD_CAMERAS, latent_hw=(2, 4))
    return PolicyBundle(model=model, vae=vae, text=text, normalization={adapter.name: norm},
                        action_space=space).save(path)


def load_policy(model_dir: Path, **kwargs) -> ChunkPolicy:
    """``model_dir`` as the Meta-World policy the gate and the server run."""
    return ChunkPolicy.load(model_dir, get_adapter, **kwargs)
