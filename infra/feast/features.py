"""Feast definitions of the LingBot-VA feature repo: what training and serving both read about a robot and a task.

Entities
    embodiment  a robot embodiment / action-adapter key (e.g. "sawyer"), join key ``embodiment``
    task        a task name (e.g. "reach-v3"), join key ``task``

Feature views (one parquet offline source each; ``pipelines.data.features`` writes them and materialises them)
    norm_stats       per embodiment: unified 30-dim action quantiles / mean / std, state mean / std, dataset version
    embodiment_meta  per embodiment: unified-space action mask, native limits and rate, cameras, native action dim
    task_meta        per task: instruction, horizon, flattened instruction embedding + its shape, embodiment

The parquet paths are relative: Feast resolves them against ``RepoConfig.repo_path``, which
``pipelines.data.features.FeatureRepo`` points at the ignored data dir. ``ttl=0`` means the rows never expire:
these are slowly changing reference values, republished with a newer event timestamp when they change.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Bool, Float32, Float64, Int64, String

UNIFIED_ACTION_DIM = 30  # width of the unified action space every embodiment adapter maps into
TIMESTAMP_FIELD = "event_timestamp"
CREATED_FIELD = "created_timestamp"  # breaks ties between rows published with the same event timestamp
NO_TTL = timedelta(0)  # Feast treats a zero TTL as "never expires"

embodiment = Entity(
    name="embodiment",
    join_keys=["embodiment"],
    value_type=ValueType.STRING,
    description="Robot embodiment / action-adapter key.",
)
task = Entity(name="task", join_keys=["task"], value_type=ValueType.STRING, description="Task name.")


def _source(name: str) -> FileSource:
    return FileSource(
        name=f"{name}_source",
        path=f"{name}.parquet",
        timestamp_field=TIMESTAMP_FIELD,
        created_timestamp_column=CREATED_FIELD,
    )


norm_stats = FeatureView(
    name="norm_stats",
    entities=[embodiment],
    ttl=NO_TTL,
    schema=[
        Field(name="embodiment", dtype=String),
        Field(name="action_q01", dtype=Array(Float32), description=f"{UNIFIED_ACTION_DIM} per-dim 1% quantiles"),
        Field(name="action_q99", dtype=Array(Float32), description=f"{UNIFIED_ACTION_DIM} per-dim 99% quantiles"),
        Field(name="action_mean", dtype=Array(Float32), description=f"{UNIFIED_ACTION_DIM} per-dim means"),
        Field(name="action_std", dtype=Array(Float32), description=f"{UNIFIED_ACTION_DIM} per-dim standard deviations"),
        Field(name="state_mean", dtype=Array(Float32), description="proprioceptive state mean (native width)"),
        Field(name="state_std", dtype=Array(Float32), description="proprioceptive state std (native width)"),
        Field(name="dataset_version", dtype=String, description="content hash of the data the stats were fit on"),
    ],
    source=_source("norm_stats"),
    online=True,
    description="Action / state normalisation statistics of the training split, per embodiment.",
)

embodiment_meta = FeatureView(
    name="embodiment_meta",
    entities=[embodiment],
    ttl=NO_TTL,
    schema=[
        Field(name="embodiment", dtype=String),
        Field(name="action_mask", dtype=Array(Bool), description=f"which of the {UNIFIED_ACTION_DIM} unified dims are used"),
        Field(name="action_low", dtype=Array(Float32), description="native action lower limits"),
        Field(name="action_high", dtype=Array(Float32), description="native action upper limits"),
        Field(name="control_rate_hz", dtype=Float64, description="native control rate"),
        Field(name="camera_keys", dtype=Array(String), description="camera names, in model input order"),
        Field(name="native_action_dim", dtype=Int64, description="width of the robot's native action vector"),
    ],
    source=_source("embodiment_meta"),
    online=True,
    description="Static description of an embodiment's action space and sensors.",
)

task_meta = FeatureView(
    name="task_meta",
    entities=[task],
    ttl=NO_TTL,
    schema=[
        Field(name="task", dtype=String),
        Field(name="instruction", dtype=String, description="natural-language instruction"),
        Field(name="horizon", dtype=Int64, description="episode step budget"),
        Field(name="instruction_embedding", dtype=Array(Float32), description="text-encoder output, flattened (C order)"),
        Field(name="instruction_embedding_shape", dtype=Array(Int64), description="shape to reshape the embedding to"),
        Field(name="embodiment", dtype=String, description="embodiment the task's demonstrations were recorded on"),
    ],
    source=_source("task_meta"),
    online=True,
    description="Per-task instruction and its precomputed text embedding.",
)

FEATURE_VIEWS = (norm_stats, embodiment_meta, task_meta)
ENTITIES = (embodiment, task)
