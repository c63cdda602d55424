"""`lingbot data ...` entry points: parse -> build -> run -> report. Each step is a small module beside this one."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.settings import DataSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="collect, import, prepare and encode robot data").add_subparsers(
        dest="data_command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter  # every flag's help shows its default
    d = DataSettings()

    p = data.add_parser("collect", formatter_class=fmt, help="scripted-expert demonstrations from a simulator suite")
    p.add_argument("--suite", default=d.suite, choices=["metaworld"], help="simulator suite")
    p.add_argument("--tasks", default=d.tasks, help="MT10, MT50 or comma-separated task names")
    p.add_argument("--episodes", type=int, default=d.episodes, help="successful episodes per task")
    p.add_argument("--image-size", type=int, default=d.image_size, help="square camera images, pixels")
    p.add_argument("--cameras", default=d.cameras,
                   help="comma-separated views: scene cameras or derived views (pipelines.data.embodiments.METAWORLD_VIEWS)")
    p.add_argument("--seed", type=int, default=d.seed, help="collection seed (each task derives its own)")
    p.add_argument("--workers", type=int, default=d.workers, help="parallel simulator processes")
    p.add_argument("--out", type=Path, default=d.episodes_dir,
                   help="episodes dir: one LeRobot v3.0 dataset per task (metaworld-<task>)")
    p.add_argument("--summary", type=Path, default=d.data_dir / "metrics" / "collect.json",
                   help="where the run summary (counts, wall time, size) is written; kept out of --out so the "
                        "dataset bytes depend only on the seed")
    p.set_defaults(func=collect)

    p = data.add_parser("import", formatter_class=fmt, help="import a LeRobot-format dataset from a local path")
    p.add_argument("--lerobot", type=Path, required=True, help="path of the LeRobot dataset")
    p.add_argument("--embodiment", required=True, help="embodiment adapter of its actions (e.g. metaworld-sawyer)")
    p.add_argument("--name", default=None, help="dataset name under the episodes dir (default: source folder name)")
    p.add_argument("--out", type=Path, default=d.episodes_dir, help="episodes dir the dataset is written into")
    p.set_defaults(func=import_lerobot)

    p = data.add_parser("prepare", formatter_class=fmt, help="validate, split, fit normalisation, publish features")
    p.add_argument("--episodes-dir", type=Path, default=d.episodes_dir, help="LeRobot datasets to prepare")
    p.add_argument("--out", type=Path, default=d.prepared_dir, help="splits, stats, quarantine report")
    p.add_argument("--feast-dir", type=Path, default=d.feast_dir, help="feature store data (published features)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="validation share per dataset")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the train/val split")
    p.add_argument("--min-latent-frames", type=int, default=d.min_latent_frames,
                   help="episodes with fewer latent frames are quarantined")
    p.add_argument("--preset", default=d.preset, help="model preset whose text width the text encoder must produce")
    p.add_argument("--text-encoder", type=Path, default=d.text_encoder_path,
                   help="local T5/umT5 directory (default: a small random encoder)")
    p.set_defaults(func=prepare)

    from pipelines.data.autoencoder import AutoencoderConfig

    a = AutoencoderConfig()
    p = data.add_parser("train-vae", formatter_class=fmt,
                        help="train the embedded default's video VAE on the collected training frames")
    p.add_argument("--episodes-dir", type=Path, default=d.episodes_dir, help="collected LeRobot datasets")
    p.add_argument("--prepared-dir", type=Path, default=d.prepared_dir, help="the prepare step's splits")
    p.add_argument("--out", type=Path, default=d.data_dir / "vae", help="where the trained VAE is saved")
    p.add_argument("--preset", default=d.preset, help="model preset whose latent channels the VAE must produce")
    p.add_argument("--dims", default=",".join(map(str, a.dims)), help="widths of the 3 encoder stages")
    p.add_argument("--steps", type=int, default=a.steps, help="optimizer steps")
    p.add_argument("--batch", type=int, default=a.batch, help="clips per step")
    p.add_argument("--lr", type=float, default=a.lr, help="learning rate")
    p.add_argument("--max-episodes", type=int, default=None, help="train on at most this many episodes (spread)")
    p.add_argument("--data-dir", type=Path, default=d.data_dir, help="MLflow store root (experiment lingbot-vae)")
    p.add_argument("--seed", type=int, default=a.seed, help="init and sampling seed")
    p.set_defaults(func=train_vae)

    p = data.add_parser("encode", formatter_class=fmt,
                        help="VAE latent shards + text embeddings (run under torchrun for N ranks)")
    p.add_argument("--episodes-dir", type=Path, default=d.episodes_dir, help="collected LeRobot datasets")
    p.add_argument("--prepared-dir", type=Path, default=d.prepared_dir, help="the prepare step's splits and stats")
    p.add_argument("--feast-dir", type=Path, default=d.feast_dir, help="feature store data")
    p.add_argument("--out", type=Path, default=d.latents_dir, help="latent shards + index.json")
    p.add_argument("--preset", default=d.preset, help="model preset whose latent channels the VAE must produce")
    p.add_argument("--vae", type=Path, default=d.vae_path,
                   help="VAE directory (the vae stage's, or Wan2.2's; default: a small random VAE)")
    p.add_argument("--shard-episodes", type=int, default=d.shard_episodes, help="episodes per shard file")
    p.set_defaults(func=encode)


def collect(args: argparse.Namespace) -> int:
    from pipelines.data.metaworld_collect import collect as collect_metaworld
    from pipelines.data.metaworld_collect import resolve_tasks

    tasks = resolve_tasks(args.tasks)
    start = time.time()
    cameras = tuple(c.strip() for c in args.cameras.split(",") if c.strip())
    results = collect_metaworld(tasks, args.episodes, seed=args.seed, image_size=args.image_size,
                                workers=args.workers, cameras=cameras, out_dir=args.out)
    kept = {t: r[0] for t, r in results.items()}
    discarded = {t: r[1] for t, r in results.items()}
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    summary = {"tasks": tasks, "cameras": list(cameras), "kept": kept, "discarded": discarded,
               "wall_seconds": round(time.time() - start, 1), "bytes_on_disk": size}
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=1))
    short = [t for t, n in kept.items() if n < args.episodes]
    print(f"collected {sum(kept.values())} episodes of {len(tasks)} tasks in {summary['wall_seconds']} s "
          f"({size / 1e6:.1f} MB); discarded {sum(discarded.values())} failed attempts"
          + (f"; short of {args.episodes}: {short}" if short else ""))
    return 0


def import_lerobot(args: argparse.Namespace) -> int:
    from pipelines.data.lerobot.importer import import_lerobot as do_import

    name = args.name or args.lerobot.resolve().name
    summary = do_import(args.lerobot, args.out / name, embodiment=args.embodiment)
    print(f"imported {summary['imported']} episodes into {args.out / name}; quarantined {summary['quarantined']}"
          + (f" (report: {summary['report_path']})" if summary["report_path"] else ""))
    return 0


def _text_encoder(path: Path | None, preset: str):
    from model import get_preset
    from model.encoders import TextEncoder

    width = get_preset(preset).text_dim
    if path is None:
        return TextEncoder.small(width=width, heads=4, seed=0)
    encoder = TextEncoder.from_pretrained(path)
    if encoder.width != width:  # found now rather than by the training run, after the whole encode step
        raise ValueError(f"--text-encoder {path} embeds at width {encoder.width}, preset {preset!r} reads width "
                         f"{width}: prepare for the preset of the model these embeddings feed")
    return encoder


def prepare(args: argparse.Namespace) -> int:
    from pipelines.data.features import FeatureRepo
    from pipelines.data.prepare import prepare as do_prepare

    summary = do_prepare(args.episodes_dir, args.out, text_encoder=_text_encoder(args.text_encoder, args.preset),
                         feature_repo=FeatureRepo(data_dir=args.feast_dir), val_fraction=args.val_fraction,
                         seed=args.seed, min_latent_frames=args.min_latent_frames)
    counts = summary["datasets"].values()
    print(f"prepared {len(summary['datasets'])} datasets: {sum(c['train'] for c in counts)} train / "
          f"{sum(c['val'] for c in counts)} val episodes, {summary['quarantined']} quarantined; "
          f"features published for {summary['embodiments']} and {summary['tasks']} tasks")
    return 0


def train_vae(args: argparse.Namespace) -> int:
    from model import get_preset
    from pipelines.data.autoencoder import AutoencoderConfig, train_autoencoder

    dims = tuple(int(x) for x in str(args.dims).split(",") if x)
    cfg = AutoencoderConfig(latent_channels=get_preset(args.preset).latent_channels, dims=dims, steps=args.steps,
                            batch=args.batch, lr=args.lr, seed=args.seed)
    summary = train_autoencoder(args.episodes_dir, args.prepared_dir, args.out, cfg, data_dir=args.data_dir,
                                max_episodes=args.max_episodes)
    print(f"trained the VAE in {summary['wall_seconds']} s: validation PSNR {summary['val_psnr_db']:.2f} dB -> {args.out}")
    return 0


def encode(args: argparse.Namespace) -> int:
    from model import get_preset
    from model.encoders import VideoVAE
    from pipelines.data.encode import dist_info
    from pipelines.data.encode import encode as do_encode
    from pipelines.data.features import FeatureRepo

    channels = get_preset(args.preset).latent_channels
    vae = VideoVAE.from_pretrained(args.vae) if args.vae else VideoVAE.small(latent_channels=channels, seed=0)
    if vae.latent_channels != channels:  # found now rather than by the training run, after the whole encode step
        raise ValueError(f"--vae {args.vae} makes {vae.latent_channels} latent channels, preset {args.preset!r} "
                         f"reads {channels}: encode for the preset of the model these latents feed")
    summary = do_encode(args.episodes_dir, args.prepared_dir, args.out, vae=vae,
                        feature_repo=FeatureRepo(data_dir=args.feast_dir), shard_episodes=args.shard_episodes,
                        vae_spec={"path": str(args.vae) if args.vae else None, "seed": 0})
    if dist_info()[0] == 0:
        print(f"encoded {summary['episodes']} episodes of {summary['tasks']} tasks -> {summary['index']}")
    return 0
