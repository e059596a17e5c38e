"""Strict YAML reading for every file a user writes: configs, site configs, sweep files, manifests.

PyYAML's ``safe_load`` lets a repeated key silently win (a second ``privacy:`` block replaces the
first), reads an empty file as ``None``, and reads ``1e-5`` as the STRING "1e-5" (YAML 1.1 wants
``1.0e-5``). :func:`read_yaml` refuses repeated keys (at any depth) and empty documents, gives one
line for a missing, binary or non-UTF-8 file, and, with ``numbers_like_yaml12``, reads ``1e-5`` as
the number it looks like (YAML 1.2's rule). Every problem is a :class:`YamlFileError` whose message
is one line: ``<file>: line N: <problem>; <fix>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

# Largest file a user-written YAML may be: configs, sweeps and manifests are far below this.
MAX_YAML_BYTES = 64 * 1024 * 1024

# YAML 1.2's float forms that YAML 1.1 reads as strings (no dot: "1e-5", "2E3").
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class YamlFileError(ValueError):
    """A YAML file that cannot be read strictly. One line: ``<file>: <problem>; <fix>``."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" may override the merged keys; that is its purpose
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: construct_mapping reports it below
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first at line {first}); keep one "
                                f"(a repeated key would silently replace the first)",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _StrictYaml12NumbersLoader(_StrictLoader):
    """:class:`_StrictLoader` that also reads ``1e-5`` as a number, as YAML 1.2 does."""


_StrictYaml12NumbersLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789"))


def _text(path: Path, what: str) -> str:
    if not path.exists():
        raise YamlFileError(f"{path}: {what} not found; check the path")
    if path.is_dir():
        raise YamlFileError(f"{path}: is a folder, not a {what}; name the YAML file")
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise YamlFileError(f"{path}: {size} bytes is far too large for a {what}; "
                                f"name the right file")
        raw = path.read_bytes()
    except OSError as err:
        raise YamlFileError(f"{path}: cannot read the {what} ({err.strerror}); "
                            f"check its permissions") from None
    if b"\x00" in raw:
        raise YamlFileError(f"{path}: is a binary file, not a YAML {what}; name the YAML file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise YamlFileError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                            f"save the {what} as UTF-8") from None


def read_yaml(path: Path | str, what: str = "YAML file", *, allow_empty: bool = False,
              numbers_like_yaml12: bool = False) -> Any:
    """The one YAML document in ``path``, read strictly (see the module docstring)."""
    path = Path(path)
    text = _text(path, what)
    loader = _StrictYaml12NumbersLoader if numbers_like_yaml12 else _StrictLoader
    try:
        documents = list(yaml.load_all(text, Loader=loader))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        fix = "" if "; " in problem else "; fix the YAML syntax"
        raise YamlFileError(f"{path}:{where} {problem}{fix}") from None
    except RecursionError:
        raise YamlFileError(f"{path}: nested too deeply to be a {what}; "
                            f"name the right file") from None
    if len(documents) > 1:
        raise YamlFileError(f"{path}: holds {len(documents)} YAML documents (separated by "
                            f"'---'); a {what} is one document, keep one")
    data = documents[0] if documents else None
    if data is None and not allow_empty:
        raise YamlFileError(f"{path}: the {what} is empty; write its settings "
                            f"(see configs/default.yaml) or name the right file")
    return data
