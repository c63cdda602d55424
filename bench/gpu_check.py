"""Issue 20's two GPU figures in one prepared call (not a test): paper-size chunk latency and DeepSpeed training MFU.

1. Latency -> gpu_latency.json. ``paper-5.3b`` in bf16 with random weights, three 256x256 views side by side
   (latent 16x48, 192 tokens per frame, paper §4.2), K = 4, the deployed sampler (3 video Euler steps to s = 0.6
   with CFG 5, 10 action steps, action CFG 1). One chunk is one steady-state iteration of Alg. 2 through the model's
   own Session API: ``observe`` (the cache update: the real frames of the chunk just executed replace their imagined
   copies), ``imagine`` (the FDM pass on the chunk now executing), ``predict_chunk`` (video, then actions).
   "Context C frames" = C real latent frames in the KV cache after the cache update (the FDM pass adds 4 imagined
   ones before the prediction). Every timed iteration starts from the same cache (restored from a snapshot), so the
   context stays at C. Total per chunk: wall clock between synchronizes; split (cache update / FDM / video / action):
   CUDA events. Warm-up iterations are excluded. Variants: ``eager`` and ``compile`` (``model.compile_layers()``);
   the headline (``paper_chunk_ms_p50`` ...) is the faster at 24 frames, named with whether it was compiled. One
   profiled iteration per variant names the attention kernels that ran (on CUDA the model uses compiled flex
   attention for passes of >= 128 query tokens, SDPA with a dense mask for the 16-token action passes).
   CUDA graphs are not used: the KV cache grows by concatenation, so every pass sees new input buffers.
2. MFU -> mfu.json, bench/mfu.py's file (same FLOP count, batch and fields; base-1b, 4 rows of 33 frames) with these
   variants: ``deepspeed-eager`` (the production engine as pipelines/train builds it), ``deepspeed-compile`` (the
   same engine around compiled layers), ``deepspeed-compile-tuned`` (built here: fused AdamW on the fp32 masters and
   ZeRO overlap_comm; the diff is the change pipelines/train would need), ``torch-compile`` and ``torch-eager``
   (references); ``variants["deepspeed"]`` repeats the best DeepSpeed variant and names it. A torch.profiler table of
   one step of each DeepSpeed variant goes to gpu_check_profile.txt (its top ops also into the JSON).

Device time on one H200, <= 8 min (estimates, not yet measured): start-up and imports ~0.3 min; eager latency
~2 min (budget 150 s: model build ~0.3, flex compile on first use ~0.5, 2 contexts x (2 warm-up + <= 25 timed
iterations), profile); MFU ~3 min (budget 180 s: FLOP count ~0.2, then deepspeed-compile ~0.8, -tuned ~0.5,
-eager ~0.4, torch-compile ~0.5, torch-eager ~0.3, each started only with >= 40 s of budget left); then the
compiled latency variant with what is left of 450 s: its compile warm-up (~16 Dynamo graphs of the layer) is the one
cost that cannot be bounded beforehand, so it runs last, and gpu_check.sh kills the run at 480 s. Each JSON is
rewritten after every context / variant, so a run stopped by a time limit keeps what it measured (a variant cut off
mid-way reads "status": "started").

``--dry-run`` rehearses every code path on CPU with the tiny preset (seconds; torch.compile with the "eager"
backend, i.e. Dynamo tracing without codegen) and writes to a temp dir (or --out-dir, never bench/results), marked
``"dry_run": true, "device": "cpu"``. Without --dry-run and without CUDA it refuses: no GPU, no figure.

Usage: bench/gpu_check.sh (on the GPU machine) | python bench/gpu_check.py [--dry-run] [--out-dir DIR] [--only PART]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import mfu  # noqa: E402
from bench.model_inference import make_session  # noqa: E402
from model import LingBotVA, get_preset, sampler  # noqa: E402

RESULTS = REPO / "bench" / "results"
LATENCY_GOAL_MS = 150.0
MFU_GOAL = 0.40


@dataclasses.dataclass(kw_only=True)
class Plan:
    """Sizes of one run: the GPU measurement (defaults) or the CPU rehearsal (``Plan.dry_run()``)."""

    latency_preset: str = "paper-5.3b"
    latent_hw: tuple[int, int] = (16, 48)  # 3 views of 256x256 through the 16x VAE: 8x24 = 192 tokens per frame
    text_len: int = 32  # instruction tokens (umT5 embeddings, random here)
    contexts: tuple[int, ...] = (24, 72)  # real latent frames in the cache; the first is the headline
    latency_variants: tuple[str, ...] = ("eager", "compile")
    latency_warmup: int = 2
    latency_repeats: int = 25
    latency_budget_s: float = 150.0  # the eager variant (run first); the compiled one gets what is left at the end
    mfu_preset: str = "base-1b"
    rows: int = 4
    frames: int = 33
    mfu_latent_hw: tuple[int, int] = (16, 32)
    mfu_text_len: int = 64
    mfu_variants: tuple[str, ...] = ("deepspeed-compile", "deepspeed-compile-tuned", "deepspeed-eager", "torch-compile",
                                     "torch-eager")
    mfu_warmup: int = 4
    mfu_steps: int = 8
    mfu_budget_s: float = 180.0
    min_variant_s: float = 40.0  # do not start an MFU variant (build + compile + steps) with less budget left
    total_budget_s: float = 450.0  # the compiled latency variant stops its timed loop here; gpu_check.sh kills at 480
    recompile_limit: int = 64  # Dynamo graphs per function: the session path needs ~16 of the layer (rows, None-ness)
    zero_stage: int = 2
    matmul_n: int = 8192
    compile_kwargs: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def dry_run(cls) -> Plan:
        return cls(latency_preset="tiny", latent_hw=(4, 8), text_len=8, latency_warmup=1, latency_repeats=2,
                   latency_budget_s=600.0, mfu_preset="tiny", rows=1, frames=9, mfu_latent_hw=(4, 8), mfu_text_len=8,
                   mfu_warmup=1, mfu_steps=1, mfu_budget_s=600.0, min_variant_s=0.0, total_budget_s=600.0,
                   matmul_n=128, compile_kwargs={"backend": "eager"},
                   recompile_limit=1)  # Dynamo traces once, then runs eager: the rehearsal tests code, not coverage


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (with n samples, p99 is the maximum for n < 100: the file says n)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def environment(device: torch.device, dry_run: bool) -> dict:
    cuda = device.type == "cuda"
    return {"dry_run": dry_run, "device": device.type, "gpu": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}


# ----------------------------------------------------------------------------------------------------- latency
class Marks:
    """Named points on the device timeline: CUDA events on a GPU, host clock (after a sync) on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))
        else:
            self.points.append((name, time.perf_counter()))

    def ms(self, a: str, b: str) -> float:
        """Milliseconds from the last mark named ``a`` before the last ``b`` to that ``b``."""
        names = [n for n, _ in self.points]
        j = len(names) - 1 - names[::-1].index(b)
        i = max(k for k in range(j) if names[k] == a)
        pa, pb = self.points[i][1], self.points[j][1]
        return pa.elapsed_time(pb) if self.cuda else (pb - pa) * 1000


