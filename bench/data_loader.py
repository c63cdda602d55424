"""Loader throughput vs the small model's training step (not a test).

The loader must produce batches at least 3x faster than the model consumes them, so training never waits on data.
Uses the encoded latents under --latents (default data/latents) when present, else synthetic shards of the same
shape (48 latent channels, 8x16 latent grid = two 128-px views, 40-frame episodes) written to a temp dir.
Writes bench/results/data_loader.json.  Usage: .venv/bin/python bench/data_loader.py [--latents DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model import LingBotVA, get_preset
from pipelines.data.loader import PackedWindows
from pipelines.data.synthetic import write_synthetic_latents


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latents", default="data/latents")
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--out", default="bench/results/data_loader.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = get_preset("small")
    with tempfile.TemporaryDirectory() as tmp:
        latents = Path(args.latents)
        source = "encoded"
        if not (latents / "index.json").is_file():
            latents, source = write_synthetic_latents(Path(tmp), config), "synthetic"
        loader = PackedWindows(latents, "train", token_budget=args.token_budget, rows=1, seed=0)
        rng = np.random.default_rng(0)
        loader.sample(rng)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 5.0:
            batch = loader.sample(rng)
            n += 1
        loader_s = (time.perf_counter() - start) / n

        model = LingBotVA(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        steps = []
        for i in range(6):
            batch = loader.sample(rng)
            t0 = time.perf_counter()
            loss = model.compute_loss(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                steps.append(time.perf_counter() - t0)
        step_s = statistics.median(steps)
    result = {"source": source, "token_budget": args.token_budget, "preset": "small", "device": "cpu",
              "loader_batches_per_s": round(1 / loader_s, 1), "train_steps_per_s": round(1 / step_s, 2),
              "loader_ms_per_batch": round(loader_s * 1000, 2), "train_step_ms": round(step_s * 1000, 1),
              "loader_vs_step": round(step_s / loader_s, 1)}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
