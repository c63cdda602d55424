"""Reference of every runtime setting, generated from the pydantic-settings classes themselves.

    lingbot settings                               # env var, default and description of every setting
    lingbot settings --markdown                    # the README's "Configuration reference" block
    lingbot settings --markdown --write-readme     # regenerate that block in README.md
    lingbot settings --check                       # exit 1 when README.md's block is out of date (CI)

Classes are discovered, not listed: every ``.py`` file of the ``pipelines`` and ``services`` packages is parsed
(``ast``, no import) for top-level classes deriving from ``BaseSettings`` or from another class found so (to any
depth); only the modules defining them are imported. A settings class added anywhere in those packages therefore
shows up without touching this module, and the README check fails until the reference is regenerated.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python
from pydantic_settings import BaseSettings

from pipelines.settings import REPO_ROOT, env_names

PACKAGES = ("pipelines", "services")
README = REPO_ROOT / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
REGENERATE = "lingbot settings --markdown --write-readme"
UNSET, REQUIRED = "unset", "required"
"""Default column of a setting whose default is ``None`` / that has no default."""


@dataclass(frozen=True)
class Setting:
    """One field of a settings class, as a user sets it."""

    owner: str  # class name, e.g. GateSettings
    module: str  # e.g. pipelines.evaluate.gate
    name: str  # field name
    env: tuple[str, ...]  # the variables pydantic-settings reads for it, first one preferred
    type: str
    default: str | None  # as written in the environment (JSON for lists, dicts, models); None: unset
    description: str
    required: bool = False  # no default: the variable must be set


# ---------------------------------------------------------------------------------------------------------------
# Discovery


def _module_files(packages: tuple[str, ...]) -> dict[str, Path]:
    """``{module name: file}`` of every ``.py`` file under ``packages`` (located without importing them)."""
    out: dict[str, Path] = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{package!r} is not an importable package")
        for root in map(Path, spec.submodule_search_locations):
            for file in sorted(root.rglob("*.py")):
                parts = file.relative_to(root).with_suffix("").parts
                if "__pycache__" in parts or not all(p.isidentifier() for p in parts):
                    continue
                parts = parts[:-1] if parts[-1] == "__init__" else parts
                out[".".join((package, *parts))] = file
    return out


def _base_names(node: ast.ClassDef) -> set[str]:
    """Last component of each base: ``BaseSettings``, ``pydantic_settings.BaseSettings`` -> ``BaseSettings``."""
    names = set()
    for base in node.bases:
        while isinstance(base, ast.Subscript):  # Generic[...]-style bases
            base = base.value
        if isinstance(base, ast.Name):
            names.add(base.id)
        elif isinstance(base, ast.Attribute):
            names.add(base.attr)
    return names


def settings_classes(packages: tuple[str, ...] = PACKAGES) -> list[type[BaseSettings]]:
    """Every top-level ``BaseSettings`` subclass defined in ``packages``, ordered by module, then source line."""
    classes: list[tuple[str, int, str, set[str]]] = []  # (module, line, class name, base names)
    for module, file in _module_files(packages).items():
        source = file.read_text(encoding="utf-8")
        if "class " not in source:
            continue
        try:
            tree = ast.parse(source, filename=str(file))
        except SyntaxError as err:
            raise ValueError(f"cannot parse {file} while looking for settings classes: {err}") from err
        classes += [(module, n.lineno, n.name, _base_names(n)) for n in tree.body if isinstance(n, ast.ClassDef)]
    # names deriving from BaseSettings, to any depth (a subclass of DataSettings need not mention BaseSettings)
    known, grew = {"BaseSettings"}, True
    while grew:
        found = {name for _, _, name, bases in classes if bases & known}
        grew = not found <= known
        known |= found
    out = []
    for module, _, name, bases in sorted(classes):
        if not bases & known:
            continue
        cls = getattr(importlib.import_module(module), name, None)
        # a same-named class that is not a settings class (or one replaced at import) is not a setting
        if isinstance(cls, type) and issubclass(cls, BaseSettings) and cls.__module__ == module:
            out.append(cls)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fields


def type_name(annotation: Any) -> str:
    """``Path | None``, ``Literal['grpc', 'rest']``, ``list[Toleration]``: the annotation as it reads in code."""
    if annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if annotation is Ellipsis:
        return "..."
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def env_value(value: Any) -> str | None:
    """A default as one would write it in the environment: scalars as text, containers and models as JSON,
    paths inside the checkout as ``<repo>/...`` (so the reference is the same on every machine)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Path):
        try:
            return f"<repo>/{value.relative_to(REPO_ROOT).as_posix()}"
        except ValueError:
            return str(value)
    if isinstance(value, (list, tuple, set, frozenset, dict, BaseModel)):
        return json.dumps(to_jsonable_python(value), separators=(",", ":"))
    return str(getattr(value, "value", value))  # enums: their value


