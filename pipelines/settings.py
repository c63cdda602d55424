"""Runtime settings, read from the environment (``LINGBOT_...``) and ``.env``; the root every step's settings nest.

Model shape lives in ``model.config`` presets; everything here is about where data lives and how a step runs.
``PlatformSettings`` is the root: the data dir and the MLflow tracking store. Each step's class derives from it with
its own variable prefix and falls back to the root's variables (``LINGBOT_TRAIN_DATA_DIR``, else
``LINGBOT_DATA_DIR``), so one variable moves every step. ``add_settings_flags`` / ``settings_from_flags`` turn a
settings class into command-line flags and back: a flag given overrides the environment; what ran is logged with
every run.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pydantic import AliasChoices, AliasGenerator, AliasPath, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipelines.data.embodiments import METAWORLD_CAMERAS

REPO_ROOT = Path(__file__).resolve().parent.parent
ROOT_PREFIX = "LINGBOT_"
"""Variable prefix of the root settings (``LINGBOT_DATA_DIR``, ``LINGBOT_TRACKING_URI``)."""


# ---------------------------------------------------------------------------------------------------------------
# Where the MLflow store lives, and the registry URIs that name its models


def default_tracking_uri(data_dir: Path) -> str:
    """``sqlite:///<data_dir>/mlflow/mlflow.db`` (absolute; the folder is created).

    Artifacts go to ``<data_dir>/mlflow/artifacts/<experiment>``: a sqlite store has no artifact root of its own
    (it would use ``./mlruns`` of the current directory), so ``pipelines.tracking_store.ensure_experiment`` sets each
    experiment's ``artifact_location`` when it creates it.
    """
    folder = Path(data_dir).resolve() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def artifact_root(data_dir: Path) -> Path:
    """``<data_dir>/mlflow/artifacts``: where ``ensure_experiment`` puts experiments' artifacts."""
    return Path(data_dir).resolve() / "mlflow" / "artifacts"


# MLflow's own rules: a registered name holds no "/" or ":" (and "@" would end it here), an alias is word characters
# and "-", a version is a number
_MODEL_URI = re.compile(r"models:/(?P<name>[^/:@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>[0-9]+))")


class ModelURI(NamedTuple):
    """A registry model reference: ``models:/<name>@<alias>`` (``version`` None) or ``models:/<name>/<version>``."""

    name: str
    alias: str | None
    version: str | None


def parse_model_uri(text: str | Path) -> ModelURI | None:
    """The parts of a ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` URI; None for anything else (a model
    directory, a LoggedModel's ``models:/m-...``)."""
    match = _MODEL_URI.fullmatch(str(text))
    return ModelURI(match["name"], match["alias"], match["version"]) if match else None


# ---------------------------------------------------------------------------------------------------------------
# The root


def settings_config(prefix: str) -> SettingsConfigDict:
    """``model_config`` of a settings class on the root: variables ``<prefix><FIELD>`` and ``.env``; the root's own
    fields read ``<prefix><FIELD>`` first, then the root's ``LINGBOT_<FIELD>``."""

    def fallback(name: str) -> AliasChoices | None:
        if prefix.upper() == ROOT_PREFIX or name not in PlatformSettings.model_fields:
            return None
        return AliasChoices(f"{prefix}{name}".upper(), f"{ROOT_PREFIX}{name}".upper())

    # validate_by_name: with the aliases above, ``TrainSettings(data_dir=...)`` still works
    return SettingsConfigDict(env_prefix=prefix, env_file=".env", extra="ignore", validate_by_name=True,
                              alias_generator=AliasGenerator(validation_alias=fallback))


class PlatformSettings(BaseSettings):
    """The root: where generated artefacts live and which MLflow tracking store records runs and models."""

    model_config = settings_config(ROOT_PREFIX)

    data_dir: Path = Field(REPO_ROOT / "data", description="root of every generated artefact: episodes, latents, "
                                                           "feast, runs, the MLflow store (ignored by git)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: sqlite in <data_dir>/mlflow)")

    @property
    def mlflow_uri(self) -> str:
        """The tracking URI in use: ``tracking_uri``, else the data dir's sqlite store (its folder created)."""
        return self.tracking_uri or default_tracking_uri(self.data_dir)


# ---------------------------------------------------------------------------------------------------------------
# Command-line flags from a settings class


def env_names(cls: type[BaseSettings], name: str, field: FieldInfo) -> tuple[str, ...]:
    """The environment variables pydantic-settings reads for field ``name`` of ``cls``.

    ``env_prefix`` + field name, upper-cased unless ``case_sensitive``; a validation alias (``alias=``,
    ``validation_alias=``, ``AliasChoices``, ``AliasPath``) replaces the name and carries no prefix unless
    ``env_prefix_target`` says so; with ``validate_by_name``/``populate_by_name`` the prefixed name works too.
    """
    config = cls.model_config
    prefix = config.get("env_prefix") or ""
    target = config.get("env_prefix_target") or "variable"
    by_name = config.get("validate_by_name")
    by_name = bool(config.get("populate_by_name")) if by_name is None else by_name
    alias = field.validation_alias if config.get("validate_by_alias") is not False else None
    if isinstance(alias, AliasChoices):
        heads = [c if isinstance(c, str) else c.path[0] for c in alias.choices]
    elif isinstance(alias, AliasPath):
        heads = [alias.path[0]]
    else:
        heads = [alias] if alias else []
    names = [(prefix if target in ("alias", "all") else "") + str(h) for h in heads]
    if not heads or by_name:
        names.append((prefix if target in ("variable", "all") else "") + name)
    return tuple(dict.fromkeys(n if config.get("case_sensitive") else n.upper() for n in names))