def steady_state_session(model: LingBotVA, context: int, plan: Plan, device: torch.device, seed: int = 0):
    """A session at the start of an Alg. 2 iteration: ``context - K`` real frames committed, the outcome of the chunk
    being executed imagined provisionally; plus that chunk's real frames, its actions and the next chunk's actions."""
    c = model.config
    K = c.chunk_size
    chunks, rest = divmod(context - K - 1, K)
    if chunks < 0:
        raise ValueError(f"context {context} must be at least {K + 1} latent frames")
    s = make_session(model, chunks, True, seed=seed, latent_hw=plan.latent_hw, text_len=plan.text_len)
    g = torch.Generator().manual_seed(seed + 1)
    if rest:  # a shorter last chunk makes the context exactly `context` frames
        s.observe(torch.randn(rest, c.latent_channels, *plan.latent_hw, generator=g),
                  torch.randn(rest * c.tau, c.action_channels, generator=g))
    a_prev = torch.randn(K * c.tau, c.action_channels, generator=g).to(device)
    s.imagine(a_prev)
    # on a robot these come from the VAE and the last prediction, already on the device
    z_real = torch.randn(K, c.latent_channels, *plan.latent_hw, generator=g).to(device)
    a_next = torch.randn(K * c.tau, c.action_channels, generator=g).to(device)
    return s, z_real, a_prev, a_next


