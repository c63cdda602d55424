"""Gate determinism check across a code change (not a test): the action digests, success and steps of a few sync
episodes of existing models, through the gate's own path (``rollout.evaluate``, one worker), written to JSON and,
with ``--compare``, checked against an earlier run of this script.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/gate_digests.py --out /tmp/before.json
       OMP_NUM_THREADS=1 .venv/bin/python bench/gate_digests.py --out /tmp/after.json --compare /tmp/before.json
Exits 1 when an episode's digest, success or steps differ from the compared run. Run both sides within minutes of
each other on a shared machine: wall times move with its load (``cpu_s``, the process's CPU time, moves less).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = {"reach-v3": "posttrain-reach-v3", "drawer-close-v3": "posttrain-drawer-close-v3"}


def main() -> None:
    from pipelines.evaluate.rollout import evaluate

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=REPO / "data" / "runs")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--mode", default="sync", choices=("sync", "async"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path, default=None)
    args = parser.parse_args()
    episodes: list[dict] = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    last_cpu = [cpu0]

    def record(r: dict) -> None:  # the process's CPU seconds since the last episode (the first: model loads too)
        now = time.process_time()
        episodes.append({**{k: r[k] for k in ("task", "index", "actions_digest", "success", "steps", "wall_s",
                                              "error")}, "cpu_s": now - last_cpu[0]})
        last_cpu[0] = now

    for task, run in MODELS.items():
        evaluate(args.runs / run / "model", [task], episodes=args.episodes, mode=args.mode, workers=1,
                 max_steps=args.max_steps, progress=record)
        last_cpu[0] = time.process_time()
    out = {"mode": args.mode, "max_steps": args.max_steps, "wall_s": time.perf_counter() - t0,
           "cpu_s": time.process_time() - cpu0, "episodes": episodes}
    args.out.write_text(json.dumps(out, indent=1))
    for e in episodes:
        print(f"{e['task']:<18}{e['index']:>3}  {e['actions_digest'][:12]}  success={e['success']!s:<5} "
              f"steps={e['steps']:>3}  wall={e['wall_s']:.2f}s  cpu={e['cpu_s']:.2f}s  {e['error'] or ''}")
    print(f"mean episode wall {sum(e['wall_s'] for e in episodes) / len(episodes):.2f} s; process CPU "
          f"{out['cpu_s']:.1f} s")
    if args.compare is None:
        return
    before = {(e["task"], e["index"]): e for e in json.loads(args.compare.read_text())["episodes"]}
    diffs = [f"{e['task']} {e['index']}: {k} {before[e['task'], e['index']][k]!r} -> {e[k]!r}"
             for e in episodes for k in ("actions_digest", "success", "steps")
             if before[e["task"], e["index"]][k] != e[k]]
    print("\n".join(diffs) if diffs else "identical: every episode's digest, success and steps match")
    if all("wall_s" in e for e in before.values()):
        print(f"mean episode wall before {sum(e['wall_s'] for e in before.values()) / len(before):.2f} s")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