def _flag_type(annotation: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field's type: ``X | None`` as ``X``, a ``Literal`` as choices, a bool as
    ``--x/--no-x``, a list of strings as comma-separated values. Other containers and models have no flag (they are
    set in the environment, as JSON)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return {"type": type(choices[0]), "choices": choices}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation is SecretStr:
        return {"type": str}
    if annotation in (str, int, float, Path):
        return {"type": annotation}
    if annotation == list[str]:
        return {"type": _comma_list, "metavar": "A,B,..."}
    raise TypeError(f"no command-line flag for a field of type {annotation!r}; leave it out of the flags")


def _comma_list(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def _origin(env: str, default: Any) -> str:
    """Where an unset flag's value comes from: ``[$LINGBOT_TRAIN_STEPS, else 300]``. An unset default is left out:
    the field's description says what unset means."""
    if default is None:
        return f"[${env}]"
    return f"[${env}, else {str(default).lower() if isinstance(default, bool) else default}]"


def add_settings_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[BaseSettings], *,
                       fields: Iterable[str] | None = None, exclude: Iterable[str] = (),
                       flags: Mapping[str, Sequence[str]] | None = None,
                       defaults: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """One flag per field of ``cls`` (``fields``, default all, less ``exclude``): ``--max-batch-size`` for
    ``max_batch_size``, or the option strings ``flags[name]`` (a bool gets ``--no-...`` of each); help is the field's
    description and where an unset flag's value comes from (its variable, else ``defaults[name]`` as shown, or the
    field's default).

    Every flag defaults to None, so ``settings_from_flags`` passes on only the flags given; the environment, ``.env``
    and the class's defaults decide the rest. Returns the field names that got a flag.
    """
    flags, defaults = flags or {}, defaults or {}
    names = tuple(n for n in (cls.model_fields if fields is None else fields) if n not in set(exclude))
    for name in names:
        field = cls.model_fields[name]
        default = defaults.get(name, None if field.default is PydanticUndefined else field.default)
        env = env_names(cls, name, field)[0]
        text = f"{field.description or name} {_origin(env, default)}".replace("%", "%%")  # argparse %-formats help
        parser.add_argument(*flags.get(name, [f"--{name.replace('_', '-')}"]), dest=name, default=None, help=text,
                            **_flag_type(field.annotation))
    return names


def flag_errors(err: ValidationError) -> str:
    """pydantic's errors as the flags the user gave: ``--steps: Input should be greater than or equal to 1``."""
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e.get("loc", ()))
        message = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"--{field.replace('_', '-')}: {message}" if field else message)
    return "; ".join(parts)


S = TypeVar("S", bound=BaseSettings)


def settings_from_flags(cls: type[S], args: argparse.Namespace, fields: Iterable[str] | None = None,
                        **fixed: Any) -> S:
    """``cls`` from the environment and ``.env``, overridden by the flags given in ``args`` (those of ``fields``,
    default every field of ``cls``) and by ``fixed``. Invalid values raise ValueError naming the flag."""
    names = cls.model_fields if fields is None else fields
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    try:
        return cls(**{**given, **fixed})
    except ValidationError as err:  # one line naming the flag, not pydantic's report
        raise ValueError(flag_errors(err)) from None


# ---------------------------------------------------------------------------------------------------------------
# The data steps


def _data_folder(name: str) -> property:
    """The read-only property ``<data_dir>/<name>``: one data step's folder."""
    return property(lambda self: self.data_dir / name, doc=f"``<data_dir>/{name}``")


class DataSettings(PlatformSettings):
    """Data steps: collect -> prepare -> encode -> loader."""

    suite: str = Field("metaworld", description="simulator suite to collect from")
    tasks: str = Field("MT10", description="MT10, MT50 or comma-separated task names")
    episodes: int = Field(50, ge=1, description="successful demonstrations per task")
    image_size: int = Field(96, ge=16, description="rendered camera image size (pixels, square)")
    cameras: str = Field(",".join(METAWORLD_CAMERAS),
                         description="comma-separated views to render: scene cameras or derived views (corner4_zoom)")
    seed: int = Field(0, description="seed of collection, splits and sampling")
    workers: int = Field(2, ge=1, description="parallel processes for collection")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="validation share of each dataset's episodes")
    preset: str = Field("small", description="model preset whose latent/text widths the encoders must produce")
    vae_path: Path | None = Field(None, description="local Wan2.2 VAE directory; None = small random VAE (CPU)")
    text_encoder_path: Path | None = Field(None, description="local T5/umT5 directory; None = small random encoder")
    shard_episodes: int = Field(32, ge=1, description="episodes per latent shard file")
    min_latent_frames: int = Field(2, ge=2, description="episodes with fewer latent frames are quarantined")

    episodes_dir = _data_folder("episodes")
    prepared_dir = _data_folder("prepared")
    latents_dir = _data_folder("latents")
    feast_dir = _data_folder("feast")
