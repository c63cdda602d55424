"""The settings root (``pipelines.settings``): the root's variables as every step's fallback, the ``models:/``
grammar, and command-line flags made from a settings class."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field, SecretStr

from pipelines.evaluate.settings import EvalSettings, GateSettings
from pipelines.settings import (
    DataSettings,
    ModelURI,
    PlatformSettings,
    add_settings_flags,
    parse_model_uri,
    settings_config,
    settings_from_flags,
)
from pipelines.train.settings import TrainSettings
from services.policy_server.settings import ServeSettings

STEPS = [DataSettings, TrainSettings, GateSettings, EvalSettings, ServeSettings]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith("LINGBOT_")]:  # a developer's own settings must not interfere
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .env


@pytest.mark.parametrize("cls", STEPS, ids=lambda c: c.__name__)
def test_every_step_nests_the_root(cls, monkeypatch):
    assert issubclass(cls, PlatformSettings)
    monkeypatch.setenv("LINGBOT_DATA_DIR", "/srv/root")
    monkeypatch.setenv("LINGBOT_TRACKING_URI", "http://mlflow:5000")
    settings = cls(stage="pretrain") if cls is TrainSettings else cls()
    assert settings.data_dir == Path("/srv/root") and settings.mlflow_uri == "http://mlflow:5000"


@pytest.mark.parametrize(("cls", "own"), [
    pytest.param(TrainSettings, "LINGBOT_TRAIN_DATA_DIR", id="train"),
    pytest.param(GateSettings, "LINGBOT_GATE_DATA_DIR", id="gate"),
    pytest.param(EvalSettings, "LINGBOT_GATE_DATA_DIR", id="eval"),
    pytest.param(ServeSettings, "LINGBOT_SERVE_DATA_DIR", id="serve"),
])
def test_a_steps_own_variable_beats_the_roots_and_an_argument_beats_both(cls, own, monkeypatch, tmp_path):
    monkeypatch.setenv("LINGBOT_DATA_DIR", "/srv/root")
    monkeypatch.setenv(own, "/srv/own")
    assert cls().data_dir == Path("/srv/own")
    assert cls(data_dir=tmp_path).data_dir == tmp_path  # by field name, despite the aliases
    assert PlatformSettings().data_dir == Path("/srv/root")  # the root never reads a step's variable


def test_mlflow_uri_defaults_to_the_data_dirs_sqlite_store(tmp_path):
    settings = GateSettings(data_dir=tmp_path)
    assert settings.tracking_uri is None
    assert settings.mlflow_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}"
    assert (tmp_path / "mlflow").is_dir()
    assert "data_dir" in settings.model_dump() and "LINGBOT_GATE_DATA_DIR" not in settings.model_dump()


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("models:/lingbot-va-reach-v3@champion", ModelURI("lingbot-va-reach-v3", "champion", None), id="alias"),
    pytest.param("models:/lingbot-va-base/12", ModelURI("lingbot-va-base", None, "12"), id="version"),
    pytest.param("models:/a b.c_d@previous-champion", ModelURI("a b.c_d", "previous-champion", None), id="mlflow-name"),
    pytest.param(Path("data/runs/pretrain/model"), None, id="directory"),
    pytest.param("models:/m-0123abcd", None, id="logged-model"),
    pytest.param("models:/name/v3", None, id="not-a-number"),
    pytest.param("models:/name@al/ias", None, id="slash-in-alias"),
    pytest.param("models:/a:b@champion", None, id="colon-in-name"),
    pytest.param(" models:/name@champion", None, id="leading-space"),
])
def test_parse_model_uri(text, expected):
    assert parse_model_uri(text) == expected


class _Probe(PlatformSettings):
    """Every kind of field a flag is made for."""

    model_config = settings_config("PROBE_")

    count: int = Field(3, ge=1, description="a count, 100% of it")
    ratio: float | None = Field(None, description="unset means the stage's")
    kind: Literal["a", "b"] = Field("a", description="one of two")
    on: bool = Field(True, description="a switch")
    secret: SecretStr | None = Field(None, description="never on the command line")
    items: list[int] = Field(default_factory=list, description="JSON only")


def _parser(**kw) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe")
    added = add_settings_flags(parser, _Probe, exclude=("secret", "items"), flags={"on": ["--switch", "-s"]}, **kw)
    assert added == ("data_dir", "tracking_uri", "count", "ratio", "kind", "on")
    return parser


def test_flags_from_a_settings_class(monkeypatch):
    help_ = " ".join(_parser(defaults={"ratio": 0.5}).format_help().split())
    assert "--count COUNT a count, 100% of it [$PROBE_COUNT, else 3]" in help_
    assert "--ratio RATIO unset means the stage's [$PROBE_RATIO, else 0.5]" in help_
    assert "--kind {a,b}" in help_ and "--switch, --no-switch, -s a switch [$PROBE_ON, else true]" in help_
    assert "[$PROBE_DATA_DIR]" not in help_ and "[$PROBE_TRACKING_URI]" in help_
    monkeypatch.setenv("PROBE_COUNT", "7")
    monkeypatch.setenv("PROBE_ON", "false")
    # an unset flag leaves the environment's value; a given one overrides it
    assert settings_from_flags(_Probe, _parser().parse_args([])).count == 7
    settings = settings_from_flags(_Probe, _parser().parse_args(["--count", "9", "--switch", "--kind", "b"]))
    assert (settings.count, settings.on, settings.kind) == (9, True, "b")
    assert settings_from_flags(_Probe, _parser().parse_args(["--no-switch"]), kind="b").kind == "b"  # fixed values
    for wrong in (["--kind", "c"], ["--on"]):  # not a choice; a flag renamed by ``flags``
        with pytest.raises(SystemExit):
            _parser().parse_args(wrong)


def test_an_invalid_flag_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"^--count: Input should be greater than or equal to 1$"):
        settings_from_flags(_Probe, _parser().parse_args(["--count", "0"]))


def test_a_field_without_a_flag_type_is_a_programming_error():
    with pytest.raises(TypeError, match="no command-line flag"):
        add_settings_flags(argparse.ArgumentParser(), _Probe, fields=("items",))