def snapshot(s) -> tuple:
    """The session's context (cache tensors are never written in place: appends concatenate, so references do)."""
    return list(s.cache.k), list(s.cache.v), s.cache.meta, list(s.history), s.next_frame, s.num_chunks, s._committed


def restore(s, snap: tuple) -> None:
    s.cache.k, s.cache.v, s.cache.meta = list(snap[0]), list(snap[1]), snap[2]
    s.history[:] = snap[3]
    s.next_frame, s.num_chunks, s._committed = snap[4], snap[5], snap[6]


def alg2_iteration(s, z_real, a_prev, a_next, marks: Marks) -> None:
    marks.mark("start")
    s.observe(z_real, a_prev)  # cache update: real frames + executed actions replace the imagined ones
    marks.mark("cache_update")
    s.imagine(a_next)  # FDM: the outcome of the chunk now executing, cached provisionally
    marks.mark("fdm")
    s.predict_chunk()  # video (partial denoise, marked at its end by the wrapper) then the action chunk
    marks.mark("end")


def time_context(model: LingBotVA, context: int, plan: Plan, device: torch.device, deadline: Deadline) -> dict:
    s, z_real, a_prev, a_next = steady_state_session(model, context, plan, device)
    marks = Marks(device)
    denoise = sampler.denoise_video

    def marked_denoise(*args, **kwargs):  # splits predict_chunk into its video and action parts
        out = denoise(*args, **kwargs)
        marks.mark("video")
        return out

    snap = snapshot(s)

    def once() -> float:
        marks.points.clear()
        restore(s, snap)
        mfu.synchronize(device)
        t0 = time.perf_counter()
        alg2_iteration(s, z_real, a_prev, a_next, marks)
        mfu.synchronize(device)
        return (time.perf_counter() - t0) * 1000

    t0 = time.perf_counter()
    with mock.patch.object(sampler, "denoise_video", marked_denoise):
        for _ in range(plan.latency_warmup):
            once()
        warm_s = time.perf_counter() - t0
        totals, alg1, split = [], [], {"cache_update": [], "fdm": [], "video": [], "action": []}
        for _ in range(plan.latency_repeats):
            if totals and deadline.left() < 0:
                break
            totals.append(once())
            for name, (a, b) in {"cache_update": ("start", "cache_update"), "fdm": ("cache_update", "fdm"),
                                 "video": ("fdm", "video"), "action": ("video", "end")}.items():
                split[name].append(marks.ms(a, b))
            alg1.append(totals[-1] - split["fdm"][-1])
    H, W = plan.latent_hw
    c = model.config
    tokens_per_frame = (H // c.patch_size[1]) * (W // c.patch_size[2])
    cached = s.cache.length  # after the last iteration: context + the K imagined frames, video and action tokens
    restore(s, snap)
    return {"context_frames": context, "frames_in_cache_at_predict": context + c.chunk_size,
            "tokens_per_frame": tokens_per_frame, "cache_tokens_at_predict": cached, "n": len(totals),
            "warmup_iterations": plan.latency_warmup, "warmup_s": round(warm_s, 1),
            "chunk_ms_p50": round(statistics.median(totals), 2), "chunk_ms_p99": round(percentile(totals, 99), 2),
            "chunk_ms_mean": round(statistics.fmean(totals), 2), "alg1_ms_p50": round(statistics.median(alg1), 2),
            "split_ms_p50": {k: round(statistics.median(v), 2) for k, v in split.items()},
            "session": s, "inputs": (z_real, a_prev, a_next), "snapshot": snap}


ATTENTION_KINDS = {  # substrings of profiler event names (aten ops and kernel names) -> kernel family
    "flex": ("flex_attention", "triton_tem_fused"),
    "flash": ("flash_attention", "flash_fwd", "pytorch_flash"),
    "efficient": ("efficient_attention", "fmha_cutlass", "mem_efficient"),
    "cudnn": ("cudnn_attention", "cudnn_sdpa", "cudnn_fmha"),
    "math": ("_scaled_dot_product_attention_math",),
}


def attention_kernels(run_once, device: torch.device) -> dict:
    """Profile one call and name the attention kernels that ran: {family: {event name: count}}."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_once()
        mfu.synchronize(device)
    found: dict[str, dict[str, int]] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        for kind, needles in ATTENTION_KINDS.items():
            if any(n in name for n in needles):
                found.setdefault(kind, {})[event.key[:120]] = event.count
    return found


def set_recompile_limit(n: int) -> None:
    """Dynamo's graphs-per-function limit (``recompile_limit``; ``cache_size_limit`` before torch 2.7)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, n)


def compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process (compiled layers and, on CUDA, the model's compiled flex)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def run_latency(plan: Plan, variant: str, device: torch.device, env: dict, out: Path, deadline: Deadline,
                result: dict | None = None) -> dict:
    """Measure one variant ('eager' | 'compile') at every context into ``result`` (new if None); rewrites ``out``."""
    log(f"latency {variant}: building {plan.latency_preset}")
    c = get_preset(plan.latency_preset).replace(action_init="random")  # random weights: timing only
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LingBotVA(c)
    model = model.to(torch.bfloat16).eval()
    build_s = round(time.perf_counter() - t0, 1)
    if result is None:
        result = {**env, "preset": plan.latency_preset, "dtype": "bfloat16", "weights": "random",
                  "parameters": sum(p.numel() for p in model.parameters()), "build_s": build_s,
                  "chunk_size": c.chunk_size, "latent_hw": list(plan.latent_hw), "text_len": plan.text_len,
                  "sampler": {"video_steps": c.video_steps, "video_s_end": c.video_s_end, "video_cfg": c.video_cfg,
                              "action_steps": c.action_steps, "action_cfg": c.action_cfg},
                  "chunk": "one Alg. 2 iteration: observe (cache update) + imagine (FDM) + predict_chunk (video, "
                           "actions); alg1_ms: the same iteration without the FDM pass (synchronous Alg. 1)",
                  "context": "real latent frames in the KV cache after the cache update; the FDM pass adds K "
                             "imagined ones before the prediction",
                  "timing": "total: wall clock between synchronizes; split: CUDA events (host clock on CPU); "
                            "warm-up iterations excluded",
                  "goal_ms_p50_ctx24": LATENCY_GOAL_MS, "cuda_graphs": False,
                  "cuda_graphs_why_not": "the KV cache is re-allocated by concatenation at every append, so each "
                                         "pass gets new input buffers; graphs need a preallocated cache in model/",
                  "variants": {}}
    record: dict = {"status": "started", "torch_compile_layers": variant == "compile",
                    "torch_compile_flex": device.type == "cuda"}  # model/lingbot_va.py compiles flex on CUDA
    result["variants"][variant] = record
    write(out, result)  # a run killed during a compile warm-up still says what it was doing
    graphs0 = compiled_graphs()
    try:
        if variant == "compile":
            model.compile_layers(**plan.compile_kwargs)
        for i, context in enumerate(plan.contexts):
            if deadline.left() < 0:
                record[f"ctx{context}"] = {"skipped": "time budget spent"}
                continue
            share = Deadline(deadline.left() / (len(plan.contexts) - i))  # timed repeats stop here; warm-ups do not
            t_context = time.perf_counter()
            timed = time_context(model, context, plan, device, share)
            timed["wall_s"] = round(time.perf_counter() - t_context, 1)  # with the history build (and compiles)
            s, inputs, snap = timed.pop("session"), timed.pop("inputs"), timed.pop("snapshot")
            if "attention_kernels" not in record:

                def profiled(s=s, inputs=inputs, snap=snap):
                    restore(s, snap)
                    alg2_iteration(s, *inputs, Marks(device))

                record["attention_kernels"] = attention_kernels(profiled, device)
            record[f"ctx{context}"] = timed
            del s, inputs, snap
            record["dynamo_graphs"] = compiled_graphs() - graphs0
            headline(result, plan)
            write(out, result)
            log(f"latency {variant} ctx{context}: {json.dumps(timed)}")
        record["status"] = "done"
    except Exception as exc:  # the other variant's numbers must survive
        record.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}")
        log(f"latency {variant}: {record['error']}")
    headline(result, plan)
    write(out, result)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def headline(result: dict, plan: Plan) -> None:
    """Top-level figures from the variant with the lower p50 at the headline context (the one a server would run)."""
    first, *rest = plan.contexts
    ok = [v for v in ("compile", "eager") if "chunk_ms_p50" in result["variants"].get(v, {}).get(f"ctx{first}", {})]
    if not ok:
        return
    best = min(ok, key=lambda name: result["variants"][name][f"ctx{first}"]["chunk_ms_p50"])
    v = result["variants"][best]
    result.update({"headline_variant": best, "torch_compile": v["torch_compile_layers"],
                   "attention_kernels": sorted(v.get("attention_kernels", {})),
                   "paper_chunk_ms_p50": v[f"ctx{first}"]["chunk_ms_p50"],
                   "paper_chunk_ms_p99": v[f"ctx{first}"]["chunk_ms_p99"],
                   "alg1_chunk_ms_p50": v[f"ctx{first}"]["alg1_ms_p50"],
                   "split_ms_p50": v[f"ctx{first}"]["split_ms_p50"], "n": v[f"ctx{first}"]["n"]})
    for ctx in rest:
        if "chunk_ms_p50" in v.get(f"ctx{ctx}", {}):
            result[f"paper_chunk_ms_p50_ctx{ctx}"] = v[f"ctx{ctx}"]["chunk_ms_p50"]
            result[f"paper_chunk_ms_p99_ctx{ctx}"] = v[f"ctx{ctx}"]["chunk_ms_p99"]
            result[f"split_ms_p50_ctx{ctx}"] = v[f"ctx{ctx}"]["split_ms_p50"]
    result["meets_goal"] = result["paper_chunk_ms_p50"] <= LATENCY_GOAL_MS and not result["dry_run"]


