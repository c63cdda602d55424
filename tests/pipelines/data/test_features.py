"""Feature store round trip: apply + publish + read_features, unknown entities, newer rows win, snapshots."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from model.normalization import ActionNormalizer
from pipelines.data.features import FeatureRepo, load_snapshot, publish, read_features, snapshot

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def _stats(seed: int) -> dict:
    g = np.random.default_rng(seed)
    q01 = g.normal(size=30).astype(np.float32) - 2  # values that are not round in float32
    return {
        "action_q01": q01,
        "action_q99": q01 + g.uniform(0.1, 3, 30).astype(np.float32),
        "action_mean": g.normal(size=30).astype(np.float32),
        "action_std": g.uniform(0.1, 2, 30).astype(np.float32),
        "state_mean": g.normal(size=7).astype(np.float32),
        "state_std": g.uniform(0.1, 2, 7).astype(np.float32),
        "dataset_version": f"v{seed}",
    }


def _meta() -> dict:
    mask = np.zeros(30, bool)
    mask[[0, 1, 2, 28]] = True
    return {"action_mask": mask, "action_low": [-1.0, -1.0, -1.0, -1.0], "action_high": [1.0, 1.0, 1.0, 0.5],
            "control_rate_hz": 12.5, "camera_keys": ["corner", "gripper"], "native_action_dim": 4, "name": "ignored"}


EMBEDDING = np.random.default_rng(3).normal(size=(4, 16)).astype(np.float32)
TASKS = {"reach-v3": {"instruction": "reach the red ball", "horizon": 150, "instruction_embedding": EMBEDDING,
                      "embodiment": "sawyer"}}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> FeatureRepo:
    """One store for the module: Feast's import and first apply are the slow part."""
    r = FeatureRepo(data_dir=tmp_path_factory.mktemp("feast"))
    r.apply()
    # aloha's stats arrive in ActionNormalizer.to_dict() form, as the prepare step publishes them
    g = np.random.default_rng(7)
    actions = g.normal(size=(200, 30)).astype(np.float32)
    aloha = {"action": ActionNormalizer.fit(actions).to_dict(), "state_mean": [0.0] * 14, "state_std": [1.0] * 14,
             "dataset_version": "aloha-v1"}
    publish({"sawyer": _stats(0), "aloha": aloha}, {"sawyer": _meta(), "aloha": _meta()}, TASKS, T0, repo=r)
    return r


def test_no_generated_files_outside_data_dir(repo):
    names = {p.name for p in repo.data_dir.iterdir()}
    assert {"registry.db", "online_store.db", "norm_stats.parquet", "embodiment_meta.parquet", "task_meta.parquet"} <= names
    assert sorted(p.name for p in repo.repo_path.iterdir() if p.suffix in (".db", ".parquet")) == []


def test_round_trip_exact(repo):
    f = read_features("sawyer", "reach-v3", repo=repo)
    want = _stats(0)
    for name in ("action_q01", "action_q99", "action_mean", "action_std", "state_mean", "state_std"):
        got = f["norm_stats"][name]
        assert got.dtype == np.float32 and np.array_equal(got, want[name]), name
    assert f["norm_stats"]["dataset_version"] == "v0"

    emb = f["embodiment"]
    assert emb["action_mask"].dtype == np.bool_ and np.array_equal(emb["action_mask"], _meta()["action_mask"])
    assert np.array_equal(emb["action_high"], np.array([1, 1, 1, 0.5], np.float32)) and emb["action_low"].dtype == np.float32
    assert emb["control_rate_hz"] == 12.5 and emb["native_action_dim"] == 4
    assert emb["camera_keys"] == ["corner", "gripper"]
    assert "name" not in emb  # keys a view does not define are not stored

    task = f["task"]
    assert task["instruction"] == "reach the red ball" and task["horizon"] == 150 and task["embodiment"] == "sawyer"
    assert task["instruction_embedding"].shape == (4, 16) and task["instruction_embedding"].dtype == np.float32
    assert np.array_equal(task["instruction_embedding"], EMBEDDING)
    assert task["instruction_embedding_shape"].tolist() == [4, 16]
    assert f["entities"] == {"embodiment": "sawyer", "task": "reach-v3"}


def test_normalizer_dict_accepted_and_task_optional(repo):
    f = read_features("aloha", repo=repo)
    assert f["task"] is None
    norm = ActionNormalizer.from_dict({"q01": f["norm_stats"]["action_q01"], "q99": f["norm_stats"]["action_q99"]})
    assert norm.q01.shape == (30,) and f["norm_stats"]["state_mean"].shape == (14,)


