"""Training throughput and ZeRO memory on 2 CPU ranks (not a test).

For the small preset at ZeRO 0, 2 and 3 (torchrun, 2 processes, gloo): tokens/s over timed steps after warm-up, and
per-rank bytes of parameters + optimizer state (ZeRO-3 / ZeRO-0 ratio; the goal is <= 0.55).
Uses data/latents if encoded for the small preset, else synthetic latents of the same shape.
Writes bench/results/training.json (bf16); the fp32 run: --precision fp32 --out bench/results/training_fp32.json.
Usage: .venv/bin/python bench/training.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent


def state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for parameters (its partition under ZeRO-3) and optimizer state (incl. fp32 masters)."""
    params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                 for p in engine.module.parameters())
    seen, opt = set(), 0

    def add(t):
        nonlocal opt
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            opt += t.numel() * t.element_size()

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for st in inner.state.values():
        for t in st.values():
            add(t)
    # fp32 master copies: ZeRO-1/2, ZeRO-3, DeepSpeed's BF16_Optimizer, and FP16_(Unfused)Optimizer, which DeepSpeed
    # picks for bf16 without ZeRO when the client optimizer is not fused (fp32_groups: one list of tensors per group)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                 "fp32_groups_flat", "fp32_groups"):
        for t in getattr(engine.optimizer, name, []) or []:
            for x in t if isinstance(t, (list, tuple)) else [t]:
                add(x)
    return {"param_bytes": params, "optimizer_state_bytes": opt, "total": params + opt,
            "optimizer_class": type(engine.optimizer).__name__}


def worker(args) -> None:
    from pipelines.data.loader import PackedWindows
    from pipelines.train.parallelize import build_engine
    from pipelines.train.settings import TrainSettings
    from pipelines.train.trainer import _build_model, _init_distributed

    rank, world = _init_distributed()
    settings = TrainSettings(stage="pretrain", preset="small", latents_dir=args.latents, zero_stage=args.zero,
                             token_budget=args.token_budget, steps=1000, register_model=False, precision=args.precision)
    index = json.loads((Path(args.latents) / "index.json").read_text())
    engine, _ = build_engine(_build_model(settings, index), settings, world)
    loader = PackedWindows(args.latents, token_budget=args.token_budget, seed=rank)
    rng, gen = np.random.default_rng(rank), torch.Generator().manual_seed(rank)
    times, tokens = [], 0
    for i in range(args.steps + 1):
        batch = loader.sample(rng)
        t0 = time.perf_counter()
        engine.backward(engine(batch, gen)["loss"])
        engine.step()
        if i:  # first step warms up
            times.append(time.perf_counter() - t0)
            tokens += loader.batch_tokens(batch)
    sums = torch.tensor([tokens, sum(times)], dtype=torch.float64)
    torch.distributed.all_reduce(sums)
    mem = state_bytes(engine)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"tokens_per_s": sums[0].item() / (sums[1].item() / world),
                                              "step_s": sums[1].item() / world / args.steps, **mem}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--latents", default=None)
    # bf16 is what the platform trains in on GPUs (precision "auto"); fp32 ZeRO-3 keeps a second fp32 partition copy
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--out", default="bench/results/training.json")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from model import get_preset
    from pipelines.data.synthetic import write_synthetic_latents

    with tempfile.TemporaryDirectory() as tmp:
        latents = Path(args.latents or REPO / "data" / "latents")
        index = latents / "index.json"
        source = "encoded"
        if not index.is_file() or json.loads(index.read_text())["latent_channels"] != get_preset("small").latent_channels:
            latents, source = write_synthetic_latents(Path(tmp) / "latents", get_preset("small")), "synthetic"
        results, load = {}, [round(x, 2) for x in os.getloadavg()]
        for zero in (0, 2, 3):
            out = Path(tmp) / f"zero{zero}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                   "--worker", "--zero", str(zero), "--steps", str(args.steps), "--token-budget", str(args.token_budget),
                   "--latents", str(latents), "--out", str(out), "--precision", args.precision]
            subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results[zero] = json.loads(out.read_text())
            print(f"ZeRO-{zero}: {results[zero]['tokens_per_s']:.0f} tokens/s, {results[zero]['step_s']:.2f} s/step, "
                  f"{results[zero]['total'] / 1e6:.1f} MB params+optimizer per rank")
    report = {
        "preset": "small", "ranks": 2, "device": "cpu", "backend": "gloo", "data": source, "precision": args.precision,
        "token_budget": args.token_budget, "timed_steps": args.steps,
        "tokens_per_s": {str(z): round(r["tokens_per_s"], 1) for z, r in results.items()},
        "step_s": {str(z): round(r["step_s"], 3) for z, r in results.items()},
        "per_rank_state_bytes": {str(z): {k: r[k] for k in ("param_bytes", "optimizer_state_bytes", "total",
                                                             "optimizer_class")}
                                 for z, r in results.items()},
        "zero3_vs_zero0_memory_ratio": round(results[3]["total"] / results[0]["total"], 3),
        "mfu_gpu": "bench/mfu.py (needs a GPU) -> bench/results/mfu.json",
        # tokens/s only mean something on an otherwise idle machine; the memory numbers do not depend on load
        "load_average_1_5_15min_before": load,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
