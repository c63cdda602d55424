"""The `lingbot` CLI: model info and the current demo job."""

import json

import pytest

from model import LingBotVA
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


def test_demo_trains_samples_and_saves(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["demo", "--steps", "30", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sampled a chunk of 16 actions" in text
    model = LingBotVA.from_pretrained(out)
    assert model.checkpoint_meta["action_space"]["source"] == "synthetic"