def settings_of(cls: type[BaseSettings]) -> list[Setting]:
    """The rows of one settings class, in field order."""
    rows = []
    for name, field in cls.model_fields.items():
        if field.default is not PydanticUndefined:
            default = field.default
        elif field.default_factory is not None:
            default = field.default_factory()  # none of ours takes the validated data
        else:
            default = None
        rows.append(Setting(owner=cls.__name__, module=cls.__module__, name=name, env=env_names(cls, name, field),
                            type=type_name(field.annotation), default=env_value(default),
                            description=" ".join((field.description or "").split()), required=field.is_required()))
    return rows


def all_settings(classes: list[type[BaseSettings]] | None = None) -> list[Setting]:
    """Rows of every settings class (discovered when ``classes`` is None)."""
    return [row for cls in (settings_classes() if classes is None else classes) for row in settings_of(cls)]


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # GFM splits cells on "|", even inside code spans


_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _prose(text: str) -> str:
    """Free text as Markdown: outside code spans ``<data_dir>`` would be swallowed as an HTML tag and ``a*b*c``
    turn italic; inside them the characters show as they are."""
    parts = _CODE_SPAN.split(text)  # [text, ticks, code, text, ticks, code, ..., text]
    for i in range(0, len(parts), 3):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;").replace("*", "\\*")
    for i in range(1, len(parts), 3):
        parts[i] = ""  # the ticks are put back around the code below
        parts[i + 1] = f"`{parts[i + 1]}`" if "`" not in parts[i + 1] else f"`` {parts[i + 1]} ``"
    return _cell("".join(parts))


def _file(module: str) -> str:
    return importlib.import_module(module).__file__.removeprefix(str(REPO_ROOT) + "/")


def _shown_default(row: Setting, code: bool) -> str:
    if row.required or row.default is None:
        return REQUIRED if row.required else UNSET
    return f"`{_cell(row.default)}`" if code else row.default


def _own_rows(cls: type[BaseSettings], classes: list[type[BaseSettings]]) -> tuple[list[Setting], type | None]:
    """The rows the table lists for ``cls``: those its nearest listed base class does not list as they are (same
    variables, default and description), and that base when it shares any."""
    rows = settings_of(cls)
    base = next((b for b in cls.__mro__[1:] if b in classes), None)
    if base is None:
        return rows, None
    shared = {replace(r, owner=cls.__name__, module=cls.__module__) for r in settings_of(base)}
    own = [r for r in rows if r not in shared]
    return own, base if len(own) < len(rows) else None


