"""Training MFU of a ~1B LingBot-VA preset in bf16 on one GPU (not a test; needs CUDA).

One optimizer step = compute_loss (teacher forcing: clean + noisy copies of whole episodes, chunk-causal joint
attention through flex attention's block-sparse path) + backward + gradient clipping + AdamW step, in bf16.

Model FLOPs are counted, not estimated from a parameter count: every nn.Linear / nn.Conv3d call of one forward pass
is hooked (2 * in * out per token), plus joint attention over the pairs the chunk-causal mask allows (4 * D per
pair: QK^T and PV) and text cross-attention (4 * D * Lv * T); a training step is 3x the forward. Activation
recomputation is not counted (it is not useful work). MFU = model FLOPs / step time / peak, with the peak both the
datasheet dense bf16 rate of the H100/H200 SXM (989.4 TFLOP/s) and a bf16 8192^3 matmul measured in the same run.

Engines: ``torch`` (bf16 weights, fused AdamW) and ``deepspeed`` (the training entrypoint's own engine: bf16 with
fp32 master weights, ZeRO from --zero-stage; single rank), each eager or with ``model.compile_layers()``.
Writes bench/results/mfu.json.  Usage: python bench/mfu.py [--variants torch-eager,torch-compile,deepspeed-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model import LingBotVA, get_preset  # noqa: E402
from model.masks import TokenMeta, allowed  # noqa: E402
from model.sequence import build_training_sequence  # noqa: E402

DATASHEET_BF16 = 989.4e12


def make_batch(config, rows: int, frames: int, hw: tuple[int, int], text_len: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    B = rows
    return {
        "video": torch.randn(B, frames, config.latent_channels, *hw, generator=g).to(device),
        "actions": torch.randn(B, (frames - 1) * config.tau, config.action_channels, generator=g).to(device),
        "action_mask": torch.ones(B, config.action_channels, dtype=torch.bool, device=device),
        "text": torch.randn(B, text_len, config.text_dim, generator=g).to(device),
        "chunk_size": config.chunk_size,
    }


def count_flops(model: LingBotVA, batch: dict) -> dict:
    """Forward FLOPs of one compute_loss call, by hooking every matmul-bearing module and counting mask pairs."""
    linear = 0

    def hook(mod, inp, out):
        nonlocal linear
        x = inp[0]
        if isinstance(mod, torch.nn.Linear):
            linear += 2 * (x.numel() // mod.in_features) * mod.in_features * mod.out_features
        elif isinstance(mod, torch.nn.Conv3d):
            k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1] * mod.kernel_size[2]
            linear += 2 * (out.numel() // mod.out_channels) * k * mod.out_channels

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv3d)]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.compute_loss(batch, gen)
    for h in handles:
        h.remove()
    seq = build_training_sequence(model, batch, torch.Generator().manual_seed(1))
    meta = TokenMeta.cat([seq.video.meta, seq.action.meta])
    pairs = int(allowed(meta, meta, model.config.attn_window_chunks).sum())
    c = model.config
    D = c.video_dim  # joint attention runs in the video's heads x head_dim space for both streams
    joint = 4 * D * pairs * c.num_layers
    rows, video_tokens, text_len = seq.video.x.shape[0], seq.video.x.shape[1], seq.context.shape[1]
    cross = 4 * D * rows * video_tokens * text_len * c.num_layers  # every video token reads its row's text
    fwd = linear + joint + cross
    total_tokens = video_tokens + seq.action.x.shape[1]
    return {"forward_flops": fwd, "step_flops": 3 * fwd, "linear_flops": linear, "joint_attention_flops": joint,
            "cross_attention_flops": cross, "tokens_per_row": total_tokens, "mask_pairs": pairs,
            "mask_density": pairs / (rows * total_tokens**2)}


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def build(variant: str, config, zero_stage: int, device="cuda", compile_kwargs: dict | None = None):
    """(model, step) of one variant '<torch|deepspeed>-<eager|compile>'; ``compile_kwargs`` go to compile_layers."""
    engine_name, mode = variant.split("-")
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's CPU init takes longer than its steps
        model = LingBotVA(config.replace(action_init="random"))
    if mode == "compile":
        model.compile_layers(**(compile_kwargs or {}))
    if engine_name == "torch":
        model = model.to(torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

        def step(batch, gen):
            out = model(batch, gen)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out["loss"]

        return model, step
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29531"}.items():
        os.environ.setdefault(k, v)
    from pipelines.train.parallelize import build_engine
    from pipelines.train.settings import TrainSettings

    settings = TrainSettings(stage="pretrain", zero_stage=zero_stage, precision="bf16", steps=1000, register_model=False)
    engine, _ = build_engine(model, settings, 1)
    return engine.module, engine_step(engine)


def engine_step(engine):
    """One training step through a DeepSpeed engine: forward, engine.backward, engine.step; returns the loss."""

    def step(batch, gen):
        out = engine(batch, gen)
        engine.backward(out["loss"])
        engine.step()
        return out["loss"]

    return step


def measure(step, batch: dict, warmup: int, steps: int, device) -> dict:
    """Time ``steps`` optimizer steps after ``warmup`` untimed ones; the per-variant fields of mfu.json, less the
    FLOP-derived ones (``add_rates`` fills those in)."""
    gen = torch.Generator().manual_seed(0)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(batch, gen)
    synchronize(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step(batch, gen)
    synchronize(device)
    dt = (time.perf_counter() - t0) / steps
    out = {"step_s": round(dt, 4), "warmup_s": round(warm_s, 1), "loss": float(loss.detach())}
    if cuda:
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        # allocator retries (cache flushed to satisfy an allocation) are a classic hidden slowdown near full memory
        out["alloc_retries"] = int(torch.cuda.memory_stats().get("num_alloc_retries", 0))
    return out


def add_rates(record: dict, result: dict, measured_peak: float) -> dict:
    """Throughput and MFU of a ``measure`` record, from the counted FLOPs in ``result``."""
    dt = record["step_s"]
    flops = result["flops"]["step_flops"] / dt
    record.update({
        "tokens_per_s": round(result["rows"] * result["flops"]["tokens_per_row"] / dt),
        "achieved_tflops": round(flops / 1e12, 1), "mfu": round(flops / DATASHEET_BF16, 4),
        "mfu_vs_measured_matmul": round(flops / measured_peak, 4)})
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="base-1b")
    parser.add_argument("--variants", default="torch-eager,torch-compile,deepspeed-compile")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4, help="episodes per step (one packed row each)")
    parser.add_argument("--frames", type=int, default=33, help="latent frames per episode")
    parser.add_argument("--latent-hw", type=int, nargs=2, default=(16, 32), help="latent grid (two views side by side)")
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--profile", default=None, help="write a torch.profiler table of one step per variant here")
    parser.add_argument("--out", default=str(REPO / "bench/results/mfu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/mfu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    config = get_preset(args.preset)
    with torch.device("meta"):
        counts = LingBotVA(config.replace(action_init="random")).stream_parameters()
    measured_peak = matmul_peak(device)
    result = {"preset": args.preset, "parameters": counts, "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "rows": args.rows, "frames": args.frames, "latent_hw": list(args.latent_hw),
              "text_len": args.text_len, "datasheet_peak_tflops": DATASHEET_BF16 / 1e12,
              "measured_matmul_tflops": round(measured_peak / 1e12, 1), "variants": {}}
    batch = make_batch(config, args.rows, args.frames, tuple(args.latent_hw), args.text_len, device)
    counter = LingBotVA(config.replace(action_init="random")).cuda().to(torch.bfloat16)  # eager: hooks see every call
    result["flops"] = count_flops(counter, batch)
    del counter
    torch.cuda.empty_cache()
    for variant in args.variants.split(","):
        try:
            model, step = build(variant, config, args.zero_stage)
            result["variants"][variant] = add_rates(measure(step, batch, args.warmup, args.steps, device), result,
                                                    measured_peak)
            gen = torch.Generator().manual_seed(0)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step(batch, gen)
                    torch.cuda.synchronize()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
                with open(args.profile, "a") as f:
                    f.write(f"== {variant}\n{table}\n")
        except Exception as exc:  # one failing variant must not lose the others' numbers
            result["variants"][variant] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        print(variant, json.dumps(result["variants"][variant]), flush=True)
        del step
        model = None  # noqa: F841 - drop the last reference before emptying the cache
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "variants"}, indent=1))


if __name__ == "__main__":
    main()
