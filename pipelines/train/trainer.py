"""Pre-training and post-training under torchrun + DeepSpeed, tracked in MLflow (rank 0 logs, every rank computes).

    torchrun --standalone --nproc_per_node N -m pipelines.cli train pretrain [--resume]

Resumable: DeepSpeed checkpoints (model, optimizer, scheduler) every N steps carry the step, the number of micro-
batches consumed by all ranks together and the MLflow run id, so `--resume` continues the same run at the same
position. Micro-batch i of the run (counted over all ranks) draws its windows and its noise from generators seeded by
(seed, i) alone, so the data stream does not depend on the world size: an elastic restart at another node count
resumes (through a universal checkpoint, ``checkpoint.py``) with the next unseen micro-batches, and with
``world x grad_accum`` unchanged it reproduces the uninterrupted run's steps. DeepSpeed writes the ``latest`` pointer
only after a checkpoint is complete, so a crash mid-save resumes from the previous one. The final model is a
consolidated policy bundle (``model.bundle``) with the features it trained with.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import LingBotVA, get_preset
from pipelines.data.encode import dist_info
from pipelines.data.loader import PackedWindows
from pipelines.train import checkpoint
from pipelines.train.ema import WeightEMA
from pipelines.train.parallelize import build_engine, use_repo_ops_cache
from pipelines.train.settings import TrainSettings


def _init_distributed() -> tuple[int, int]:
    use_repo_ops_cache()
    import deepspeed

    rank, world = dist_info()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank, world


def _all_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def init_model_dir(settings: TrainSettings) -> Path:
    """The model directory ``settings.init_from`` names. A registry URI (the cluster's pretrained
    ``models:/lingbot-va-base@challenger``) is downloaded by rank 0 under the data dir, which every rank must see (one
    machine, or the cluster's shared workspace volume); the others take the same version's directory from it."""
    source = str(settings.init_from)
    if not source.startswith("models:/"):
        return Path(source)
    import mlflow

    from pipelines.tracking_store import resolve_model

    found = [None]
    if int(os.environ.get("RANK", 0)) == 0:
        mlflow.set_tracking_uri(settings.mlflow_uri)
        found[0] = str(resolve_model(source, settings.data_dir)[0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(found, src=0)  # one lookup: an alias moving meanwhile cannot split the ranks
    return Path(found[0])


def _build_model(settings: TrainSettings, index: dict) -> LingBotVA:
    if settings.init_from is not None:
        model = LingBotVA.from_pretrained(init_model_dir(settings))
        model.config = model.config.replace(fdm_loss_weight=settings.fdm_loss_weight, objective=settings.objective)
    else:
        torch.manual_seed(settings.seed)
        model = LingBotVA(get_preset(settings.preset, fdm_loss_weight=settings.fdm_loss_weight,
                                     objective=settings.objective))
    c = model.config
    if index["latent_channels"] != c.latent_channels or index["text_dim"] != c.text_dim:
        raise ValueError(f"latents have {index['latent_channels']} channels / text width {index['text_dim']}, the model "
                         f"expects {c.latent_channels} / {c.text_dim}: encode the data for preset {settings.preset!r}")
    return model


def _micro_batch_rngs(seed: int, index: int) -> tuple[np.random.Generator, torch.Generator]:
    """Window sampling and noise generators of the run's micro-batch ``index`` (counted over all ranks): a function
    of the position in the data stream alone, never of the rank layout, so a resume at any world size continues it."""
    data, noise = np.random.SeedSequence([seed, index]).spawn(2)
    return np.random.default_rng(data), torch.Generator().manual_seed(int(noise.generate_state(1, np.uint64)[0]))


def _validate(engine, loader: PackedWindows | None, settings: TrainSettings) -> dict[str, float] | None:
    if loader is None:
        return None
    rng, gen = np.random.default_rng(12345), torch.Generator().manual_seed(12345)  # the same batches every time
    engine.eval()
    totals = np.zeros(4)
    with torch.no_grad():
        for _ in range(settings.val_batches):
            out = engine(loader.sample(rng), gen)
            totals += [out[k].item() for k in ("loss", "dyn", "inv", "fdm")]
    engine.train()
    loss, dyn, inv, fdm = _all_mean(list(totals / settings.val_batches))
    return {"val_loss": loss, "val_dyn": dyn, "val_inv": inv, "val_fdm": fdm}


@torch.no_grad()
def _predict_val_chunk(model: LingBotVA, loader: PackedWindows | None):
    """(real latents (1+K, C, h, w), predicted (K, C, h, w), views) of the first validation episode, or None
    (no validation split, or the reactive baseline, which predicts no video)."""
    if loader is None or model.config.objective == "reactive":
        return None
    K = model.config.chunk_size
    episode = loader.data.episodes[0]
    if episode["num_frames"] < 1 + K:
        return None
    item = loader.data.load(0, 0, 1 + K)
    session = model.session(item["text"], item["action_mask"], generator=torch.Generator().manual_seed(0))
    session.observe(item["video"][:1])
    predicted, _ = session.predict_chunk()
    return item["video"], predicted, max(1, len(episode.get("cameras", [])))


def train(settings: TrainSettings, *, resume: bool | str = False, progress: bool | None = None) -> dict:
    """Run (or resume) one training stage; returns a summary (final step, losses, model dir).

    ``resume=True`` requires a checkpoint; ``resume="auto"`` continues from one when it exists and starts fresh
    otherwise (a restarted cluster pod: the first attempt has nothing to resume).
    """
    from pipelines.train.tracking import Tracker

    index_file = settings.latents / "index.json"
    if not index_file.is_file():
        raise ValueError(f"missing data: {index_file} not found; run `lingbot data encode` (or `make data`) first")
    index = json.loads(index_file.read_text())
    tasks = sorted({e["task"] for e in index["episodes"] if settings.trains_on(e["task"])})
    if not tasks:
        raise ValueError(f"no task left to train on in {index_file} (task {settings.task}, "
                         f"exclude_tasks {settings.exclude_tasks})")
    rank, world = _init_distributed()
    fdm = settings.fdm_loss_weight > 0
    loader = PackedWindows(settings.latents, "train", token_budget=settings.token_budget, rows=settings.rows, fdm=fdm,
                           seed=settings.seed, tasks=tasks, max_per_task=settings.demos,
                           episode_start_prob=settings.episode_start_prob)
    try:
        val_loader = PackedWindows(settings.latents, "val", token_budget=settings.token_budget, rows=settings.rows,
                                   fdm=fdm, seed=settings.seed, tasks=tasks,
                                   episode_start_prob=settings.episode_start_prob)
    except ValueError:
        val_loader = None
    ckpt_dir = settings.output / "checkpoints"
    source = checkpoint.resume_point(ckpt_dir, resume, world, rank)
    model = _build_model(settings, index)
    engine, ds_config = build_engine(model, settings, world, load_universal=source is not None and source[1])
    step, consumed, run_id = 0, 0, None  # consumed: micro-batches drawn by all ranks together
    if source is not None:
        client = checkpoint.load(engine, *source)
        step, run_id = client["step"], client.get("mlflow_run_id")
        # a checkpoint from before the counter holds one RNG state per rank instead: it had drawn grad_accum micro-
        # batches per rank and step (its per-rank generators themselves cannot be carried over)
        saved_world = client.get("world_size", len(client.get("data_rng", [None])))
        consumed = client.get("micro_batches", step * settings.grad_accum * saved_world)
        if rank == 0:
            print(f"[{settings.run_name}] resumed at step {step} ({consumed} micro-batches drawn) on {world} ranks, "
                  f"saved on {saved_world}", flush=True)
    ema = WeightEMA(engine.module, settings.ema_decay) if settings.ema_decay else None
    if ema is not None and source is not None:
        ema.load(ckpt_dir / checkpoint.latest_tag(ckpt_dir), rank, world)

    tracker = Tracker(settings, index, ds_config, run_id=run_id) if rank == 0 else None
    stop_at = settings.steps if settings.max_steps_this_run is None else min(settings.steps, step + settings.max_steps_this_run)
    bar = tqdm(total=settings.steps, initial=step, desc=settings.run_name, disable=(rank != 0) or (progress is False) or None)
    last = {}
    engine.train()
    while step < stop_at:
        t0, tokens, samples, acc = time.perf_counter(), 0, 0, np.zeros(4)
        for micro in range(settings.grad_accum):
            rng, gen = _micro_batch_rngs(settings.seed, consumed + micro * world + rank)
            batch = loader.sample(rng)
            out = engine(batch, gen)
            engine.backward(out["loss"])
            engine.step()
            acc += [out[k].item() for k in ("loss", "dyn", "inv", "fdm")]
            tokens += loader.batch_tokens(batch)
            samples += len(batch["num_frames"])
        if ema is not None:
            ema.update()
        step, consumed = step + 1, consumed + settings.grad_accum * world
        dt = time.perf_counter() - t0
        loss, dyn, inv, fdm_l = _all_mean(list(acc / settings.grad_accum))
        grad_norm = engine.get_global_grad_norm()
        last = {"loss": loss, "L_dyn": dyn, "L_inv": inv, "L_fdm": fdm_l, "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "tokens_per_s": tokens * world / dt, "samples_per_s": samples * world / dt}
        if tracker and step % settings.log_every == 0:
            tracker.log_metrics(last, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{last['lr']:.1e}")
        if rank == 0 and bar.disable and (step % max(1, settings.steps // 20) == 0 or step == stop_at):
            # no terminal: one concise line every 5% of the run instead of a progress bar
            print(f"[{settings.run_name}] step {step}/{settings.steps} loss {loss:.4f} (dyn {dyn:.4f} inv {inv:.4f} "
                  f"fdm {fdm_l:.4f}) lr {last['lr']:.2e} {last['tokens_per_s']:.0f} tok/s", flush=True)
        if step % settings.val_every == 0 or step == settings.steps:
            val = _validate(engine, val_loader, settings)
            if val:
                last.update(val)
                if tracker:
                    tracker.log_metrics(val, step)
            strip = _predict_val_chunk(engine.module, val_loader)  # every rank: ZeRO-3 forwards are collective
            if tracker and strip is not None:
                tracker.log_prediction_strip(*strip, step)
        if settings.snapshot_every and step % settings.snapshot_every == 0 and step < settings.steps:
            _save_final(engine, settings, index, None, ema, out=settings.output / "snapshots" / f"step{step:07d}")
        if step % settings.checkpoint_every == 0 or step == stop_at:
            client = {"step": step, "micro_batches": consumed, "world_size": world,
                      "mlflow_run_id": tracker.run_id if tracker else None}  # DeepSpeed saves rank 0's client state
            if ema is not None:  # beside the checkpoint, before DeepSpeed marks it complete
                ema.save(ckpt_dir / checkpoint.step_tag(step), rank, world)
            checkpoint.save(engine, ckpt_dir, step, client, settings.keep_checkpoints)
    bar.close()
    summary = {"step": step, "finished": step >= settings.steps, **last}
    if step >= settings.steps:
        summary["model_dir"] = str(_save_final(engine, settings, index, tracker, ema))
        if ema is not None and settings.save_raw:  # the last trained weights too, to measure what the average buys
            _save_final(engine, settings, index, None, None, out=settings.output / "snapshots" / "raw")
    if tracker:
        summary["mlflow_run_id"] = tracker.run_id
        tracker.finish(summary)
    if rank == 0:
        settings.output.mkdir(parents=True, exist_ok=True)
        (settings.output / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _save_final(engine, settings: TrainSettings, index: dict, tracker, ema: WeightEMA | None = None,
                out: Path | None = None) -> Path:
    """Consolidate (ZeRO-3 gathers the shards) and write the model directory (default ``<run>/model``) on rank 0:
    the weight average when the run keeps one (``ema``), else the last trained weights."""
    with ema.swapped() if ema is not None else contextlib.nullcontext():
        return _write_model_dir(engine, settings, index, tracker, out)


def _write_model_dir(engine, settings: TrainSettings, index: dict, tracker, out: Path | None) -> Path:
    import deepspeed

    from pipelines.train.tracking import policy_bundle

    model: LingBotVA = engine.module
    out = out or settings.output / "model"
    params = list(model.parameters())
    zero3 = settings.zero_stage == 3
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else contextlib.nullcontext()
    with ctx:
        # every rank records a digest of the full parameters: data-parallel replicas must agree bit for bit
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in params)).hexdigest()
        settings.output.mkdir(parents=True, exist_ok=True)
        (settings.output / f"param_digest.rank{int(os.environ.get('RANK', 0))}.txt").write_text(digest)
        if int(os.environ.get("RANK", 0)) == 0:
            policy_bundle(model, settings, index).save(out)
    if dist.is_initialized():
        dist.barrier()
    if tracker:
        tracker.log_model(out)
    return out

