"""A/B of inference settings or weights on the same held-out episodes (not a test): e.g. video CFG 5.0 (the paper's)
vs 1.0, or the saved weight average (``<run>/model``) vs the last trained weights (``<run>/snapshots/raw``).

Each variant rolls out the same post-trained runs on the same episodes (same env seeds, same sampler seeds) with only
the named ``Session`` settings, the model directory inside the run (``model=<subdir>``, default ``model``), or
the latent frames planned per chunk (``chunk_size=K``: K x tau control steps run before the next plan) changed, so
the difference is the setting's.

Usage: .venv/bin/python bench/sampler_ab.py --tasks reach-v3,drawer-close-v3 --episodes 20 \
           --variant cfg5:video_cfg=5.0 --variant cfg1:video_cfg=1.0
       .venv/bin/python bench/sampler_ab.py --tasks door-open-v3 --variant ema: --variant raw:model=snapshots/raw \
           --out bench/results/ema_ab.json
Writes bench/results/sampler_ab.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,...`` -> (name, settings); ``model`` names the model directory inside the run."""
    name, _, settings = text.partition(":")
    out: dict = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if key == "model":
            out[key] = value
        else:
            out[key] = int(value) if key in ("video_steps", "action_steps", "window_chunks", "chunk_size") \
                else float(value)
    return name, out


def main() -> None:
    from model.policy import ChunkPolicy
    from pipelines.data.embodiments import get_adapter
    from pipelines.evaluate.rollout import evaluate

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=REPO / "data" / "runs")
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variant", action="append", required=True, help="name:key=value[,key=value]")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sampler_ab.json")
    args = parser.parse_args()
    variants = dict(parse_variant(v) for v in args.variant)
    result: dict = {"episodes_per_task": args.episodes, "max_steps": args.max_steps, "eval_seed": 1, "variants": {}}
    t0 = time.perf_counter()
    for name, sampler in variants.items():
        per_task = {}
        sampler = dict(sampler)
        subdir = sampler.pop("model", "model")
        chunk_size = sampler.pop("chunk_size", None)
        for task in args.tasks.split(","):
            model_dir = args.runs / f"posttrain-{task}" / subdir
            policy = partial(ChunkPolicy.load, str(model_dir), get_adapter, chunk_size=chunk_size, sampler=sampler)
            report = evaluate(policy, [task], episodes=args.episodes, workers=args.workers, max_steps=args.max_steps,
                              videos_per_task=0)
            t = report["tasks"][task]
            per_task[task] = {k: t[k] for k in ("success_rate", "progress", "plan_ms_p50")}
            print(name, task, per_task[task], flush=True)
        rates = [v["success_rate"] for v in per_task.values()]
        result["variants"][name] = {"sampler": sampler, "model": subdir, "chunk_size": chunk_size,
                                    "avg_success": sum(rates) / len(rates), "per_task": per_task}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v["avg_success"] for k, v in result["variants"].items()}))


if __name__ == "__main__":
    main()
