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
    from pipelines.data.lerobot.reader import LeRobotDataset
    from pipelines.data.lerobot.writer import write_lerobot_dataset

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


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == "lingbot 0.1.0"


@pytest.mark.parametrize("stage", ["pretrain", "posttrain"])
def test_train_stage_help_is_its_own_with_defaults(stage, capsys):
    with pytest.raises(SystemExit):
        main(["train", stage, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert out.startswith(f"usage: lingbot train {stage} ")
    # the stage's own defaults (pipelines.train.settings.STAGE_DEFAULTS), and the env variable that overrides them
    steps = {"pretrain": 1000, "posttrain": 300}[stage]
    assert f"optimizer steps (stage default if unset) [$LINGBOT_TRAIN_STEPS, else {steps}]" in out
    assert "--register, --no-register register the final model" in out and "--register-model" not in out
    assert "--no-activation-checkpointing recompute" in out
    assert ("--task TASK" in out) == (stage == "posttrain")


def test_every_flag_has_help():
    """Every option of every `lingbot` command explains itself (serve's kserve flags are added when it parses)."""
    import argparse

    from pipelines.cli import build_parser

    def parsers(p: argparse.ArgumentParser, path: str):
        yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from parsers(child, f"{path} {name}")

    missing = [f"{path} {'/'.join(a.option_strings)}" for path, p in parsers(build_parser(), "lingbot")
               for a in p._actions if a.option_strings and not a.help]
    assert missing == []


def test_posttrain_without_task_is_one_clear_line(capsys):
    assert main(["train", "posttrain", "--init-from", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "lingbot: error: posttrain needs --task (the task whose demos it trains on)\n"
    assert main(["train", "pretrain", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "lingbot: error: --steps: Input should be greater than or equal to 1\n"


def test_serve_help_offers_only_the_flags_it_uses(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for used in ("--model", "--http_port", "--grpc_port", "--workers", "--enable_grpc", "--timeout-keep-alive"):
        assert used in out
    for unused in ("--predictor_host", "--predictor_protocol", "--ssl_certfile", "--configure_logging",
                   "--model_name", "--grpc_max_send_message_length"):
        assert unused not in out