# ----------------------------------------------------------------------------------------------------- MFU
TUNING = {"optimizer": "torch.optim.AdamW(fused=True) on the fp32 master partitions",
          "zero_optimization": {"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8,
                                "allgather_bucket_size": 5e8}}


def build_tuned(config, plan: Plan, device: torch.device):
    """deepspeed-compile with TUNING: pipelines.train.parallelize.build_engine with two edits (see TUNING)."""
    import deepspeed

    from pipelines.train.parallelize import deepspeed_config, lr_lambda, use_repo_ops_cache
    from pipelines.train.settings import TrainSettings

    torch.manual_seed(0)
    with torch.device(device):
        model = LingBotVA(config.replace(action_init="random"))
    model.compile_layers(**plan.compile_kwargs)
    settings = TrainSettings(stage="pretrain", zero_stage=plan.zero_stage, precision="bf16", steps=1000,
                             register_model=False)
    use_repo_ops_cache()
    model.activation_checkpointing = settings.activation_checkpointing
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the same groups as build_engine
        (no_decay if p.ndim < 2 or "norm" in name or "scale_shift_table" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr, betas=(settings.beta1, settings.beta2), fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(settings))
    ds_config = deepspeed_config(settings, 1)
    if plan.zero_stage >= 2:
        ds_config["zero_optimization"].update(TUNING["zero_optimization"])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine.module, mfu.engine_step(engine)


