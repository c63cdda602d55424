"""MT10 closed-loop success: the world model vs the reactive baseline and blind replay, and async vs sync (not a test).

Reads the post-trained model directories of `make train` (data/runs/posttrain-<task>/model) and of
`bench/train_variants.sh` (posttrain-<task>-reactive: the reactive baseline; posttrain-<task>[-reactive]-demos10: both
on 10 demos per task) and rolls each out in Meta-World with `pipelines.evaluate.rollout.evaluate` on held-out goal
positions. Async vs sync runs the world model paced at the Sawyer's 80 Hz control rate, so the episode wall times are
what a robot would see; it uses posttrain-<task>-fdm (trained with L_fdm, which Alg. 2's imagination step needs; the
make-train stages skip it) when that exists, else the make-train model (its FDM pass then untrained: noted).
The blind-replay baseline (pipelines/evaluate/replay.py) executes demo 0's end-effector targets open loop on the same
held-out episodes: a policy must beat it to claim it uses its camera.
Writes bench/results/eval_mt10.json (partial results are kept: a missing model is recorded as such).

With ``--reports data/metrics`` the world model's per-task numbers are read from the `evaluate@<task>` DVC stages
reports (``eval-<task>.json``: the same rollouts, held-out seed 1, written by `lingbot evaluate`) when they cover at
least ``--episodes`` episodes of the sync mode, instead of rolling the same episodes out a second time.

Usage: .venv/bin/python bench/eval_mt10.py [--episodes 20] [--max-steps 300] [--reports data/metrics]
       [--async-tasks reach-v3,drawer-close-v3] [--skip-variants] [--only demos_10,...]
``--only`` reruns the named parts and merges them into the existing --out (same episodes, steps and seed), e.g. the
10-demo models once `bench/train_variants.sh demos10 reactive-demos10` has trained them; each part records when it ran.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(model_dir, task: str, **kw) -> dict:
    from pipelines.evaluate.rollout import evaluate

    r = evaluate(model_dir, [task], videos_per_task=0, **kw)
    t = r["tasks"][task]
    return {k: t[k] for k in KEEP}


KEEP = ("episodes", "success_rate", "progress", "steps_to_success", "episode_wall_s", "plan_ms_p50", "nan_episodes",
        "errors")


def from_report(reports: Path | None, task: str, episodes: int) -> dict | None:
    """The sync-mode numbers of ``task`` from the gate's report (dvc stage evaluate@task), if it covers ``episodes``."""
    path = reports / f"eval-{task}.json" if reports else None
    if path is None or not path.is_file():
        return None
    report = json.loads(path.read_text())
    t = report.get("tasks", {}).get(task)
    if report.get("mode") != "sync" or report.get("eval_seed") != 1 or not t or t["episodes"] < episodes:
        return None
    return {**{k: t[k] for k in KEEP}, "source": str(path), "model_version": report.get("model_version")}


def summary(per_task: dict) -> dict:
    rates = [v["success_rate"] for v in per_task.values()]
    return {"avg_success": sum(rates) / len(rates) if rates else None,
            "per_task": {k: v["success_rate"] for k, v in per_task.items()}, "detail": per_task}


PARTS = ("world_model", "baseline", "demos_10", "blind_replay", "async_vs_sync")


def difference(a: dict | None, b: dict | None) -> dict | None:
    """a − b in success rate over the tasks both cover, pooled over their episodes, with its standard error.

    Both policies ran on the same held-out episodes, so a paired (per-episode) test would be tighter; pooling the
    per-task rates gives the conservative, unpaired standard error sqrt(pa(1-pa)/n + pb(1-pb)/n).
    """
    if not a or not b or not a.get("per_task") or not b.get("per_task"):
        return None
    common = sorted(set(a["per_task"]) & set(b["per_task"]))
    if not common:
        return None
    n = sum(a["detail"][t]["episodes"] for t in common)
    pa = sum(a["per_task"][t] * a["detail"][t]["episodes"] for t in common) / n
    pb = sum(b["per_task"][t] * b["detail"][t]["episodes"] for t in common) / n
    se = math.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)
    return {"tasks": common, "episodes": n, "diff": round(pa - pb, 4), "stderr": round(se, 4),
            "per_task": {t: round(a["per_task"][t] - b["per_task"][t], 4) for t in common}}


