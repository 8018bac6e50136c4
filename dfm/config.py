"""Configs as nested dataclasses, loaded from YAML with dotted `key=value` overrides.

    cfg = load_config(TrainConfig, "configs/wan_flow_digits.yaml", ["train.max_steps=100", "optim.lr=3e-4"])

Every key is checked against the dataclass: a typo is a `ConfigError` that names the key, the valid keys at that
level and the closest match. Values are parsed with YAML rules (`3e-4`, `true`, `[1, 2]`, `null`) and checked
against the field's type. `to_dict(cfg)` gives the resolved config to print (`--dry-run`) and save beside a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from dfm.errors import UserError, first_line
from dfm.io import write_text_atomic

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A bad config key or value; its message is one line that names the problem and the fix."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, where: str, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{where}{key}'{hint}; valid keys{' in ' + where[:-1] if where else ''}: "
                       f"{', '.join(valid)}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check (and gently convert: int -> float, list -> tuple) `value` against the annotation `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{name}' cannot be {value!r}")
    if origin is typing.Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # True is not Literal[1]
            raise ConfigError(f"config key '{name}' must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{name}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, name) for v in value]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{name}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{name}' is a section; set its keys as {name}.KEY=VALUE")
        return from_dict(tp, value, prefix=name + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and tp in (int, float):  # bool is an int to Python, never a count to a config
        raise ConfigError(f"config key '{name}' must be {tp.__name__}, got {value!r} (a boolean); give a number")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{name}' must be {tp.__name__}, got {value!r}")
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (at any level) instead of keeping the last."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are not duplicates
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise ConfigError(f"key '{_key_text(key)}' appears twice in one mapping (lines {seen[key]} "
                                          f"and {line}); keep one")
                    seen[key] = line
                except TypeError:  # an unhashable key: SafeLoader reports it
                    continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: Any = "the YAML text") -> Any:
    """yaml.safe_load that refuses duplicate keys: a ConfigError naming `source`, the key and both lines."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"config file {source}: {e}") from None


def _key_text(key: Any) -> Any:
    """YAML 1.1 reads some bare keys as non-strings (`null:` -> None, `yes:`/`on:` -> True, `1:` -> 1); a config
    key is always a name, so turn them back into one: None -> "null", True/False -> "true"/"false" (the spelling
    `yes`/`on` is lost), numbers -> their digits."""
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    return key if isinstance(key, str) else str(key)


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build the dataclass `cls` from a (nested) dict, rejecting unknown keys."""
    types = _field_types(cls)
    data = {_key_text(k): v for k, v in data.items()}
    for key in data:
        if key not in types:
            raise _unknown_key(key, prefix, list(types))
    kwargs = {k: _coerce(v, types[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The resolved config as plain YAML-able data."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else (list(v) if isinstance(v, tuple) else v)
    return out


def _set_dotted(data: dict, cls, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node, node_cls, where = data, cls, ""
    for i, part in enumerate(parts):
        types = _field_types(node_cls)
        if part not in types:
            raise _unknown_key(part, where, list(types))
        if i == len(parts) - 1:
            node[part] = value
            return
        tp = types[part]
        if tp is dict or typing.get_origin(tp) is dict:  # a free-form mapping (model.overrides): the rest is one key
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node[part][".".join(parts[i + 1:])] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{where}{part}' is a value, not a section; write {where}{part}=VALUE")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        node_cls, where = types[part], where + part + "."


def renamed_keys(cls) -> dict[str, tuple[str, ...]]:
    """A config class's renamed keys: `RENAMED = {"old.dotted.key": ("new.key", ...)}` on the class (optional)."""
    return dict(getattr(cls, "RENAMED", {}))


def upgrade(cls, data: dict) -> dict:
    """Move the values of renamed keys in a nested dict (a config file of an older dfm) to their new keys; a new
    key set in the same file wins over the old one's value."""
    for old, new in renamed_keys(cls).items():
        *path, leaf = old.split(".")
        node = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        for target in new:
            *tpath, tleaf = target.split(".")
            tnode = data
            for part in tpath:
                tnode = tnode.setdefault(part, {})
                if not isinstance(tnode, dict):  # not a section: from_dict reports it
                    break
            else:
                tnode.setdefault(tleaf, value)
    return data


def parse_overrides(cls, overrides: Sequence[str], data: dict | None = None) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML) onto the nested dict `data`."""
    data = {} if data is None else data
    renamed = renamed_keys(cls)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        if key.strip() in renamed:
            new = renamed[key.strip()]
            raise ConfigError(f"config key '{key.strip()}' is now {' and '.join(repr(k) for k in new)}; write "
                              f"{' '.join(f'{k}={raw}' for k in new)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(data, cls, key.strip(), value)
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of `cls`, then the YAML file at `path`, then the dotted `overrides`, validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass a YAML file such as configs/<recipe>.yaml")
        try:
            data = load_yaml(path.read_text(encoding="utf-8"), path) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                              f"{e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML ({first_line(e)}); fix the syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
        data = upgrade(cls, data)  # the keys an older dfm wrote, moved to their new places
    data = parse_overrides(cls, overrides, data)
    return from_dict(cls, data)


def config_yaml(cfg) -> str:
    """The resolved config as YAML text, sections in field order (what config.yaml files and --dry-run hold)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg, path: str | Path) -> None:
    write_text_atomic(path, config_yaml(cfg))
