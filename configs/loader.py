"""Turn YAML into the typed, validated objects of :mod:`configs.schema`.

Every problem becomes one :class:`ConfigError` line that names the file, the key path
and the fix, e.g. ``demo.yaml: privacy.target_epsilon: must be > 0 (got -1)``.
Relative paths in a file are resolved against that file's folder, so a config means
the same thing from any working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from configs.schema import MAX_INT, Config, SiteConfig
from configs.strict_yaml import YamlFileError, read_yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used. The message is one line: ``where: key: fix``."""


def _fail(path: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{path}: {message}" if path else message)


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
             Path: "a path"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _convert(tp: Any, value: Any, key: str, base_dir: Path) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            _fail(key, "must be set (got null)")
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key, base_dir)
        errors = []
        for candidate in inner:
            try:
                return _convert(candidate, value, key, base_dir)
            except ConfigError as err:
                errors.append(str(err))
        _fail(key, f"expected {' or '.join(_type_name(a) for a in inner)} "
                   f"(got {_describe(value)})")

    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            _fail(key, f"must be one of {choices} (got {_describe(value)})")
        return value

    if origin is list:
        if not isinstance(value, list):
            _fail(key, f"expected a list (got {_describe(value)})")
        return [_convert(args[0], v, f"{key}[{i}]", base_dir) for i, v in enumerate(value)]

    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            _fail(key, f"expected a list of {len(args)} values (got {_describe(value)})")
        return tuple(_convert(a, v, f"{key}[{i}]", base_dir)
                     for i, (a, v) in enumerate(zip(args, value)))

    if origin is dict:
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping (got {_describe(value)})")
        return {str(k): _convert(args[1], v, f"{key}.{k}", base_dir) for k, v in value.items()}

    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, base_dir)

    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false (got {_describe(value)})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected an integer (got {_describe(value)})")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str):
                try:
                    hint = f"; write it unquoted, e.g. {float(value)!r}"
                except ValueError:
                    pass
            _fail(key, f"expected a number (got {_describe(value)}){hint}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            _fail(key, f"must be a finite number (got {_describe(value)}); write a number such "
                       f"as 10 or 1.0e-5")
        return number
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(key, f"expected a string (got {_describe(value)})")
        return str(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            _fail(key, f"expected a path (got {_describe(value)})")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base_dir / path).resolve()
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a schema bug, not user input


def _check_bounds(field: dataclasses.Field, value: Any, key: str, raw: Any) -> None:
    meta = field.metadata
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    checks = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
              "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for bound, (symbol, holds) in checks.items():
            if bound in meta and not holds(v, meta[bound]):
                limit = meta[bound]
                shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
                fix = "a larger" if bound in ("gt", "ge") else "a smaller"
                _fail(key, f"must be {symbol} {shown} (got {_describe(raw)}); use {fix} value")
        if isinstance(v, int) and abs(v) > MAX_INT:
            _fail(key, f"is far too large (got {v}); use a value below 2**63")


def _build(cls: type[T], data: Any, prefix: str, base_dir: Path) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail(prefix, f"expected a mapping (got {_describe(data)})")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            key = f"{prefix}.{name}" if prefix else str(name)
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"did you mean '{close[0]}'?" if close else \
                f"known keys: {', '.join(sorted(fields))}"
            _fail(key, f"unknown key ({hint}); fix or remove it")
    kwargs = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                key = f"{prefix}.{name}" if prefix else name
                _fail(key, "is required but missing")
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _convert(hints[name], data[name], key, base_dir)
        _check_bounds(field, value, key, data[name])
        kwargs[name] = value
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        problem = validate()
        if problem:
            where, message = problem
            _fail(f"{prefix}.{where}" if prefix else where, message)
    return instance


def _read_yaml(path: Path, what: str = "config file") -> Any:
    """The config's YAML, read strictly (:mod:`configs.strict_yaml`): repeated keys, an empty or
    binary file are errors; ``1e-5`` reads as a number (YAML 1.2)."""
    try:
        return read_yaml(path, what, numbers_like_yaml12=True)
    except YamlFileError as err:
        raise ConfigError(str(err)) from None


def _check_paths(obj: Any, prefix: str = "") -> None:
    """Stop on the first path field marked ``must_exist`` that is not on disk."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        key = f"{prefix}.{field.name}" if prefix else field.name
        if field.metadata.get("must_exist") and value is not None and not Path(value).exists():
            _fail(key, f"path does not exist: {value}; create it or fix the path")
        if dataclasses.is_dataclass(value):
            _check_paths(value, key)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _check_paths(item, f"{key}[{i}]")


def _within(path: Path, err: ConfigError) -> ConfigError:
    return ConfigError(f"{path}: {err}")


def _load_sites(raw_sites: Any, base_dir: Path) -> list[SiteConfig]:
    """``federation.sites`` entries are inline mappings or paths to site YAML files."""
    if raw_sites is None:
        return []
    if not isinstance(raw_sites, list):
        _fail("federation.sites", f"expected a list (got {_describe(raw_sites)})")
    sites = []
    for i, entry in enumerate(raw_sites):
        if isinstance(entry, str):
            sites.append(load_site_config(base_dir / entry, check_paths=False))
        else:
            sites.append(_build(SiteConfig, entry, f"federation.sites[{i}]", base_dir))
    return sites


def config_from_dict(data: Any, base_dir: Path | str = ".", check_paths: bool = True) -> Config:
    """Build a :class:`Config` from already-parsed YAML. Raises :class:`ConfigError`."""
    base_dir = Path(base_dir)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        _fail("", f"the config must be a mapping of sections (got {_describe(data)}); write "
                  f"'section:' blocks as in configs/default.yaml")
    data = dict(data)
    federation = data.get("federation")
    sites: list[SiteConfig] = []
    if isinstance(federation, dict) and "sites" in federation:
        federation = dict(federation)
        sites = _load_sites(federation.pop("sites"), base_dir)
        data["federation"] = federation
    config = _build(Config, data, "", base_dir)
    config = dataclasses.replace(
        config, federation=dataclasses.replace(config.federation, sites=sites))
    problem = config.validate_sites()
    if problem:
        _fail(*problem)
    if check_paths:
        _check_paths(config)
    return config


def load_config(path: Path | str, check_paths: bool = True) -> Config:
    """Load and validate an experiment config (``configs/demo.yaml`` and friends).

    ``check_paths`` verifies that every input path the config names exists; commands
    that create those paths first (cohort generation) pass ``False``.
    """
    path = Path(path)
    data = _read_yaml(path)
    try:
        return config_from_dict(data, path.resolve().parent, check_paths)
    except ConfigError as err:
        if str(err).startswith(str(path)):
            raise
        raise _within(path, err) from None


def load_site_config(path: Path | str, check_paths: bool = True) -> SiteConfig:
    """Load a hospital's own settings (``configs/site.example.yaml``)."""
    path = Path(path)
    data = _read_yaml(path, "site config")
    try:
        site = _build(SiteConfig, data, "", path.resolve().parent)
        if check_paths:
            _check_paths(site)
        return site
    except ConfigError as err:
        if str(err).startswith(str(path)):
            raise
        raise _within(path, err) from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config (paths as strings), for YAML dumps and checkpoints."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value
    return plain(config)


def flatten_config(config: Any) -> dict[str, str]:
    """``{"privacy.target_epsilon": "10.0", ...}``: the form MLflow params take."""
    flat: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        else:
            flat[key] = str(value)
    walk(config_to_dict(config), "")
    return flat
