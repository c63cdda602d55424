"""`lingbot data ...` entry points: parse -> build -> run -> report. Each step is a small module beside this one."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipelines.settings import DataSettings, add_settings_flags, settings_from_flags

# the DataSettings each step takes from its flags (the rest of its flags are paths, by default under the data dir)
COLLECT = ("data_dir", "suite", "tasks", "episodes", "image_size", "cameras", "seed", "workers")
IMPORT = ("data_dir",)
PREPARE = ("data_dir", "val_fraction", "seed", "min_latent_frames", "preset", "text_encoder_path")
TRAIN_VAE = ("data_dir", "tracking_uri", "preset")
ENCODE = ("data_dir", "preset", "vae_path", "shard_episodes")
FLAGS = {"text_encoder_path": ["--text-encoder"], "vae_path": ["--vae"]}


def _folders(parser: argparse.ArgumentParser, **folders: tuple[str, str]) -> None:
    """Path flags whose value, when left out, is a folder under the data dir: ``out=("splits", "prepared")`` adds
    ``--out`` for ``<data_dir>/prepared`` (the command reads ``args.out or settings.prepared_dir``)."""
    for name, (text, folder) in folders.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, default=None,
                            help=f"{text} (default <data_dir>/{folder})")


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="collect, import, prepare and encode robot data").add_subparsers(
        dest="data_command", required=True)

    p = data.add_parser("collect", help="scripted-expert demonstrations from a simulator suite")
    add_settings_flags(p, DataSettings, fields=COLLECT)
    _folders(p, out=("episodes dir: one LeRobot v3.0 dataset per task (metaworld-<task>)", "episodes"),
             summary=("where the run summary (counts, wall time, size) is written; kept out of --out so the dataset "
                      "bytes depend only on the seed", "metrics/collect.json"))
    p.set_defaults(func=collect)

    p = data.add_parser("import", help="import a LeRobot-format dataset from a local path")
    p.add_argument("--lerobot", type=Path, required=True, help="path of the LeRobot dataset")
    p.add_argument("--embodiment", required=True, help="embodiment adapter of its actions (e.g. metaworld-sawyer)")
    p.add_argument("--name", default=None, help="dataset name under the episodes dir (default: source folder name)")
    add_settings_flags(p, DataSettings, fields=IMPORT)
    _folders(p, out=("episodes dir the dataset is written into", "episodes"))
    p.set_defaults(func=import_lerobot)

    p = data.add_parser("prepare", help="validate, split, fit normalisation, publish features")
    add_settings_flags(p, DataSettings, fields=PREPARE, flags=FLAGS)
    _folders(p, episodes_dir=("LeRobot datasets to prepare", "episodes"),
             out=("splits, stats, quarantine report", "prepared"),
             feast_dir=("feature store data (published features)", "feast"))
    p.set_defaults(func=prepare)

    from pipelines.data.autoencoder import AutoencoderConfig

    a = AutoencoderConfig()
    p = data.add_parser("train-vae", help="train the embedded default's video VAE on the collected training frames")
    add_settings_flags(p, DataSettings, fields=TRAIN_VAE)
    _folders(p, episodes_dir=("collected LeRobot datasets", "episodes"),
             prepared_dir=("the prepare step's splits", "prepared"), out=("where the trained VAE is saved", "vae"))
    p.add_argument("--dims", default=",".join(map(str, a.dims)),
                   help=f"widths of the 3 encoder stages (default {','.join(map(str, a.dims))})")
    p.add_argument("--steps", type=int, default=a.steps, help=f"optimizer steps (default {a.steps})")
    p.add_argument("--batch", type=int, default=a.batch, help=f"clips per step (default {a.batch})")
    p.add_argument("--lr", type=float, default=a.lr, help=f"learning rate (default {a.lr})")
    p.add_argument("--max-episodes", type=int, default=None, help="train on at most this many episodes (spread)")
    p.add_argument("--seed", type=int, default=a.seed, help=f"init and sampling seed (default {a.seed})")
    p.set_defaults(func=train_vae)

    p = data.add_parser("encode", help="VAE latent shards + text embeddings (run under torchrun for N ranks)")
    add_settings_flags(p, DataSettings, fields=ENCODE, flags=FLAGS)
    _folders(p, episodes_dir=("collected LeRobot datasets", "episodes"),
             prepared_dir=("the prepare step's splits and stats", "prepared"),
             feast_dir=("feature store data", "feast"), out=("latent shards + index.json", "latents"))
    p.set_defaults(func=encode)


def collect(args: argparse.Namespace) -> int:
    from pipelines.data.metaworld_collect import collect as collect_metaworld
    from pipelines.data.metaworld_collect import resolve_tasks

    s = settings_from_flags(DataSettings, args, fields=COLLECT)
    out, summary_path = args.out or s.episodes_dir, args.summary or s.data_dir / "metrics" / "collect.json"
    tasks = resolve_tasks(s.tasks)
    start = time.time()
    cameras = tuple(c.strip() for c in s.cameras.split(",") if c.strip())
    results = collect_metaworld(tasks, s.episodes, seed=s.seed, image_size=s.image_size, workers=s.workers,
                                cameras=cameras, out_dir=out)
    kept = {t: r[0] for t, r in results.items()}
    discarded = {t: r[1] for t, r in results.items()}
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    summary = {"tasks": tasks, "cameras": list(cameras), "kept": kept, "discarded": discarded,
               "wall_seconds": round(time.time() - start, 1), "bytes_on_disk": size}
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1))
    short = [t for t, n in kept.items() if n < s.episodes]
    print(f"collected {sum(kept.values())} episodes of {len(tasks)} tasks in {summary['wall_seconds']} s "
          f"({size / 1e6:.1f} MB); discarded {sum(discarded.values())} failed attempts"
          + (f"; short of {s.episodes}: {short}" if short else ""))
    return 0


def import_lerobot(args: argparse.Namespace) -> int:
    from pipelines.data.lerobot.importer import import_lerobot as do_import

    out = args.out or settings_from_flags(DataSettings, args, fields=IMPORT).episodes_dir
    name = args.name or args.lerobot.resolve().name
    summary = do_import(args.lerobot, out / name, embodiment=args.embodiment)
    print(f"imported {summary['imported']} episodes into {out / name}; quarantined {summary['quarantined']}"
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

    s = settings_from_flags(DataSettings, args, fields=PREPARE)
    summary = do_prepare(args.episodes_dir or s.episodes_dir, args.out or s.prepared_dir,
                         text_encoder=_text_encoder(s.text_encoder_path, s.preset),
                         feature_repo=FeatureRepo(data_dir=args.feast_dir or s.feast_dir),
                         val_fraction=s.val_fraction, seed=s.seed, min_latent_frames=s.min_latent_frames)
    counts = summary["datasets"].values()
    print(f"prepared {len(summary['datasets'])} datasets: {sum(c['train'] for c in counts)} train / "
          f"{sum(c['val'] for c in counts)} val episodes, {summary['quarantined']} quarantined; "
          f"features published for {summary['embodiments']} and {summary['tasks']} tasks")
    return 0


def train_vae(args: argparse.Namespace) -> int:
    from model import get_preset
    from pipelines.data.autoencoder import AutoencoderConfig, train_autoencoder

    s = settings_from_flags(DataSettings, args, fields=TRAIN_VAE)
    out = args.out or s.data_dir / "vae"
    dims = tuple(int(x) for x in str(args.dims).split(",") if x)
    cfg = AutoencoderConfig(latent_channels=get_preset(s.preset).latent_channels, dims=dims, steps=args.steps,
                            batch=args.batch, lr=args.lr, seed=args.seed)
    summary = train_autoencoder(args.episodes_dir or s.episodes_dir, args.prepared_dir or s.prepared_dir, out, cfg,
                                tracking_uri=s.tracking_uri, data_dir=s.data_dir, max_episodes=args.max_episodes)
    print(f"trained the VAE in {summary['wall_seconds']} s: validation PSNR {summary['val_psnr_db']:.2f} dB -> {out}")
    return 0


def encode(args: argparse.Namespace) -> int:
    from model import get_preset
    from model.encoders import VideoVAE
    from pipelines.data.encode import dist_info
    from pipelines.data.encode import encode as do_encode
    from pipelines.data.features import FeatureRepo

    s = settings_from_flags(DataSettings, args, fields=ENCODE)
    channels = get_preset(s.preset).latent_channels
    vae = VideoVAE.from_pretrained(s.vae_path) if s.vae_path else VideoVAE.small(latent_channels=channels, seed=0)
    if vae.latent_channels != channels:  # found now rather than by the training run, after the whole encode step
        raise ValueError(f"--vae {s.vae_path} makes {vae.latent_channels} latent channels, preset {s.preset!r} "
                         f"reads {channels}: encode for the preset of the model these latents feed")
    summary = do_encode(args.episodes_dir or s.episodes_dir, args.prepared_dir or s.prepared_dir,
                        args.out or s.latents_dir, vae=vae, feature_repo=FeatureRepo(data_dir=args.feast_dir or s.feast_dir),
                        shard_episodes=s.shard_episodes,
                        vae_spec={"path": str(s.vae_path) if s.vae_path else None, "seed": 0})
    if dist_info()[0] == 0:
        print(f"encoded {summary['episodes']} episodes of {summary['tasks']} tasks -> {summary['index']}")
    return 0
