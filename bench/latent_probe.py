"""How much of the scene a VAE's latents carry, at the flow times the policy reads them (not a test).

Linear (ridge) probes on standardised latents of collected episodes, for a trained VAE directory and for the random
Wan2.2-layout VAE the embedded default used before:
  * hand xyz (robot state at the latent frame's last pixel frame), on clean latents (s = 1) and at s = 0.6, the flow
    time the action stream is conditioned on after partial denoising (and the level of noisy-history augmentation);
  * the reach goal from the first latent frame (reach-v3: the hand's final position, within 5 cm of the goal).
R^2 on validation episodes; the ridge strength is picked on the training split by 5-fold cross-validation.

Usage: .venv/bin/python bench/latent_probe.py --vae data/vae --vae random [--max-episodes 200]
Writes bench/results/latent_probe.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def encode_split(vae, refs, episodes_dir: Path) -> list[dict]:
    from pipelines.data.encode import episode_frames

    out, datasets = [], {}
    for ref in refs:
        ep, _, _, frames = episode_frames(ref, episodes_dir, datasets)
        z = vae.encode(torch.from_numpy(frames))[0]  # (F, C, h, w) standardised
        state = np.asarray(ep.state, np.float64)
        idx = np.minimum(np.arange(z.shape[0]) * 4, len(state) - 1)
        out.append({"z": z, "hand": state[idx, :3], "final": state[-1, :3], "task": ep.task})
    return out


def noisy(z: torch.Tensor, s: float, seed: int) -> torch.Tensor:
    if s >= 1.0:
        return z
    g = torch.Generator().manual_seed(seed)
    return (1 - s) * torch.randn(z.shape, generator=g) + s * z


def ridge_r2(xt, yt, xv, yv) -> list[float]:
    mu, ym = xt.mean(0), yt.mean(0)
    xt, xv = xt - mu, xv - mu
    best, folds = None, np.arange(len(xt)) % 5
    for lam in LAMBDAS:  # cross-validated on the training split only
        err = 0.0
        for f in range(5):
            a, b = folds != f, folds == f
            w = np.linalg.solve(xt[a].T @ xt[a] + lam * a.sum() * np.eye(xt.shape[1]), xt[a].T @ (yt[a] - ym))
            err += ((xt[b] @ w + ym - yt[b]) ** 2).sum()
        best = (err, lam) if best is None or err < best[0] else best
    lam = best[1]
    w = np.linalg.solve(xt.T @ xt + lam * len(xt) * np.eye(xt.shape[1]), xt.T @ (yt - ym))
    pred = xv @ w + ym
    return [round(float(v), 3) for v in 1 - ((pred - yv) ** 2).sum(0) / ((yv - yv.mean(0)) ** 2).sum(0)]


def probe(vae_arg: str, episodes_dir: Path, prepared_dir: Path, max_episodes: int) -> dict:
    from model.encoders import VideoVAE
    from pipelines.data.encode import fit_latent_stats, list_episodes

    vae = VideoVAE.small(latent_channels=48, seed=0) if vae_arg == "random" else VideoVAE.from_pretrained(vae_arg)
    refs = list_episodes(prepared_dir)
    train = [r for r in refs if r.split == "train"]
    val = [r for r in refs if r.split == "val"]
    train = train[:: max(1, len(train) // max_episodes)][:max_episodes]
    t0 = time.perf_counter()
    vae.with_latent_stats(*fit_latent_stats(vae, train, episodes_dir))
    enc_t, enc_v = encode_split(vae, train, episodes_dir), encode_split(vae, val, episodes_dir)
    result = {"vae": vae_arg, "train_episodes": len(train), "val_episodes": len(val), "hand_xyz_r2": {}}
    for s in (1.0, 0.6):
        xt = np.concatenate([noisy(e["z"], s, i).flatten(1).numpy() for i, e in enumerate(enc_t)])
        xv = np.concatenate([noisy(e["z"], s, 10_000 + i).flatten(1).numpy() for i, e in enumerate(enc_v)])
        yt = np.concatenate([e["hand"] for e in enc_t])
        yv = np.concatenate([e["hand"] for e in enc_v])
        result["hand_xyz_r2"][f"s={s}"] = ridge_r2(xt, yt, xv, yv)
    reach_t = [e for e in enc_t if e["task"] == "reach-v3"]
    reach_v = [e for e in enc_v if e["task"] == "reach-v3"]
    if len(reach_t) >= 10 and len(reach_v) >= 2:
        result["reach_goal_from_first_frame_r2"] = ridge_r2(
            np.stack([e["z"][0].flatten().numpy() for e in reach_t]), np.stack([e["final"] for e in reach_t]),
            np.stack([e["z"][0].flatten().numpy() for e in reach_v]), np.stack([e["final"] for e in reach_v]))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vae", action="append", required=True, help="a VAE directory or 'random' (repeatable)")
    parser.add_argument("--episodes-dir", type=Path, default=REPO / "data" / "episodes")
    parser.add_argument("--prepared-dir", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--max-episodes", type=int, default=200, help="training episodes (spread over tasks)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "latent_probe.json")
    args = parser.parse_args()
    results = [probe(v, args.episodes_dir, args.prepared_dir, args.max_episodes) for v in args.vae]
    for r in results:
        print(json.dumps(r))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"probes": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
