"""The generated configuration reference: discovery of settings classes, env var names (checked against what
pydantic-settings actually reads), rendering, the README block being current, and `lingbot settings`."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import AliasChoices, AliasPath, Field
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from pipelines.cli import main
from pipelines.settings import REPO_ROOT
from pipelines.settings_reference import (
    BEGIN,
    END,
    PACKAGES,
    README,
    REGENERATE,
    all_settings,
    markdown,
    readme_block,
    readme_diff,
    settings_classes,
    settings_of,
    type_name,
)

# the classes that exist today: a floor for discovery, not the list it works from
KNOWN = {"PlatformSettings", "DataSettings", "TrainSettings", "GateSettings", "EvalSettings", "ClusterSettings",
         "ServeSettings", "RobotSettings", "FleetSettings"}


@pytest.fixture(scope="module")
def classes():
    return settings_classes()


def _all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def test_readme_configuration_reference_is_up_to_date():
    diff = readme_diff()
    assert not diff, (f"README.md's configuration reference is out of date: run `{REGENERATE}` and commit README.md."
                      f"\n{diff[:4000]}")


def test_every_settings_class_in_the_packages_is_covered(classes):
    names = {c.__name__ for c in classes}
    assert names >= KNOWN, f"discovery missed {KNOWN - names}"
    assert len(names) == len(classes), "two settings classes share a name; the reference could not tell them apart"
    # an independent oracle: import every module whose source mentions BaseSettings, then ask Python for all
    # subclasses (to any depth) defined anywhere in the packages
    for package in PACKAGES:
        root = REPO_ROOT / package
        for file in root.rglob("*.py"):
            if "__pycache__" not in file.parts and "BaseSettings" in file.read_text(encoding="utf-8"):
                module = ".".join(file.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
                importlib.import_module(module)
    defined = {c for c in _all_subclasses(BaseSettings) if c.__module__.split(".")[0] in PACKAGES}
    missing = sorted(f"{c.__module__}.{c.__qualname__}" for c in defined - set(classes))
    assert not missing, f"settings classes missing from the reference: {missing}"
    block = readme_block(README.read_text(encoding="utf-8"))
    assert all(f"| `{n}` |" in block for n in names), f"README lacks some of {sorted(names)}; run `{REGENERATE}`"


def test_every_setting_is_documented(classes):
    undocumented = [f"{r.owner}.{r.name}" for r in all_settings(classes) if not r.description]
    assert not undocumented, f"settings without a Field(description=...): {undocumented}"


@pytest.mark.parametrize(("owner", "field", "env", "value", "expected"), [
    pytest.param("GateSettings", "min_success", "LINGBOT_GATE_MIN_SUCCESS", "0.7", 0.7, id="gate"),
    pytest.param("DataSettings", "data_dir", "LINGBOT_DATA_DIR", "/srv/lingbot", Path("/srv/lingbot"), id="data"),
    pytest.param("TrainSettings", "zero_stage", "LINGBOT_TRAIN_ZERO_STAGE", "3", 3, id="train"),
    pytest.param("ClusterSettings", "namespace", "LINGBOT_CLUSTER_NAMESPACE", "demo", "demo", id="cluster"),
    pytest.param("ServeSettings", "max_batch_size", "LINGBOT_SERVE_MAX_BATCH_SIZE", "4", 4, id="serve"),
    pytest.param("RobotSettings", "endpoint", "LINGBOT_ROBOT_ENDPOINT", "10.0.0.7:9000", "10.0.0.7:9000", id="robot"),
    pytest.param("FleetSettings", "robots", "LINGBOT_FLEET_ROBOTS", "3", 3, id="fleet"),
])
def test_env_var_names_are_the_ones_the_classes_read(classes, monkeypatch, owner, field, env, value, expected):
    (cls,) = [c for c in classes if c.__name__ == owner]
    (row,) = [r for r in settings_of(cls) if r.name == field]
    assert row.env == (env,)
    monkeypatch.setenv(env, value)
    assert getattr(cls(), field) == expected


def _keys(cls: type[BaseSettings], name: str) -> set[str]:
    """What EnvSettingsSource may report a field under: its name or its validation alias(es)."""
    alias = cls.model_fields[name].validation_alias
    if isinstance(alias, (AliasChoices, AliasPath)):
        return {name, *(a[0] for a in alias.convert_to_aliases())} if isinstance(alias, AliasChoices) else \
            {name, alias.path[0]}
    return {name, alias} if alias else {name}


def _assert_each_env_var_is_read(cls: type[BaseSettings], monkeypatch) -> int:
    """Set each reported variable alone; pydantic-settings' own env source must find exactly that field."""
    rows = settings_of(cls)
    everything = {n for r in rows for n in r.env}
    checked = 0
    for row in rows:
        for env in row.env:
            for other in everything:
                monkeypatch.delenv(other, raising=False)
            # valid JSON for any type: complex fields are JSON-decoded by the source, simple ones kept as text
            monkeypatch.setenv(env, "[1]")
            found = EnvSettingsSource(cls)()
            assert len(found) == 1 and set(found) <= _keys(cls, row.name), (cls.__name__, row.name, env, found)
            checked += 1
    return checked


