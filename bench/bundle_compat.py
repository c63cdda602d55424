"""Every model directory on this machine loads as a policy bundle and acts exactly as before the bundle existed.

For each directory under the data dir holding ``config.json`` + ``model.safetensors`` (the runs, the demo's, the
registry's downloads and logged models), two worker processes, one on the code of ``--old-rev`` (extracted with
``git archive`` into a temporary folder) and one on this checkout, load it as a policy and drive one episode the same
way with the same seed: chunk 0 (sync plan), chunk 1 after the FDM pass (async), chunk 2 after observing executed
frames and actions; plus the native commands of chunk 0 (a reactive model skips the FDM step). Every array must be
equal bit for bit. The new side also saves the loaded bundle to a temporary folder and compares config.json with the
original (the directories are bundle version 1 as written; see ``round_trip``). Read-only for the data dir; writes
bench/results/bundle_compat.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bundle_compat.py [--data-dir data] [--old-rev cae65f2] [--limit N]
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

REPO = Path(__file__).resolve().parents[1]
OLD_REV = "cae65f2"
"""The last commit before the policy bundle (model directories were read by ``pipelines.evaluate.policy``)."""
ARRAYS = ("unified0", "native0", "latents0", "unified1", "latents1", "unified2", "latents2")


def model_dirs(data_dir: Path) -> list[Path]:
    """Every directory with config.json + model.safetensors under ``data_dir`` (a VAE folder holds neither)."""
    return sorted(p.parent for p in data_dir.rglob("model.safetensors") if (p.parent / "config.json").is_file())


def drive(policy, adapter) -> dict:
    """One episode, seeded: plan (sync), imagine + plan (async; a world model only), observe + plan."""
    import numpy as np

    rng = np.random.default_rng(0)
    views, side = len(policy.cameras), policy.image_size
    state = np.array([0.0, 0.6, 0.2, 0.5])
    ep = policy.episode(policy.tasks[0], seed=7)
    ep.start(rng.integers(0, 256, (views, side, side, 3), dtype=np.uint8))
    p0 = ep.plan()
    native0 = policy.native_actions(p0.actions, state)
    p1 = None
    if policy.model.config.objective != "reactive":  # a reactive model has no forward dynamics to imagine with
        ep.imagine(p0)
        p1 = ep.plan()
    n = len(p0.actions)
    states = np.repeat(state[None], n, axis=0)
    ep.observe(rng.integers(0, 256, (n, views, side, side, 3), dtype=np.uint8), adapter.to_unified(native0, states))
    p2 = ep.plan()
    none = np.zeros(0)
    return {"unified0": p0.actions, "native0": native0, "latents0": p0.latents.numpy(),
            "unified1": none if p1 is None else p1.actions, "latents1": none if p1 is None else p1.latents.numpy(),
            "unified2": p2.actions, "latents2": p2.latents.numpy()}


def round_trip(original: Path, saved: Path) -> dict:
    """config.json of a loaded-and-saved bundle against the original: byte for byte, and else entry by entry (the
    model config compared as a ``LingBotConfig``: fields added since the directory was written come back with their
    defaults, which is the config class's doing, not the bundle's)."""
    import numpy as np

    from model.config import LingBotConfig

    a, b = json.loads(original.read_text()), json.loads(saved.read_text())
    same_config = LingBotConfig.from_dict(a.pop("model")) == LingBotConfig.from_dict(b.pop("model"))
    return {"config_bytes_equal": np.array(original.read_bytes() == saved.read_bytes()),
            "config_round_trip": np.array(same_config and a == b)}


def worker(api: str, dirs: list[str], out: Path) -> None:
    """Load and drive every directory with the ``api`` ("old" or "new") code on sys.path; one .npz each."""
    import numpy as np
    import torch

    import model

    torch.set_num_threads(1)
    print(f"{api}: model package from {Path(model.__file__).parent}", flush=True)
    from pipelines.data.embodiments import get_adapter

    for i, d in enumerate(dirs):
        result: dict = {}
        try:
            if api == "old":
                from pipelines.evaluate.policy import ChunkPolicy

                policy = ChunkPolicy(d)
            else:
                from model.bundle import PolicyBundle
                from model.policy import ChunkPolicy

                bundle = PolicyBundle.load(d)
                policy = ChunkPolicy(bundle, get_adapter(bundle.embodiment))
                with tempfile.TemporaryDirectory() as tmp:
                    saved = bundle.save(Path(tmp) / "model")
                    result.update(round_trip(Path(d) / "config.json", saved / "config.json"))
            result.update(drive(policy, policy.adapter))
        except Exception as err:  # recorded, compared: a directory one side cannot load is a finding
            result = {"error": np.array(f"{type(err).__name__}: {err}")}
        np.savez(out / f"{i:04d}.npz", **result)
        print(f"{api} {i + 1}/{len(dirs)} {d}", flush=True)


def compare(dirs: list[Path], old: Path, new: Path) -> list[dict]:
    import numpy as np

    rows = []
    for i, d in enumerate(dirs):
        a, b = np.load(old / f"{i:04d}.npz"), np.load(new / f"{i:04d}.npz")
        row: dict = {"dir": str(d)}
        for side, z in (("old_error", a), ("new_error", b)):
            if "error" in z:
                row[side] = str(z["error"])
        if "old_error" not in row and "new_error" not in row:
            row["equal"] = all(np.array_equal(a[k], b[k], equal_nan=True) for k in ARRAYS)
            row["max_abs_diff"] = max(float(np.nanmax(np.abs(a[k] - b[k]), initial=0.0)) for k in ARRAYS)
            row["config_round_trip"] = bool(b["config_round_trip"])
            row["config_bytes_equal"] = bool(b["config_bytes_equal"])
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--old-rev", default=OLD_REV)
    parser.add_argument("--limit", type=int, default=None, help="only the first N directories (a quick look)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "bundle_compat.json")
    parser.add_argument("--worker", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--dirs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, json.loads(args.dirs.read_text()), args.npz)
    dirs = model_dirs(args.data_dir.resolve())[: args.limit]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "old-src"
        src.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.old_rev, "model", "pipelines"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        (tmp / "dirs.json").write_text(json.dumps([str(d) for d in dirs]))
        for api, root in (("old", src), ("new", REPO)):
            (tmp / api).mkdir()
            env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
            subprocess.run([sys.executable, __file__, "--worker", api, "--dirs", str(tmp / "dirs.json"),
                            "--npz", str(tmp / api)], check=True, env=env, cwd=tmp)
        rows = compare(dirs, tmp / "old", tmp / "new")
    same = [r for r in rows if r.get("equal") and r.get("config_round_trip")]
    report = {"old_rev": args.old_rev, "directories": len(rows), "identical_and_round_trip": len(same),
              "config_bytes_equal": sum(bool(r.get("config_bytes_equal")) for r in rows),
              "different": [r for r in rows if r not in same], "seconds": round(time.perf_counter() - t0, 1),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
