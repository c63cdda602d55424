"""MLflow tracking of a training run (rank 0 only): params, per-step metrics, system metrics, artifacts, model.

One experiment per stage (``lingbot-pretrain``, ``lingbot-posttrain``). Params hold the preset, every setting, the
resolved model and DeepSpeed configs and the data version; the run's dataset inputs are the DVC-hashed folders it
read (``pipelines.lineage``: episodes, prepared, latents), its tags the same hashes, the git commit and the pipeline's
parent run; the final model is logged as a pyfunc over its model directory (signature, a recorded observation as the
input example, the data hashes as metadata) and registered (``lingbot-va-base`` / ``lingbot-va-<task>``) with alias
``challenger``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from model import LingBotVA
from model.bundle import TEXT_FILE, ActionSpace, PolicyBundle
from model.normalization import ActionNormalizer, EmbodimentNorm
from pipelines.data.embodiments import get_adapter
from pipelines.train.settings import TrainSettings


def data_version_of(versions: dict, index: dict) -> str:
    """The run's data version: the DVC hash of its latents folder (what it trains on), else ``data_version``."""
    latents = versions.get("latents")
    return latents.md5 if latents is not None else data_version(index)


def data_version(index: dict) -> str:
    """Hash of the encoded index: the prepared datasets' content hashes + the encoded episode list (the data version
    of latents that no DVC hash covers)."""
    versions = sorted({s.get("dataset_version", "") for s in index.get("normalization", {}).values()})
    episodes = [(e["dataset"], e["episode_index"], e["split"], e["num_frames"]) for e in index["episodes"]]
    return hashlib.md5(json.dumps([versions, episodes]).encode()).hexdigest()


def model_metadata(settings: TrainSettings, index: dict) -> tuple[dict[str, EmbodimentNorm], ActionSpace, dict]:
    """(normalisation per embodiment, action space, extra) of the model directory, so serving needs nothing else."""
    from pipelines.data.features import FeatureRepo, read_features, snapshot

    tasks = sorted({e["task"] for e in index["episodes"] if settings.trains_on(e["task"])})
    embodiments = sorted({e["embodiment"] for e in index["episodes"] if e["task"] in tasks})
    try:
        repo = FeatureRepo(data_dir=settings.feast)
        features = {emb: snapshot(read_features(emb, settings.task, repo=repo)) for emb in embodiments}
    except ValueError:  # no feature store next to these latents (e.g. hand-made shards): use the encoded stats
        features = None
    if features is not None:
        normalization = {emb: EmbodimentNorm.from_snapshot(snap) for emb, snap in features.items()}
    else:
        encoded = index.get("normalization", {})
        normalization = {emb: EmbodimentNorm.from_normalizer(emb, ActionNormalizer.from_dict(encoded[emb]["action"]),
                                                             get_adapter(emb).mask)
                         for emb in embodiments if emb in encoded}
    entries = [e for e in index["episodes"] if e["task"] in tasks]
    action_space = ActionSpace(embodiments=tuple(embodiments), tasks=tuple(tasks), tau=index["tau"],
                               instructions={t: index["instructions"].get(t) for t in tasks},
                               cameras=tuple(entries[0].get("cameras") or ()) if entries else (),
                               latent_hw=tuple(entries[0].get("latent_hw") or ()) if entries else ())
    extra = {"stage": settings.stage, "settings": json.loads(settings.model_dump_json()), "data_version": data_version(index),
             "encoders": {"vae": index.get("vae"), "text": {"file": TEXT_FILE, "text_len": index.get("text_len")}}}
    return normalization, action_space, extra


LOSS_FILE = "loss.csv"
"""Per-step losses in the run dir (``dvc plots``)."""
LOSS_COLUMNS = ("loss", "L_dyn", "L_inv", "L_fdm", "val_loss", "val_dyn", "val_inv", "val_fdm")
REGISTERED_FILE = "registered.json"
"""The version this run registered (name, version, run, data hashes), in the run dir: the evaluate stage's input."""


def policy_bundle(model: LingBotVA, settings: TrainSettings, index: dict) -> PolicyBundle:
    """The model directory of a run: ``model`` with the features it trained with, the VAE the latents came from and
    the tasks' instruction embeddings.

    With them the model directory is all a rollout or a server needs: camera frames -> the same latents as in
    training, and a task name -> its instruction embedding (no text encoder at serving time).
    """
    from safetensors.torch import load_file

    from pipelines.data.encode import load_vae

    normalization, action_space, extra = model_metadata(settings, index)
    text = load_file(str(settings.latents / "text.safetensors"))
    return PolicyBundle(model=model, vae=load_vae(settings.latents, index),
                        text={t: text[t] for t in action_space.tasks if t in text}, normalization=normalization,
                        action_space=action_space, extra=extra)


def example_observation(settings: TrainSettings, index: dict) -> dict[str, np.ndarray] | None:
    """A recorded robot observation as a pyfunc request (the model's input example): the first frame of every
    camera, the state and the task of the first episode this run trained on; None when its episode files are not
    under ``<data_dir>/episodes`` (e.g. a pod that only has the latents)."""
    from pipelines.data.lerobot.reader import LeRobotDataset

    entries = [e for e in index["episodes"] if settings.trains_on(e["task"]) and e.get("split") == "train"]
    if not entries:
        return None
    entry = entries[0]
    try:
        ep = LeRobotDataset(Path(settings.data_dir) / "episodes" / entry["dataset"]).episode(entry["episode_index"])
    except (ValueError, IndexError, OSError):
        return None
    cameras = entry.get("cameras") or sorted(ep.frames)
    if any(c not in ep.frames for c in cameras):
        return None
    return {"images": np.stack([ep.frames[c][0] for c in cameras])[None], "state": ep.state[:1].astype(np.float32),
            "instruction": np.array([ep.task])}