def test_every_reported_env_var_is_read_by_pydantic_settings(classes, monkeypatch):
    for key in [k for k in os.environ if k.startswith("LINGBOT_")]:  # a developer's own settings must not interfere
        monkeypatch.delenv(key)
    reported = sum(len(r.env) for r in all_settings(classes))  # a step's own variable, then the root's
    assert sum(_assert_each_env_var_is_read(cls, monkeypatch) for cls in classes) == reported


class _Aliased(BaseSettings):
    """Aliases and prefixes the platform's classes do not use (yet), so env_names is checked on them too."""

    model_config = SettingsConfigDict(env_prefix="probe_", extra="ignore")

    plain: int = Field(1, description="prefix + name")
    legacy: str = Field("a", alias="OLD_NAME", description="an alias replaces the name and takes no prefix")
    either: str = Field("b", validation_alias=AliasChoices("first_choice", AliasPath("second", 0)),
                        description="each choice is a variable; a path reads its head")
    items: list[int] = Field(default_factory=list, description="complex: JSON")


class _ByName(_Aliased):
    model_config = SettingsConfigDict(env_prefix="probe_", populate_by_name=True, case_sensitive=True)


def test_env_names_follow_prefix_aliases_and_case(monkeypatch):
    assert {r.name: r.env for r in settings_of(_Aliased)} == {
        "plain": ("PROBE_PLAIN",), "legacy": ("OLD_NAME",), "either": ("FIRST_CHOICE", "SECOND"),
        "items": ("PROBE_ITEMS",)}
    assert {r.name: r.env for r in settings_of(_ByName)} == {
        "plain": ("probe_plain",), "legacy": ("OLD_NAME", "probe_legacy"), "either": ("first_choice", "second",
                                                                                      "probe_either"),
        "items": ("probe_items",)}
    _assert_each_env_var_is_read(_Aliased, monkeypatch)
    _assert_each_env_var_is_read(_ByName, monkeypatch)


def test_rendering_types_defaults_and_markdown_escapes(classes):
    from typing import Literal

    assert type_name(Path | None) == "Path | None"
    assert type_name(Literal["grpc", "rest"]) == "Literal['grpc', 'rest']"
    assert type_name(tuple[str, ...]) == "tuple[str, ...]"
    rows = {(r.owner, r.name): r for r in all_settings(classes)}
    assert rows["GateSettings", "require_no_nan"].default == "true"
    assert rows["GateSettings", "tracking_uri"].default is None
    assert rows["DataSettings", "data_dir"].default == "<repo>/data"  # never this checkout's absolute path
    assert rows["ClusterSettings", "gpu_tolerations"].default.startswith('[{"key":"nvidia.com/gpu"')
    text = markdown(classes)
    assert str(REPO_ROOT) not in text
    assert "| `GateSettings` | `min_success` | `LINGBOT_GATE_MIN_SUCCESS` | `float` | `0.5` |" in text
    assert ("| `GateSettings` | `tracking_uri` | `LINGBOT_GATE_TRACKING_URI` or `LINGBOT_TRACKING_URI` | `str \\| None` "
            "| unset |") in text
    assert "&lt;data_dir&gt;/mlflow" in text  # "<data_dir>" would vanish as an unknown HTML tag


def test_discovery_imports_only_settings_modules_and_follows_subclasses(tmp_path, monkeypatch):
    pkg = tmp_path / "probe_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "base.py").write_text(textwrap.dedent('''
        import pydantic_settings
        from pydantic import Field

        class Base(pydantic_settings.BaseSettings):
            x: int = Field(1, description="x")
        '''))
    (pkg / "sub" / "derived.py").write_text(textwrap.dedent('''
        from pydantic import Field
        from probe_pkg.base import Base

        class Derived(Base):  # never mentions BaseSettings
            y: int = Field(2, description="y")

        class Plain:
            pass
        '''))
    (pkg / "heavy.py").write_text("raise RuntimeError('a module without settings must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found = settings_classes(("probe_pkg",))
        assert [f"{c.__module__}.{c.__name__}" for c in found] == ["probe_pkg.base.Base", "probe_pkg.sub.derived.Derived"]
        assert [r.name for r in settings_of(found[1])] == ["x", "y"]
        assert "probe_pkg.heavy" not in sys.modules
    finally:
        for name in [m for m in sys.modules if m.split(".")[0] == "probe_pkg"]:
            del sys.modules[name]


def test_settings_command(tmp_path, capsys, classes):
    assert main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "LINGBOT_GATE_MIN_SUCCESS=0.5" in out and "# LINGBOT_GATE_TRACKING_URI=" in out
    assert main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown(classes)

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n## Configuration reference\n\n{BEGIN}\n| stale |\n{END}\n\nafter\n")
    assert main(["settings", "--check", "--readme", str(readme)]) == 1
    assert REGENERATE in capsys.readouterr().err
    assert main(["settings", "--markdown", "--write-readme", "--readme", str(readme)]) == 0
    assert "updated" in capsys.readouterr().out
    assert main(["settings", "--check", "--readme", str(readme)]) == 0
    written = readme.read_text()
    assert written.startswith("# Title\n") and written.endswith(f"{END}\n\nafter\n") and "| stale |" not in written
    assert readme_block(written) == markdown(classes)

    readme.write_text("# no markers\n")
    assert main(["settings", "--check", "--readme", str(readme)]) == 2
    assert "Configuration reference" in capsys.readouterr().err
