"""MLflow tracking of a training run (rank 0 only): params, per-step metrics, system metrics, artifacts, model.

One experiment per stage (``lingbot-pretrain``, ``lingbot-posttrain``). Params hold the preset, every setting, the
resolved model and DeepSpeed configs and the data version; the final model is logged as a pyfunc over its model
directory and registered (``lingbot-va-base`` / ``lingbot-va-<task>``) with alias ``challenger``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from pipelines.train.settings import TrainSettings


def data_version(index: dict) -> str:
    """Hash naming the exact data a run saw: the prepared datasets' content hashes + the encoded episode list."""
    versions = sorted({s.get("dataset_version", "") for s in index.get("normalization", {}).values()})
    episodes = [(e["dataset"], e["episode_index"], e["split"], e["num_frames"]) for e in index["episodes"]]
    return hashlib.md5(json.dumps([versions, episodes]).encode()).hexdigest()


def model_metadata(settings: TrainSettings, index: dict) -> tuple[dict, dict, dict]:
    """(normalization, action_space, extra) stored in the model directory, so serving needs nothing else."""
    from pipelines.data.features import FeatureRepo, read_features, snapshot

    tasks = sorted({e["task"] for e in index["episodes"] if settings.task in (None, e["task"])})
    embodiments = sorted({e["embodiment"] for e in index["episodes"] if e["task"] in tasks})
    try:
        repo = FeatureRepo(data_dir=settings.feast)
        features = {emb: snapshot(read_features(emb, settings.task, repo=repo)) for emb in embodiments}
    except ValueError:  # no feature store next to these latents (e.g. hand-made shards): use the encoded stats
        features = {emb: {"action": index["normalization"][emb]["action"]} for emb in embodiments
                    if emb in index.get("normalization", {})}
    main = embodiments[0] if len(embodiments) == 1 else None
    normalization = features.get(main, {"embodiments": features})
    action_space = {"embodiments": embodiments, "tasks": tasks, "tau": index["tau"],
                    "instructions": {t: index["instructions"].get(t) for t in tasks}}
    entries = [e for e in index["episodes"] if e["task"] in tasks]
    action_space["observation"] = {"cameras": entries[0].get("cameras") if entries else None,
                                   "latent_hw": entries[0].get("latent_hw") if entries else None}
    extra = {"stage": settings.stage, "settings": json.loads(settings.model_dump_json()), "data_version": data_version(index),
             "encoders": {"vae": index.get("vae"), "text": {"file": TEXT_FILE, "text_len": index.get("text_len")}}}
    return normalization, action_space, extra


TEXT_FILE = "text_embeddings.safetensors"
VAE_DIR = "vae"


def encoder_files(settings: TrainSettings, index: dict):
    """``write_files`` for save_pretrained: the VAE the latents came from and the tasks' instruction embeddings.

    With them the model directory is all a rollout or a server needs: camera frames -> the same latents as in
    training, and a task name -> its instruction embedding (no text encoder at serving time).
    """
    from safetensors.torch import load_file, save_file

    from pipelines.data.encode import load_vae

    def write(directory: Path) -> None:
        text = load_file(str(settings.latents / "text.safetensors"))
        tasks = sorted({e["task"] for e in index["episodes"] if settings.task in (None, e["task"])})
        save_file({t: text[t].contiguous() for t in tasks if t in text}, str(directory / TEXT_FILE))
        load_vae(settings.latents, index).save_pretrained(directory / VAE_DIR)

    return write


class Tracker:
    """The MLflow side of a run; created on rank 0 only."""

    def __init__(self, settings: TrainSettings, index: dict, ds_config: dict, run_id: str | None = None):
        import mlflow

        from pipelines.train.registry import default_tracking_uri, ensure_experiment, flatten_params

        self.mlflow, self.settings = mlflow, settings
        mlflow.set_tracking_uri(settings.tracking_uri or default_tracking_uri(settings.data_dir))
        experiment = ensure_experiment(f"lingbot-{settings.stage}", settings.data_dir)
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment,
                               run_name=None if run_id else settings.run_name, log_system_metrics=True)
        self.run_id = run.info.run_id
        if run_id is None:
            from model import get_preset

            params = {"preset": settings.preset, "stage": settings.stage, "data_version": data_version(index),
                      "world_size": ds_config["train_batch_size"] // settings.grad_accum}
            params.update(flatten_params(json.loads(settings.model_dump_json()), "settings."))
            params.update(flatten_params(get_preset(settings.preset).to_dict(), "model."))
            params.update(flatten_params(ds_config, "deepspeed."))
            mlflow.log_params(params)
            mlflow.set_tags({"stage": settings.stage, "task": settings.task or "all", "data_version": params["data_version"]})
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
            version = log_and_register(model_dir, registered_name=name, alias="challenger")
            self.mlflow.set_tag("registered_model", f"{name}/{version}")

    def finish(self, summary: dict) -> None:
        self.mlflow.log_dict({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}, "summary.json")
        self.mlflow.end_run()