def profile_step(step, batch: dict, device: torch.device, path: Path, title: str) -> list:
    """One step under torch.profiler: the table to ``path``; returns the top ops by self time [name, ms, share]."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step(batch, torch.Generator().manual_seed(0))
        mfu.synchronize(device)
    events = prof.key_averages()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(path, "a") as f:
        f.write(f"== {title}\n{events.table(sort_by=attr, row_limit=40)}\n")
    total = sum(getattr(e, attr) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:12]
    return [[e.key[:100], round(getattr(e, attr) / 1000, 2), round(getattr(e, attr) / total, 3)] for e in top]


def run_mfu(plan: Plan, device: torch.device, env: dict, out: Path, profile_path: Path, deadline: Deadline) -> dict:
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:  # a free port: a rehearsal may run beside other jobs
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    if device.type == "cpu":
        # one CPU rank needs no shared-memory allreduce: skip DeepSpeed's JIT build of that op (minutes on a fresh
        # 2-core machine); torch.distributed (gloo) does the one-rank reductions. The GPU path never builds it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    profile_path.unlink(missing_ok=True)
    config = get_preset(plan.mfu_preset)
    with torch.device("meta"):
        counts = LingBotVA(config.replace(action_init="random")).stream_parameters()
    measured_peak = mfu.matmul_peak(device, plan.matmul_n)
    result = {**env, "preset": plan.mfu_preset, "parameters": counts, "rows": plan.rows, "frames": plan.frames,
              "latent_hw": list(plan.mfu_latent_hw), "text_len": plan.mfu_text_len, "zero_stage": plan.zero_stage,
              "warmup_steps": plan.mfu_warmup, "timed_steps": plan.mfu_steps,
              "datasheet_peak_tflops": mfu.DATASHEET_BF16 / 1e12,
              "measured_matmul_tflops": round(measured_peak / 1e12, 1), "goal_mfu_deepspeed": MFU_GOAL,
              "tuning": TUNING, "variants": {}}
    batch = mfu.make_batch(config, plan.rows, plan.frames, plan.mfu_latent_hw, plan.mfu_text_len, device)
    log(f"mfu: counting the FLOPs of {plan.mfu_preset}")
    with torch.device(device):
        counter = LingBotVA(config.replace(action_init="random")).to(torch.bfloat16)
    result["flops"] = mfu.count_flops(counter, batch)
    del counter
    best = None
    for variant in plan.mfu_variants:
        if deadline.left() < plan.min_variant_s:
            result["variants"][variant] = {"skipped": "MFU time budget spent"}
            continue
        log(f"mfu {variant}: build, {plan.mfu_warmup} warm-up + {plan.mfu_steps} timed steps")
        step, graphs0 = None, compiled_graphs()
        try:
            if variant == "deepspeed-compile-tuned":
                _, step = build_tuned(config, plan, device)
            else:
                _, step = mfu.build(variant, config, plan.zero_stage, device, plan.compile_kwargs)
            record = mfu.add_rates(mfu.measure(step, batch, plan.mfu_warmup, plan.mfu_steps, device), result,
                                   measured_peak)
            record["dynamo_graphs"] = compiled_graphs() - graphs0
            if variant.startswith("deepspeed"):  # where the production path's time goes
                record["profile_top"] = profile_step(step, batch, device, profile_path, variant)
                if best is None or record["mfu"] > best[1]["mfu"]:
                    best = (variant, record)
            result["variants"][variant] = record
        except Exception as exc:  # one failing variant must not lose the others' numbers
            result["variants"][variant] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        log(f"mfu {variant}: {json.dumps(result['variants'][variant])}")
        if best is not None:
            result["variants"]["deepspeed"] = {**best[1], "variant": best[0],
                                               "meets_goal": best[1]["mfu"] >= MFU_GOAL and not env["dry_run"]}
        write(out, result)
        del step  # the engine and its optimizer state go before the next variant is built
        gc.collect()  # DeepSpeed's hooks make reference cycles: without this the next variant may not fit
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="rehearse every code path on CPU (tiny preset)")
    parser.add_argument("--out-dir", default=None, help="where the JSONs go (default: bench/results; dry run: a temp dir)")
    parser.add_argument("--only", choices=("latency", "mfu"), default=None, help="run one part")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        sys.exit("gpu_check: no CUDA GPU on this machine, so no GPU figure; rehearse with --dry-run")
    plan = Plan.dry_run() if args.dry_run else Plan()
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="gpu_check_dry_") if args.dry_run else RESULTS)).resolve()
    if args.dry_run and out_dir == RESULTS.resolve():
        sys.exit("gpu_check: a dry run never writes over bench/results; pick another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if cuda and not args.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = True
    env = environment(device, args.dry_run)
    paths = {"latency": out_dir / "gpu_latency.json", "mfu": out_dir / "mfu.json",
             "profile": out_dir / "gpu_check_profile.txt"}
    total = Deadline(plan.total_budget_s)
    set_recompile_limit(plan.recompile_limit)  # also for the model's compiled flex attention (rows 1/2, lengths)
    latency = None
    # eager latency, then MFU, then the compiled latency variant: its compile warm-up is the one cost that cannot be
    # bounded in advance (~16 Dynamo graphs of the layer), so it gets whatever time is left
    if args.only in (None, "latency"):
        latency = run_latency(plan, "eager", device, env, paths["latency"], Deadline(plan.latency_budget_s))
    if args.only in (None, "mfu"):
        torch._dynamo.reset()
        run_mfu(plan, device, env, paths["mfu"], paths["profile"], Deadline(min(plan.mfu_budget_s, total.left())))
    if args.only in (None, "latency") and "compile" in plan.latency_variants:
        torch._dynamo.reset()
        run_latency(plan, "compile", device, env, paths["latency"], total, latency)
    print(json.dumps({"out_dir": str(out_dir), "wall_s": round(plan.total_budget_s - total.left(), 1), **env}),
          flush=True)


if __name__ == "__main__":
    main()