def markdown(classes: list[type[BaseSettings]] | None = None) -> str:
    """The README block: one line per class (file, variable prefix, docstring), then one table of every setting (a
    setting a subclass inherits unchanged is listed once, under the base class)."""
    classes = settings_classes() if classes is None else classes
    lines = [f"<!-- generated by `{REGENERATE}` from the settings classes; do not edit by hand -->", ""]
    table = []
    for cls in classes:
        config = cls.model_config
        prefix = config.get("env_prefix") or ""
        prefix = prefix if config.get("case_sensitive") else prefix.upper()
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        source = f"`{_file(cls.__module__)}`, `{prefix}*`" + (", also read from `.env`" if config.get("env_file") else "")
        rows, base = _own_rows(cls, classes)
        shared = f" Also every setting of `{base.__name__}`." if base else ""
        lines.append(f"- `{cls.__name__}` ({source}): {_prose(doc)}{shared}")
        table += rows
    lines += ["", "| Settings | Field | Environment variable | Type | Default | Description |",
              "|---|---|---|---|---|---|"]
    for row in table:
        env = " or ".join(f"`{n}`" for n in row.env)
        default = _shown_default(row, code=True)
        lines.append(f"| `{row.owner}` | `{row.name}` | {env} | `{_cell(row.type)}` | {default} | "
                     f"{_prose(row.description)} |")
    return "\n".join(lines) + "\n"


def plain_text(classes: list[type[BaseSettings]] | None = None) -> str:
    """Plain listing for a terminal: per class, ``VARIABLE=default  # type: description``; a variable without a
    default is shown commented out (``# VARIABLE=``)."""
    out = []
    for cls in settings_classes() if classes is None else classes:
        # no default: commented out, since an empty value would set "" rather than leave the field unset
        rows = [(f"# {r.env[0]}=" if r.default is None else f"{r.env[0]}={r.default}", r) for r in settings_of(cls)]
        width = min(60, max((len(assignment) for assignment, _ in rows), default=0))  # long JSON defaults overflow
        out.append(f"# {cls.__name__} ({_file(cls.__module__)})")
        for assignment, r in rows:
            note = " (required)" if r.required else ""
            out.append(f"{assignment:<{width}}  # {r.type}{note}: {r.description}")
        out.append("")
    return "\n".join(out)


def readme_block(readme: str) -> str:
    """What lies between the settings markers of the README text."""
    begin, end = readme.find(BEGIN), readme.find(END)
    if begin < 0 or end < begin:
        raise ValueError(f"README has no {BEGIN} ... {END} block (section 'Configuration reference')")
    return readme[begin + len(BEGIN):end].strip("\n") + "\n"


def write_readme(path: Path = README, block: str | None = None) -> bool:
    """Replace the README's settings block with ``block`` (default: the current reference); True if it changed."""
    path = Path(path)
    readme = path.read_text(encoding="utf-8")
    block = markdown() if block is None else block
    if readme_block(readme) == block:
        return False
    begin, end = readme.find(BEGIN), readme.find(END)
    path.write_text(f"{readme[:begin + len(BEGIN)]}\n{block}{readme[end:]}", encoding="utf-8")
    return True


def readme_diff(path: Path = README, block: str | None = None) -> str:
    """Unified diff from the README's block to the current reference ("" when up to date)."""
    current = readme_block(Path(path).read_text(encoding="utf-8"))
    block = markdown() if block is None else block
    return "".join(difflib.unified_diff(current.splitlines(True), block.splitlines(True), "README.md", "generated"))


# ---------------------------------------------------------------------------------------------------------------
# CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("settings", help="reference of every LINGBOT_* setting (from the settings classes)")
    p.add_argument("--markdown", action="store_true", help="print the README's Markdown block")
    p.add_argument("--write-readme", action="store_true", help="regenerate the block in README.md")
    p.add_argument("--check", action="store_true", help="exit 1 (with a diff) when README.md's block is out of date")
    p.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    p.set_defaults(func=settings_command)


def settings_command(args: argparse.Namespace) -> int:
    if args.check:
        diff = readme_diff(args.readme)
        if diff:
            print(f"{args.readme} configuration reference is out of date; run `{REGENERATE}`\n{diff}", file=sys.stderr)
            return 1
        return 0
    if args.write_readme:
        changed = write_readme(args.readme)
        print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
        return 0
    print(markdown() if args.markdown else plain_text(), end="")
    return 0


__all__ = [
    "Setting",
    "all_settings",
    "env_names",
    "env_value",
    "markdown",
    "plain_text",
    "readme_block",
    "readme_diff",
    "settings_classes",
    "settings_of",
    "type_name",
    "write_readme",
]
