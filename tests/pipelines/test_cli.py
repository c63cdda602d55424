"""The `lingbot` CLI: model info and data import (`lingbot demo`: tests/pipelines/test_demo.py)."""

import json

import pytest

from pipelines.cli import main


@pytest.mark.parametrize("preset", ["tiny", "small", "paper-5.3b"])
def test_model_info_json(preset, capsys):
    assert main(["model", "info", "--preset", preset, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_params"] == info["video_stream_params"] + info["action_stream_params"] > 0
    assert info["preset"] == preset


def test_model_info_unknown_preset_is_a_clear_error(capsys):
    assert main(["model", "info", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_data_import_cli_loads_a_local_lerobot_dataset(tmp_path, capsys):
    import numpy as np

    from pipelines.data.episode import Episode
    from pipelines.data.lerobot import LeRobotDataset, write_lerobot_dataset

    rng = np.random.default_rng(0)
    eps = [Episode(frames={"cam": rng.integers(0, 255, (9, 16, 16, 3), dtype=np.uint8)},
                   actions=rng.uniform(-1, 1, (9, 4)).astype(np.float32), state=np.zeros((9, 4), np.float32),
                   success=np.zeros(9, bool), task="t", instruction="do t", embodiment="x", fps=10) for _ in range(2)]
    write_lerobot_dataset(tmp_path / "src", eps, robot_type="sawyer", fps=10)
    assert main(["data", "import", "--lerobot", str(tmp_path / "src"), "--embodiment", "metaworld-sawyer",
                 "--out", str(tmp_path / "episodes")]) == 0
    assert "imported 2 episodes" in capsys.readouterr().out
    ds = LeRobotDataset(tmp_path / "episodes" / "src")
    assert len(ds) == 2 and ds.episode(0).embodiment == "metaworld-sawyer"
