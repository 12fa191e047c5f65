"""Build validated dataclass configs from YAML files and `--set key=value` overrides.

One loader serves every stage (`ppo`, `sft`, `reward`, `dpo`): a YAML mapping is checked
against a dataclass tree, recursively. Unknown keys and values of the wrong type are errors
that name the key path and the file they came from; each dataclass then runs its own
`__post_init__` validation. With the key lines of the file (`yaml_lines`), an error names
`file:line` too.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the config schema."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from `path` (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def yaml_lines(path: str | Path) -> dict[str, int]:
    """The 1-based line of every key of the YAML mapping in `path`, by dotted key path
    (`{"ppo": 3, "ppo.init_kl_coef": 4}`); empty when the file is not a mapping."""
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                lines[path] = key.start_mark.line + 1
                walk(value, path)

    try:
        walk(yaml.compose(Path(path).read_text()), "")
    except (OSError, yaml.YAMLError):
        return {}
    return lines


class _Where:
    """Names a key path in an error: `file:line` when the line is known, else the source."""

    def __init__(self, source: str, lines: dict[str, int] | None) -> None:
        self.source = source
        self.lines = lines or {}

    def __call__(self, path: str) -> str:
        while path:
            if path in self.lines:
                return f"{self.source}:{self.lines[path]}"
            path = path.rsplit(".", 1)[0] if "." in path else path.split("[", 1)[0] if "[" in path else ""
        return self.source


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML scalars) to a nested mapping."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set ppo.init_kl_coef=0.1")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty component in key {key!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from e
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "<config>", prefix: str = "",
              lines: dict[str, int] | None = None) -> T:
    """Construct dataclass `cls` from a mapping, checking keys and value types recursively.

    `source` (a file name or "--set"), `prefix` (the key path so far) and `lines` (`yaml_lines` of
    the file) make error messages point at the offending key: `file:line: key ...`.
    """
    return _from_dict(cls, data, where=_Where(source, lines), prefix=prefix)


def _from_dict(cls: type[T], data: dict[str, Any], *, where: _Where, prefix: str) -> T:
    source = where(prefix)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        section = f"section {prefix!r}" if prefix else "the top level"
        first = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        close = [f"{match[0]!r}" + (f" for {k!r}" if len(unknown) > 1 else "") for k in unknown
                 if (match := difflib.get_close_matches(k, fields, n=1, cutoff=0.6))]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"{where(first)}: unknown key(s) {', '.join(repr(f'{prefix}.{k}' if prefix else k) for k in unknown)}"
            f" in {section}{hint}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, where=where, path=path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):  # names its field already
            raise ConfigError(f"{source}: {e}") from e
        raise ConfigError(f"{source}: invalid {prefix or cls.__name__}: {e}") from e


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain mappings (the inverse of `from_dict`, for saving next to a run)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _convert(tp: Any, value: Any, *, where: _Where, path: str) -> Any:
    origin = typing.get_origin(tp)
    source = where(path)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value if value is not None else {}, where=where, prefix=path)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        if len(candidates) == 1:  # an optional value: its own error names the real field
            return _convert(candidates[0], value, where=where, path=path)
        for arg in candidates:
            try:
                return _convert(arg, value, where=where, path=path)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {path} = {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {path} = {value!r}; expected one of {', '.join(map(repr, choices))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {path} = {value!r} must be a list")
        items = [_convert(item_tp, v, where=where, path=f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {path} = {value!r} must be a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {path} = {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {path} = {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {path} = {value!r} must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {path} = {value!r} must be a string")
        return value
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
