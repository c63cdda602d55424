"""Inference benchmark of LingBot-VA sessions on this machine (not a test).

Measures, for the `small` preset on CPU:
  * chunk_latency_ms       one predict_chunk (K=4, 3 video steps to s=0.6 with CFG 5, 10 action steps) with 4 chunks
                           of history in the KV cache (median of repeats);
  * kv_cache_speedup       predict_chunk with the KV cache vs recomputing the whole history at every model evaluation,
                           at 8 / 16 / 32 chunks of history;
  * partial_denoise_speedup the video part: 3 Euler steps to s = 0.6 vs the full schedule (config.full_video_steps)
                           to s = 1.0.
Writes bench/results/model_inference.json.  Usage: .venv/bin/python bench/model_inference.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from model import LingBotVA, get_preset
from model.masks import NOISY
from model.sampler import Batch, cfg_rows, denoise_video

LATENT_HW = (8, 16)  # two 128x128 camera views side by side through the 16x VAE


def make_session(model, history_chunks: int, use_cache: bool, seed: int = 0, latent_hw: tuple[int, int] = LATENT_HW,
                 text_len: int = 8, **kwargs):
    """A session with random instruction, first frame and ``history_chunks`` observed chunks (also bench/gpu_check.py)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    s = model.session(torch.randn(text_len, c.text_dim, generator=g), torch.ones(c.action_channels),
                      use_cache=use_cache, generator=torch.Generator().manual_seed(seed), **kwargs)
    s.observe(torch.randn(1, c.latent_channels, *latent_hw, generator=g))
    for _ in range(history_chunks):
        s.observe(torch.randn(c.chunk_size, c.latent_channels, *latent_hw, generator=g),
                  torch.randn(c.chunk_size * c.tau, c.action_channels, generator=g))
    return s


def video_part(s, K: int):
    """predict_chunk's video part: K frames from noise to the session's s_end (its steps and CFG), against its cache."""
    H, W = s.size
    noise = torch.randn(K, s.config.latent_channels, H, W, generator=s.generator)
    return denoise_video(Batch([s], cfg_rows(s.video_cfg)), [noise], NOISY)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats and history lengths (smoke run)")
    parser.add_argument("--out", default="bench/results/model_inference.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = get_preset("small")
    model = LingBotVA(config).eval()
    repeats = 2 if args.quick else 5
    result: dict = {"preset": "small", "device": "cpu", "threads": torch.get_num_threads(),
                    "machine": platform.processor() or platform.machine(), "latent_hw": LATENT_HW,
                    "tokens_per_frame": LATENT_HW[0] * LATENT_HW[1] // 4, "chunk_size": config.chunk_size,
                    "sampler": {"video_steps": config.video_steps, "video_s_end": config.video_s_end,
                                "video_cfg": config.video_cfg, "action_steps": config.action_steps,
                                "action_cfg": config.action_cfg}}

    s = make_session(model, 4, True)
    result["chunk_latency_ms"] = round(timed(s.predict_chunk, repeats), 1)
    print(f"chunk latency (small, CPU, 4 chunks of history): {result['chunk_latency_ms']} ms")

    speedups, detail = {}, {}
    for n in ([8] if args.quick else [8, 16, 32]):
        cached = timed(make_session(model, n, True).predict_chunk, repeats)
        full = timed(make_session(model, n, False).predict_chunk, 1 if n >= 16 else repeats)
        speedups[str(n)] = round(full / cached, 2)
        detail[str(n)] = {"kv_cache_ms": round(cached, 1), "full_recompute_ms": round(full, 1)}
        print(f"history {n:>2} chunks: cache {cached:8.1f} ms  recompute {full:9.1f} ms  speedup {full / cached:.1f}x")
    result["kv_cache_speedup"], result["kv_cache_detail"] = speedups, detail

    K = config.chunk_size
    partial_s = make_session(model, 4, True)
    full_s = make_session(model, 4, True, video_steps=config.full_video_steps, video_s_end=1.0)
    partial = timed(lambda: video_part(partial_s, K), repeats)
    full = timed(lambda: video_part(full_s, K), repeats)
    result["partial_denoise_speedup"] = round(full / partial, 2)
    result["partial_denoise_detail"] = {
        "partial": {"steps": config.video_steps, "s_end": config.video_s_end, "ms": round(partial, 1)},
        "full": {"steps": config.full_video_steps, "s_end": 1.0, "ms": round(full, 1)},
    }
    print(f"video part: {config.video_steps} steps to s={config.video_s_end}: {partial:.1f} ms; "
          f"{config.full_video_steps} steps to s=1: {full:.1f} ms -> {full / partial:.2f}x")
    result["paper_5_3b_gpu"] = "not measured: no GPU was lent to this run (see the issue note)"

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
