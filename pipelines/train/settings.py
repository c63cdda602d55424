"""Training settings (pydantic-settings: ``LINGBOT_TRAIN_...`` env vars, then the root's ``LINGBOT_DATA_DIR`` /
``LINGBOT_TRACKING_URI``, and ``.env``; CLI flags override).

Stage defaults follow the paper, scaled to a CPU-sized preset: pretraining AdamW lr 1e-4 with cosine decay after a
linear warmup; post-training on one task's demos with L_fdm added and a constant lr after warmup (paper: 1e-5 for 3K
steps at 5.3B; the small preset trains for fewer steps at 1e-4, the paper's "1e-4 for 1K steps" variant).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pipelines.settings import PlatformSettings, settings_config

STAGES = ("pretrain", "posttrain")
STAGE_DEFAULTS = {
    "pretrain": {"lr": 1e-4, "steps": 1000, "warmup_steps": 50, "schedule": "cosine", "fdm_loss_weight": 0.0},
    "posttrain": {"lr": 1e-4, "steps": 300, "warmup_steps": 20, "schedule": "constant", "fdm_loss_weight": 1.0},
}


class TrainSettings(PlatformSettings):
    """Everything a training run needs besides the model preset's shape."""

    model_config = settings_config("LINGBOT_TRAIN_")

    stage: Literal["pretrain", "posttrain"] = Field("pretrain", description="lifecycle stage")
    preset: str = Field("small", description="model preset (model.config.PRESETS)")
    task: str | None = Field(None, description="post-training task (its demos only); None for pretraining")
    init_from: str | None = Field(None, description="model to start from (required for post-training): a model "
                                                   "directory or a registry URI, models:/<name>@<alias> or "
                                                   "models:/<name>/<version>")
    latents_dir: Path | None = Field(None, description="encoded latents (default: <data_dir>/latents)")
    feast_dir: Path | None = Field(None, description="feature store data (default: <data_dir>/feast)")
    run_dir: Path | None = Field(None, description="checkpoints + final model (default: <data_dir>/runs/<run name>)")
    steps: int | None = Field(None, ge=1, description="optimizer steps (stage default if unset)")
    lr: float | None = Field(None, description="peak learning rate (stage default if unset)")
    warmup_steps: int | None = Field(None, ge=0, description="linear warmup steps (stage default if unset)")
    schedule: Literal["cosine", "constant"] | None = Field(None, description="after warmup (stage default)")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor as a fraction of the peak lr")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    beta1: float = Field(0.9, gt=0.0, lt=1.0, description="AdamW beta1")
    beta2: float = Field(0.999, gt=0.0, lt=1.0, description="AdamW beta2")
    grad_clip: float = Field(2.0, gt=0.0, description="global gradient-norm clip")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    token_budget: int = Field(4096, ge=64, description="tokens per packed sequence (one micro-batch row)")
    rows: int = Field(1, ge=1, description="packed sequences per micro-batch")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPUs that support it")
    activation_checkpointing: bool = Field(False, description="recompute each MoT layer in backward")
    fdm_loss_weight: float | None = Field(None, ge=0.0, description="L_fdm weight (stage default: 0 / 1)")
    demos: int | None = Field(None, ge=1, description="train on the first N demos of each task (low-data runs)")
    exclude_tasks: list[str] = Field(
        [], description="pretraining: leave these tasks' episodes out, so a low-data post-training of one of them "
                        "starts from a model that never saw it (held-out-task runs)")
    objective: Literal["world_model", "reactive"] = Field(
        "world_model", description="world_model (the paper) or reactive (the baseline: actions from observations only)")
    episode_start_prob: float = Field(
        0.5, ge=0.0, le=1.0, description="probability that a training window starts at its episode's first frame "
                                         "(where every rollout starts)")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="exponential moving average of the weights, saved "
                                                           "as the model (decay warmed up as (1+t)/(10+t)); 0: off")
    save_raw: bool = Field(False, description="with an EMA, also write the last trained weights to <run>/snapshots/raw")
    checkpoint_every: int = Field(100, ge=1, description="DeepSpeed checkpoint interval (steps)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept on disk")
    val_every: int = Field(100, ge=1, description="validation interval (steps)")
    snapshot_every: int | None = Field(
        None, ge=1, description="also write a model directory every N steps (<run>/snapshots/stepNNNNNNN), "
                                "for learning curves (bench/learning_curve.py)")
    val_batches: int = Field(4, ge=1, description="validation micro-batches (fixed, so losses are comparable)")
    log_every: int = Field(1, ge=1, description="metrics interval (steps)")
    seed: int = Field(0, description="model init, data sampling and noise")
    register_model: bool = Field(True, description="register the final model in MLflow with alias 'challenger'")
    max_steps_this_run: int | None = Field(None, ge=1, description="stop after this many steps (for preemption tests)")

    @model_validator(mode="after")
    def _fill_and_check(self) -> TrainSettings:
        defaults = STAGE_DEFAULTS[self.stage]
        warmup_given = self.warmup_steps is not None
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if not warmup_given:  # the default warmup never exceeds a fifth of a short run
            object.__setattr__(self, "warmup_steps", min(self.warmup_steps, self.steps // 5))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.exclude_tasks and self.stage != "pretrain":
            raise ValueError("exclude_tasks is for pretraining (post-training trains on its one --task)")
        if self.stage == "posttrain":
            if not self.task:
                raise ValueError("posttrain needs --task (the task whose demos it trains on)")
            if self.init_from is None:
                raise ValueError("posttrain needs --init-from (a pretrained model directory)")
        if self.warmup_steps >= self.steps and self.steps > 1:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        return self

    def trains_on(self, task: str) -> bool:
        """Whether this run's data holds ``task``'s episodes."""
        return self.task in (None, task) and task not in self.exclude_tasks

    @property
    def run_name(self) -> str:
        name = "pretrain" if self.stage == "pretrain" else f"posttrain-{self.task}"
        name = name if self.objective == "world_model" else f"{name}-reactive"
        return name if self.demos is None else f"{name}-demos{self.demos}"

    @property
    def latents(self) -> Path:
        return self.latents_dir or self.data_dir / "latents"

    @property
    def feast(self) -> Path:
        return self.feast_dir or self.data_dir / "feast"

    @property
    def output(self) -> Path:
        return self.run_dir or self.data_dir / "runs" / self.run_name
