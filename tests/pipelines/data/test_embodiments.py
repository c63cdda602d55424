"""Embodiment adapters: native <-> unified 30-dim action mapping, masks, registry and input validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.data.embodiments import (
    METAWORLD_ACTION_SCALE,
    METAWORLD_EEF_QUAT_WXYZ,
    UNIFIED_DIM,
    Embodiment,
    EmbodimentAdapter,
    MetaWorldAdapter,
    available_embodiments,
    get_adapter,
    register_adapter,
)


def _metaworld_batch(T: int = 200, seed: int = 0, low: float = -0.999, high: float = 0.999):
    """Random actions and realistic Sawyer states (hand inside Meta-World's workspace, gripper opening 0..1)."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(low, high, size=(T, 4)).astype(np.float32)
    hand = rng.uniform([-0.5, 0.35, 0.0], [0.5, 1.0, 0.7], size=(T, 3))
    grip = rng.uniform(0.0, 1.0, size=(T, 1))
    state = np.concatenate([hand, grip], axis=1).astype(np.float32)
    return actions, state


def test_metaworld_round_trip_within_1e5():
    adapter = get_adapter("metaworld-sawyer")
    actions, state = _metaworld_batch()
    unified = adapter.to_unified(actions, state)
    assert unified.shape == (200, UNIFIED_DIM) and unified.dtype == np.float32
    back = adapter.to_native(unified, state)
    assert back.shape == actions.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, actions, atol=1e-5, rtol=0)


def test_metaworld_unified_layout():
    adapter = MetaWorldAdapter()
    actions, state = _metaworld_batch(T=16, seed=1)
    unified = adapter.to_unified(actions, state)
    expected_xyz = state[:, :3].astype(np.float64) + actions[:, :3].astype(np.float64) * METAWORLD_ACTION_SCALE
    np.testing.assert_allclose(unified[:, 0:3], expected_xyz, atol=1e-6)
    np.testing.assert_allclose(unified[:, 3:7], np.tile(METAWORLD_EEF_QUAT_WXYZ, (16, 1)), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(unified[:, 3:7], axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(unified[:, 28], actions[:, 3])
    assert not unified[:, ~adapter.mask].any()


def test_metaworld_clipped_entries_come_back_clipped():
    adapter = get_adapter("metaworld-sawyer")
    actions, state = _metaworld_batch(T=300, seed=2, low=-3.0, high=3.0)
    clipped = np.abs(actions) > 1
    assert clipped.any() and (~clipped).any()
    back = adapter.to_native(adapter.to_unified(actions, state), state)
    np.testing.assert_allclose(back[clipped], np.sign(actions[clipped]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(back[~clipped], actions[~clipped], atol=1e-5, rtol=0)


def test_to_native_clips_out_of_range_predictions():
    adapter = get_adapter("metaworld-sawyer")
    _, state = _metaworld_batch(T=4)
    unified = adapter.to_unified(np.zeros((4, 4), np.float32), state)
    unified[:, 0] += 1.0  # a 1 m jump: far beyond one step of 1 cm
    unified[:, 28] = -7.0
    native = adapter.to_native(unified, state)
    np.testing.assert_array_equal(native[:, 0], 1.0)
    np.testing.assert_array_equal(native[:, 3], -1.0)


def test_metaworld_mask_and_spec():
    adapter = get_adapter("metaworld-sawyer")
    mask = adapter.mask
    assert mask.shape == (30,) and mask.dtype == bool
    assert np.flatnonzero(mask).tolist() == [0, 1, 2, 3, 4, 5, 6, 28]
    spec = adapter.spec
    assert (spec.native_action_dim, spec.state_dim, spec.control_rate_hz) == (4, 4, 80.0)
    d = spec.to_dict()
    json.dumps(d)  # JSON-friendly
    assert d["name"] == "metaworld-sawyer" and len(d["channel_mask"]) == 30 and d["action_low"] == [-1.0] * 4


def test_unknown_embodiment_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown embodiment 'aloha-nope'.*metaworld-sawyer"):
        get_adapter("aloha-nope")
    assert "metaworld-sawyer" in available_embodiments()


@pytest.mark.parametrize(
    ("actions_shape", "state_shape", "match"),
    [
        ((10, 3), (10, 4), r"actions must have shape \(T, 4\)"),
        ((10,), (10, 4), r"actions must have shape \(T, 4\)"),
        ((10, 4), (10, 7), r"state must have shape \(T, 4\)"),
        ((10, 4), (9, 4), "lengths differ"),
    ],
)
def test_bad_shapes_raise(actions_shape, state_shape, match):
    adapter = get_adapter("metaworld-sawyer")
    with pytest.raises(ValueError, match=match):
        adapter.to_unified(np.zeros(actions_shape, np.float32), np.zeros(state_shape, np.float32))


def test_bad_unified_shape_dtype_and_nan_raise():
    adapter = get_adapter("metaworld-sawyer")
    state = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match=r"unified must have shape \(T, 30\)"):
        adapter.to_native(np.zeros((5, 29), np.float32), state)
    with pytest.raises(ValueError, match="numeric"):
        adapter.to_unified(np.zeros((5, 4), bool), state)
    bad = np.zeros((5, 4), np.float32)
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf \(first at row 3, column 2\)"):
        adapter.to_unified(bad, state)


def test_registry_rejects_duplicates_and_validates_specs():
    class Other(EmbodimentAdapter):
        spec = MetaWorldAdapter().spec  # same name as the registered one

    with pytest.raises(ValueError, match="already registered"):
        register_adapter(Other())
    with pytest.raises(ValueError, match="channel_mask must have 30"):
        Embodiment("x", 2, 2, (True,) * 29, (-1.0, -1.0), (1.0, 1.0), 10.0)
    with pytest.raises(ValueError, match="action_low/action_high"):
        Embodiment("x", 2, 2, (True,) * 30, (-1.0,), (1.0, 1.0), 10.0)