class Tracker:
    """The MLflow side of a run; created on rank 0 only."""

    def __init__(self, settings: TrainSettings, index: dict, ds_config: dict, run_id: str | None = None):
        import mlflow

        from pipelines.lineage import data_version as dvc_version
        from pipelines.lineage import log_data_inputs, run_tags
        from pipelines.tracking_store import ensure_experiment
        from pipelines.train.registry import flatten_params

        self.mlflow, self.settings = mlflow, settings
        mlflow.set_tracking_uri(settings.mlflow_uri)
        experiment = ensure_experiment(f"lingbot-{settings.stage}", settings.data_dir)
        # the DVC hashes of what this run reads: the collected episodes and the prepared splits behind its latents
        folders = {"episodes": settings.data_dir / "episodes", "prepared": settings.data_dir / "prepared",
                   "latents": settings.latents}
        versions = {name: dvc_version(path, name) for name, path in folders.items() if Path(path).is_dir()}
        self.data_versions = {name: v.md5 for name, v in versions.items()}
        tags = None if run_id else {**run_tags(versions, settings.data_dir), "stage": settings.stage,
                                    "task": settings.task or "all", "data_version": data_version_of(versions, index)}
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment,
                               run_name=None if run_id else settings.run_name, log_system_metrics=True, tags=tags)
        self.run_id = run.info.run_id
        if run_id is None:
            from model import get_preset

            params = {"preset": settings.preset, "stage": settings.stage, "data_version": tags["data_version"],
                      "world_size": ds_config["train_batch_size"] // settings.grad_accum}
            params.update({f"data.{name}": md5 for name, md5 in self.data_versions.items()})
            params.update(flatten_params(json.loads(settings.model_dump_json()), "settings."))
            params.update(flatten_params(get_preset(settings.preset).to_dict(), "model."))
            params.update(flatten_params(ds_config, "deepspeed."))
            mlflow.log_params(params)
            log_data_inputs(versions, context="training")
            mlflow.log_dict({"settings": json.loads(settings.model_dump_json()), "deepspeed": ds_config,
                             "model": get_preset(settings.preset).to_dict()}, "config/resolved.json")
        self._vae = None
        self._index = index

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)}, step=step)

    def _decoder(self):
        if self._vae is None:
            from pipelines.data.encode import load_vae

            self._vae = load_vae(self.settings.latents, self._index)
        return self._vae

    @torch.no_grad()
    def log_prediction_strip(self, real_latents: torch.Tensor, predicted: torch.Tensor, views: int, step: int) -> None:
        """Real vs predicted frames of one validation chunk, decoded from latents, as an image artifact."""
        vae = self._decoder()
        real = vae.decode(real_latents[None], num_views=views)[0]  # (T, V, H, W, 3)
        pred = vae.decode(torch.cat([real_latents[:1], predicted])[None], num_views=views)[0]
        pick = list(range(0, real.shape[0], 4))
        rows = [np.concatenate([np.concatenate(list(x[i]), axis=1) for i in pick], axis=1) for x in (real, pred)]
        self.mlflow.log_image(np.concatenate(rows, axis=0), artifact_file=f"validation/real_vs_predicted_{step:07d}.png")

    def log_model(self, model_dir: Path) -> None:
        from pipelines.train.registry import log_and_register, registered_name_for

        self.mlflow.log_artifact(str(model_dir / "config.json"), "model_dir")
        if self.settings.register_model:
            name = registered_name_for(self.settings.stage, self.settings.task, self.settings.objective,
                                       self.settings.demos)
            version = log_and_register(model_dir, registered_name=name, alias="challenger",
                                       input_example=example_observation(self.settings, self._index),
                                       metadata={"data": self.data_versions})
            self.mlflow.set_tag("registered_model", f"{name}/{version}")
            # what the challenger alias pointed to when this run registered it: the evaluate stage's declared input
            reference = {"registered_name": name, "version": str(version), "alias": "challenger",
                         "model_uri": f"models:/{name}/{version}", "run_id": self.run_id, "data": self.data_versions}
            out = Path(self.settings.output)
            out.mkdir(parents=True, exist_ok=True)
            (out / REGISTERED_FILE).write_text(json.dumps(reference, indent=1) + "\n")

    def write_loss_curves(self) -> Path:
        """``<run dir>/loss.csv``: step and every loss logged so far (resumed runs included: read back from MLflow),
        the DVC stages' loss plot."""
        client = self.mlflow.MlflowClient()
        keys = [k for k in LOSS_COLUMNS if k in client.get_run(self.run_id).data.metrics]
        rows: dict[int, dict[str, float]] = {}
        for key in keys:
            for m in client.get_metric_history(self.run_id, key):
                rows.setdefault(int(m.step), {})[key] = m.value
        out = Path(self.settings.output)
        out.mkdir(parents=True, exist_ok=True)
        lines = [",".join(["step", *LOSS_COLUMNS])]
        for step in sorted(rows):
            lines.append(",".join([str(step), *(repr(rows[step][k]) if k in rows[step] else "" for k in LOSS_COLUMNS)]))
        (out / LOSS_FILE).write_text("\n".join(lines) + "\n")
        return out / LOSS_FILE

    def finish(self, summary: dict) -> None:
        self.mlflow.log_dict({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}, "summary.json")
        self.write_loss_curves()
        self.mlflow.end_run()
