"""Closed-loop success against training steps: the learning curve that sizes the CPU schedule (not a test).

Evaluates every model directory a training run wrote — the snapshots of ``lingbot train ... --snapshot-every N``
(``<run>/snapshots/stepNNNNNNN``) and the final ``<run>/model`` — on the same held-out episodes of one task
(rollout.evaluate, sync, eval seed 1), and logs ``curve/success`` (and ``curve/progress``) at each step into the
training run's own MLflow run, next to its loss curves. Writes bench/results/learning_curve-<task>-<run>.json.

Usage:
  lingbot train posttrain --task door-open-v3 --init-from data/runs/pretrain/model --steps 320 --snapshot-every 80 \\
      --run-dir data/runs/curve-door-open --no-register
  .venv/bin/python bench/learning_curve.py --run-dir data/runs/curve-door-open --task door-open-v3 --episodes 10
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def model_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, model directory) of a run's snapshots and its final model, by step."""
    found = [(int(p.name.removeprefix("step")), p) for p in (run_dir / "snapshots").glob("step*")
             if (p / "config.json").is_file()]
    summary = run_dir / "summary.json"
    if (run_dir / "model" / "config.json").is_file() and summary.is_file():
        found.append((int(json.loads(summary.read_text())["step"]), run_dir / "model"))
    if not found:
        raise SystemExit(f"{run_dir} has no snapshots/ or model/ to evaluate (train with --snapshot-every N)")
    return sorted(found)


def main() -> None:
    from pipelines.evaluate.rollout import evaluate

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tracking-uri", default=None, help="default: sqlite under data/mlflow")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    points = []
    t0 = time.perf_counter()
    for step, model in model_dirs(args.run_dir):
        r = evaluate(model, [args.task], episodes=args.episodes, max_steps=args.max_steps, workers=args.workers,
                     videos_per_task=0)["tasks"][args.task]
        points.append({"step": step, "model": str(model), "success_rate": r["success_rate"], "progress": r["progress"],
                       "episodes": r["episodes"]})
        print(json.dumps(points[-1]), flush=True)
    result = {"task": args.task, "run_dir": str(args.run_dir), "episodes": args.episodes, "max_steps": args.max_steps,
              "eval_seed": 1, "mode": "sync", "machine": f"{platform.machine()}, CPU", "points": points,
              "wall_s": round(time.perf_counter() - t0, 1)}
    summary = args.run_dir / "summary.json"
    run_id = json.loads(summary.read_text()).get("mlflow_run_id") if summary.is_file() else None
    if run_id:
        import mlflow

        from pipelines.settings import default_tracking_uri

        uri = args.tracking_uri or default_tracking_uri(REPO / "data")
        client = mlflow.MlflowClient(tracking_uri=uri)
        for p in points:
            client.log_metric(run_id, "curve/success", p["success_rate"], step=p["step"])
            client.log_metric(run_id, "curve/progress", p["progress"], step=p["step"])
        result["mlflow_run_id"] = run_id
    out = args.out or REPO / "bench" / "results" / f"learning_curve-{args.task}-{args.run_dir.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