def main() -> None:
    from pipelines.data.metaworld_collect import MT10

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=REPO / "data" / "runs")
    parser.add_argument("--tasks", default=",".join(MT10))
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--async-tasks", default="reach-v3,drawer-close-v3", help="tasks for async vs sync ('' = none)")
    parser.add_argument("--async-episodes", type=int, default=5)
    parser.add_argument("--reports", type=Path, default=None, help="reuse evaluate@<task> reports (world model, sync)")
    parser.add_argument("--skip-variants", action="store_true", help="world model only (no baseline / 10-demo runs)")
    parser.add_argument("--episodes-dir", type=Path, default=REPO / "data" / "episodes",
                        help="collected demos: the blind-replay baseline replays demo 0 of each task")
    parser.add_argument("--no-blind-replay", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "eval_mt10.json")
    parser.add_argument("--demos10-suffix", default="",
                        help="10-demo runs to evaluate: posttrain-<task>[-reactive]-demos10<SUFFIX> (e.g. "
                             "--demos10-suffix=-s480 for train_variants.sh's RUN_SUFFIX=-s480); recorded under "
                             "demos_10.run_suffix")
    parser.add_argument("--only", default="",
                        help="comma-separated parts to (re)run, merged into an existing --out: world_model, baseline, "
                             "demos_10, blind_replay, async_vs_sync (default: all; the other parts are kept as they are)")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    parts = {p for p in args.only.split(",") if p} or set(PARTS)
    if unknown := parts - set(PARTS):
        parser.error(f"--only: unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    if args.skip_variants:
        parts -= {"baseline", "demos_10"}
    if args.no_blind_replay:
        parts.discard("blind_replay")
    if not args.async_tasks:
        parts.discard("async_vs_sync")
    common = {"episodes": args.episodes, "max_steps": args.max_steps, "workers": args.workers}
    header = {"machine": f"{platform.machine()}, CPU", "episodes_per_task": args.episodes,
              "max_steps": args.max_steps, "eval_seed": 1, "mode": "sync", "demos_per_task": 50}
    result: dict = {**header, "demos_10": {"demos_per_task": 10}}
    if args.only and args.out.is_file():
        result = json.loads(args.out.read_text())
        kept = {k: result.get(k) for k in header if k != "machine"}
        if kept != {k: v for k, v in header.items() if k != "machine"}:
            parser.error(f"--only merges into {args.out}, which was run with {kept}: rerun every part instead")
    t0 = time.perf_counter()
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    variants = {"world_model": "", "baseline": "-reactive"}
    low_data = {"world_model": f"-demos10{args.demos10_suffix}", "baseline": f"-reactive-demos10{args.demos10_suffix}"}
    plan = [(k, v) for k, v in variants.items() if k in parts]
    plan += [(f"demos_10.{k}", v) for k, v in low_data.items() if "demos_10" in parts]
    for key, suffix in plan:
        per_task, missing, t_part = {}, [], time.perf_counter()
        for task in tasks:
            model_dir = args.runs / f"posttrain-{task}{suffix}" / "model"
            if not (model_dir / "config.json").is_file():
                missing.append(task)
                continue
            reused = from_report(args.reports, task, args.episodes) if key == "world_model" else None
            per_task[task] = reused or run(model_dir, task, **common)
            print(key, task, per_task[task]["success_rate"], flush=True)
        entry = {**summary(per_task), "missing": missing, "evaluated_at": stamp,
                 "wall_s": round(time.perf_counter() - t_part, 1)}
        if missing:
            entry["status"] = f"no post-trained model for {len(missing)} of {len(tasks)} tasks under {args.runs}"
        if key.startswith("demos_10."):
            low = result.setdefault("demos_10", {"demos_per_task": 10})
            low[key.split(".", 1)[1]], low["run_suffix"] = entry, args.demos10_suffix
        else:
            result[key] = entry
    if "blind_replay" in parts:
        from functools import partial

        from pipelines.evaluate.replay import ReplayPolicy

        per_task, t_part = {}, time.perf_counter()
        for task in tasks:
            per_task[task] = run(partial(ReplayPolicy, args.episodes_dir), task, **common)
            print("blind_replay", task, per_task[task]["success_rate"], flush=True)
        result["blind_replay"] = {**summary(per_task), "demo": 0, "episodes_dir": str(args.episodes_dir),
                                  "evaluated_at": stamp, "wall_s": round(time.perf_counter() - t_part, 1)}
    result["world_model_minus_baseline"] = difference(result.get("world_model"), result.get("baseline"))
    result["demos_10"]["world_model_minus_baseline"] = difference(result["demos_10"].get("world_model"),
                                                                  result["demos_10"].get("baseline"))
    if "async_vs_sync" not in parts:
        finish(result, args.out, t0)
        return
    sync_async = {}
    for task in [t for t in args.async_tasks.split(",") if t]:
        fdm_dir = args.runs / f"posttrain-{task}-fdm" / "model"
        model_dir = fdm_dir if (fdm_dir / "config.json").is_file() else args.runs / f"posttrain-{task}" / "model"
        if not (model_dir / "config.json").is_file():
            continue
        kw = {**common, "episodes": args.async_episodes, "control_rate_hz": 80.0}
        sync_async[task] = {mode: run(model_dir, task, mode=mode, **kw) for mode in ("sync", "async")}
        sync_async[task]["model"] = str(model_dir)
        sync_async[task]["fdm_trained"] = model_dir == fdm_dir
        s, a = sync_async[task]["sync"], sync_async[task]["async"]
        sync_async[task]["wall_time_speedup"] = s["episode_wall_s"] / a["episode_wall_s"]
        print("async vs sync", task, json.dumps({m: sync_async[task][m]["success_rate"] for m in ("sync", "async")}),
              round(sync_async[task]["wall_time_speedup"], 2), flush=True)
    result["async_vs_sync"] = {"control_rate_hz": 80.0, "episodes_per_task": args.async_episodes, "per_task": sync_async,
                               "evaluated_at": stamp}
    finish(result, args.out, t0)


def finish(result: dict, out: Path, t0: float) -> None:
    result["wall_s"] = round(time.perf_counter() - t0, 1)  # this invocation's; each part records its own
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result.get(k, {}).get("avg_success") for k in ("world_model", "baseline", "blind_replay")}))
    print("10 demos:", json.dumps(result["demos_10"].get("world_model_minus_baseline")))


if __name__ == "__main__":
    main()