def test_unknown_entities(repo):
    publish({"ur5": _stats(2)}, {}, {}, T0, repo=repo)
    with pytest.raises(ValueError, match="unknown embodiment 'ur5': no embodiment_meta"):  # stats alone are not enough
        read_features("ur5", repo=repo)
    with pytest.raises(ValueError, match="unknown embodiment 'franka'"):
        read_features("franka", repo=repo)
    with pytest.raises(ValueError, match="unknown task 'pick-place-v3'"):
        read_features("sawyer", "pick-place-v3", repo=repo)


def test_unapplied_store_is_unknown(tmp_path):
    with pytest.raises(ValueError, match=r"unknown embodiment 'sawyer'.*has no norm_stats view"):
        read_features("sawyer", repo=FeatureRepo(data_dir=tmp_path))


def test_bad_rows_rejected_before_writing(repo):
    before = repo.offline_table("norm_stats").num_rows
    bad = {**_stats(1), "action_q01": np.zeros(29, np.float32)}
    with pytest.raises(ValueError, match=r"'sawyer'.*action_q01 must be \(30,\)"):
        publish({"sawyer": bad}, {}, {}, repo=repo)
    with pytest.raises(ValueError, match="missing"):
        publish({}, {"sawyer": {"action_mask": [True] * 30}}, {}, repo=repo)
    with pytest.raises(ValueError, match="action_low"):
        publish({}, {"sawyer": {**_meta(), "action_low": [0.0] * 3}}, {}, repo=repo)
    assert repo.offline_table("norm_stats").num_rows == before


def test_newer_timestamp_wins_and_history_is_kept(repo):
    # own entities, so the other tests see the fixture's rows whatever the order
    task = {**TASKS["reach-v3"], "embodiment": "widowx"}
    # widowx's meta in Embodiment.to_dict() form: channel_mask, extra keys, no cameras
    spec = {**_meta(), "name": "widowx", "state_dim": 7, "camera_keys": []}
    spec["channel_mask"] = spec.pop("action_mask").tolist()
    publish({"widowx": _stats(4)}, {"widowx": spec}, {"push-v3": task}, T0, repo=repo)
    publish({"widowx": _stats(5)}, {}, {}, T0 - timedelta(days=1), repo=repo)  # older: must not replace v4
    assert read_features("widowx", repo=repo)["norm_stats"]["dataset_version"] == "v4"

    publish({"widowx": _stats(6)}, {}, {"push-v3": {**task, "horizon": 200}}, T0 + timedelta(days=1), repo=repo)
    f = read_features("widowx", "push-v3", repo=repo)
    assert f["norm_stats"]["dataset_version"] == "v6" and f["task"]["horizon"] == 200
    assert np.array_equal(f["norm_stats"]["action_q01"], _stats(6)["action_q01"])

    publish({"widowx": _stats(7)}, {}, {}, T0 + timedelta(days=1), repo=repo)  # same event time: later publish wins
    assert read_features("widowx", repo=repo)["norm_stats"]["dataset_version"] == "v7"
    assert read_features("sawyer", repo=repo)["norm_stats"]["dataset_version"] == "v0"  # other entities untouched
    versions = repo.offline_table("norm_stats").column("dataset_version").to_pylist()
    assert {"v0", "v4", "v5", "v6", "v7", "aloha-v1"} <= set(versions)  # the offline store keeps every publish
    emb = f["embodiment"]
    assert np.array_equal(emb["action_mask"], _meta()["action_mask"]) and emb["camera_keys"] == []


def test_snapshot_round_trip(repo):
    f = read_features("sawyer", "reach-v3", repo=repo)
    snap = json.loads(json.dumps(snapshot(f)))
    back = load_snapshot(snap)
    assert back["entities"] == f["entities"]
    for section in ("norm_stats", "embodiment", "task"):
        assert back[section].keys() == f[section].keys()
        for k, v in f[section].items():
            if isinstance(v, np.ndarray):
                assert back[section][k].dtype == v.dtype and np.array_equal(back[section][k], v), (section, k)
            else:
                assert back[section][k] == v, (section, k)
    assert back["task"]["instruction_embedding"].shape == (4, 16)

    no_task = load_snapshot(json.loads(json.dumps(snapshot(read_features("aloha", repo=repo)))))
    assert no_task["task"] is None
    with pytest.raises(ValueError, match="not a feature snapshot"):
        load_snapshot({"norm_stats": {}})
