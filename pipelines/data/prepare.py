"""Prepare step: validate episodes, split 90/10 per dataset, fit normalisation on the train split, publish features.

Inputs are LeRobot-format datasets under ``episodes_dir`` (one folder per dataset). Outputs under ``prepared_dir``:
    <dataset>/split.json   {"train": [...], "val": [...], "quarantined": [...]} episode indices
    stats.json             per embodiment: unified-action quantile stats (train split only) and state mean/std
    tasks.json             task -> instruction
    quarantine/report.json every episode left out, with the reasons; its files are copied beside it
and the feature store (norm stats, embodiment metadata, task metadata with the instruction embedding) is
materialised, so training and serving read the same values through ``pipelines.data.features.read_features``.
Upstream files are never modified (they are the collect step's DVC outputs); bad episodes are copied aside.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

from model.normalization import ActionNormalizer
from pipelines.data.embodiments import get_adapter
from pipelines.data.lerobot.reader import LeRobotDataset
from pipelines.data.shards import TAU


def dataset_version(root: Path) -> str:
    """Content hash of a dataset folder (names, sizes and bytes of every file)."""
    h = hashlib.md5()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def split_episodes(indices: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split by episode; at least one validation episode when there are two or more."""
    order = np.random.default_rng(seed).permutation(sorted(indices)).tolist()
    n_val = 0 if len(order) < 2 or val_fraction <= 0 else max(1, round(len(order) * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def prepare(
    episodes_dir: Path,
    prepared_dir: Path,
    *,
    text_encoder,
    feature_repo=None,
    val_fraction: float = 0.1,
    seed: int = 0,
    min_latent_frames: int = 5,
) -> dict:
    """Run the prepare step over every dataset in ``episodes_dir``; returns a summary."""
    from pipelines.data.features import publish_features

    roots = sorted(p.parent.parent for p in episodes_dir.glob("*/meta/info.json"))
    if not roots:
        raise ValueError(f"no LeRobot datasets under {episodes_dir}; run `lingbot data collect` or `import` first")
    prepared_dir.mkdir(parents=True, exist_ok=True)
    quarantine_dir = prepared_dir / "quarantine"
    min_raw = 1 + (min_latent_frames - 1) * TAU
    report, train_actions, train_states = [], defaultdict(list), defaultdict(list)
    tasks, horizons, versions, embodiments = {}, defaultdict(list), {}, set()
    summary = {"datasets": {}}
    for root in roots:
        ds = LeRobotDataset(root)
        good = []
        for idx in range(len(ds)):
            problems = ds.problems(idx, min_length=min_raw)
            if problems:
                report.append({"dataset": root.name, "episode_index": idx, "reasons": problems})
                _copy_aside(ds, idx, quarantine_dir / root.name)
            else:
                good.append(idx)
        train, val = split_episodes(good, val_fraction, seed)
        split = {"train": train, "val": val, "quarantined": [r["episode_index"] for r in report if r["dataset"] == root.name]}
        (prepared_dir / root.name).mkdir(exist_ok=True)
        (prepared_dir / root.name / "split.json").write_text(json.dumps(split, indent=1))
        versions[root.name] = dataset_version(root)
        for idx in good:
            meta = ds.episode_meta(idx)
            table = ds.frame_table(idx).to_pandas()  # this episode's rows (v3.0 files hold many episodes)
            actions = np.stack(table["action"].to_numpy()).astype(np.float32)
            state = np.stack(table["observation.state"].to_numpy()).astype(np.float32)
            embodiment = meta["embodiment"]
            embodiments.add(embodiment)
            tasks[meta["task"]] = (meta["instruction"], embodiment)
            horizons[meta["task"]].append(len(table))
            if idx in train:
                train_actions[embodiment].append(get_adapter(embodiment).to_unified(actions, state))
                train_states[embodiment].append(state)
        summary["datasets"][root.name] = {"train": len(train), "val": len(val), "quarantined": len(split["quarantined"])}
    if not any(s["train"] + s["val"] for s in summary["datasets"].values()):
        raise ValueError(f"no usable episodes left after validation; see {quarantine_dir / 'report.json'}")
    missing_train = sorted(e for e in embodiments if not train_actions[e])
    if missing_train:
        raise ValueError(f"embodiments {missing_train} have no training episodes to fit normalisation on")

    stats = {}
    for emb in sorted(embodiments):
        states = np.concatenate(train_states[emb])
        stats[emb] = {
            "action": ActionNormalizer.fit(np.concatenate(train_actions[emb])).to_dict(),
            "state_mean": states.mean(0).tolist(),
            "state_std": states.std(0).tolist(),
            "dataset_version": hashlib.md5("".join(sorted(versions.values())).encode()).hexdigest(),
        }
    (prepared_dir / "stats.json").write_text(json.dumps(stats, indent=1))
    (prepared_dir / "tasks.json").write_text(json.dumps({t: i for t, (i, _) in sorted(tasks.items())}, indent=1))
    quarantine_dir.mkdir(exist_ok=True)
    (quarantine_dir / "report.json").write_text(json.dumps(report, indent=1))

    names = sorted(tasks)
    emb, _ = text_encoder.encode([tasks[t][0] for t in names])
    publish_features(
        feature_repo,
        embodiment_stats={e: stats[e] for e in stats},
        embodiment_meta={e: get_adapter(e).spec.to_dict() for e in stats},
        task_meta={t: {"instruction": tasks[t][0], "embodiment": tasks[t][1], "horizon": int(max(horizons[t])),
                       "instruction_embedding": emb[i].numpy()} for i, t in enumerate(names)},
    )
    summary.update(quarantined=len(report), tasks=len(names), embodiments=sorted(embodiments),
                   dataset_versions=versions)
    (prepared_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _copy_aside(ds: LeRobotDataset, index: int, dest: Path) -> None:
    """Copy whatever files an episode has into the quarantine folder (upstream stays untouched)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ds.episode_files(index):
        target = dest / f.relative_to(ds.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
