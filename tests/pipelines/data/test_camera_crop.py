"""Derived camera views: a CameraCrop renders what a crop of a larger render of its scene camera shows."""

from __future__ import annotations

import os

os.environ["MUJOCO_GL"] = "osmesa"  # headless rendering; must be set before mujoco / metaworld are imported

import metaworld
import numpy as np
import pytest

from pipelines.data.embodiments import METAWORLD_VIEWS, CameraCrop
from pipelines.data.metaworld_collect import CameraRig


@pytest.fixture(scope="module")
def env():
    bench = metaworld.MT1("reach-v3", seed=0)
    env = bench.train_classes["reach-v3"]()
    env.set_task(bench.train_tasks[3])
    env.reset()
    yield env
    env.close()


def _crop_of(image: np.ndarray, crop: CameraCrop, out: int) -> np.ndarray:
    """The crop's window cut out of an upright render and box-downsampled to ``out`` px."""
    n = image.shape[0]
    w = round(n / crop.zoom)
    x0 = round((crop.center[0] + 1) / 2 * n - w / 2)
    y0 = round((1 - (crop.center[1] + 1) / 2) * n - w / 2)  # v points up, rows go down
    f = w // out
    return image[y0:y0 + w, x0:x0 + w].reshape(out, f, out, f, 3).mean((1, 3))


@pytest.mark.parametrize("camera", ["corner4", "gripperPOV"])  # corner4 is mounted upside down, gripperPOV is not
def test_crop_matches_a_crop_of_a_larger_render(env, camera):
    crop = CameraCrop(camera, zoom=2.0, center=(0.25, -0.25))
    rig = CameraRig(env.model, env.data, [camera, "zoomed"], 32, views={"zoomed": crop})
    big = CameraRig(env.model, env.data, [camera], 128, views={}).render(env.data)[camera]
    try:
        frames = rig.render(env.data)
    finally:
        rig.close()
    reference = _crop_of(big, crop, 32)
    assert rig.base == {camera: camera, "zoomed": camera} and rig.rotate["zoomed"] == rig.rotate[camera]
    err = np.abs(frames["zoomed"].astype(float) - reference).mean()
    # same window: only anti-aliasing differs; the uncropped view or the mirrored window are far off
    mirrored = _crop_of(big, CameraCrop(camera, 2.0, (-0.25, 0.25)), 32)
    assert err < 6.0, err
    assert np.abs(frames[camera].astype(float) - reference).mean() > 3 * err
    assert np.abs(frames["zoomed"].astype(float) - mirrored).mean() > 3 * err


def test_registered_views_render_and_unknown_views_are_named(env):
    rig = CameraRig(env.model, env.data, list(METAWORLD_VIEWS), 16)
    try:
        assert all(img.shape == (16, 16, 3) and img.std() > 5 for img in rig.render(env.data).values())
    finally:
        rig.close()
    with pytest.raises(ValueError, match=r"unknown camera.*'corner9'.*derived views.*corner4_zoom"):
        CameraRig(env.model, env.data, ["corner9"], 16)
    with pytest.raises(ValueError, match=r"unknown camera.*'nowhere_zoom'"):
        CameraRig(env.model, env.data, ["nowhere_zoom"], 16, views={"nowhere_zoom": CameraCrop("nowhere", 2.0)})


def test_crop_windows_are_validated():
    with pytest.raises(ValueError, match="zoom must be >= 1"):
        CameraCrop("corner4", zoom=0.5)
    with pytest.raises(ValueError, match="reaches outside"):
        CameraCrop("corner4", zoom=2.0, center=(0.6, 0.0))
    assert CameraCrop("corner4", zoom=2.0, center=(0.5, -0.5)).zoom == 2.0
