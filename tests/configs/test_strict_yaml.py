"""Strict YAML reading (configs/strict_yaml.py): what PyYAML's safe_load lets through."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from configs.strict_yaml import YamlFileError, read_yaml


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "file.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("text, where", [
    ("a: 1\nb: 2\na: 3\n", "line 3: key 'a' appears twice (first at line 1)"),
    ("outer:\n  x: 1\n  x: 2\n", "line 3: key 'x' appears twice"),
    ("{a: 1, a: 2}\n", "key 'a' appears twice"),
    ("- {p: 1, p: 1}\n", "key 'p' appears twice"),
])
def test_a_repeated_key_is_an_error_at_any_depth(tmp_path, text, where):
    with pytest.raises(YamlFileError, match=re.escape(where)):
        read_yaml(write(tmp_path, text))


def test_a_merge_key_may_be_overridden(tmp_path):
    text = "base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  x: 3\n"
    assert read_yaml(write(tmp_path, text))["use"] == {"x": 3, "y": 2}


@pytest.mark.parametrize("content, message", [
    ("", "is empty"), ("# only a comment\n", "is empty"),
    (b"\x00\x01binary", "binary file"), ("a: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    ("a: 1\n---\na: 2\n", "2 YAML documents"), ("a: [1, 2\n", "line"),
])
def test_unusable_files_are_one_line(tmp_path, content, message):
    with pytest.raises(YamlFileError, match=message) as caught:
        read_yaml(write(tmp_path, content))
    assert "\n" not in str(caught.value) and "; " in str(caught.value)


def test_empty_is_allowed_only_when_asked(tmp_path):
    assert read_yaml(write(tmp_path, ""), allow_empty=True) is None


def test_exponent_without_dot_is_a_number_only_in_yaml12_mode(tmp_path):
    path = write(tmp_path, "delta: 1e-5\nbig: 2E3\nid: 1e5x\nquoted: '1e-5'\n")
    assert read_yaml(path, numbers_like_yaml12=True) == {
        "delta": 1e-5, "big": 2000.0, "id": "1e5x", "quoted": "1e-5"}
    assert read_yaml(path)["delta"] == "1e-5"   # manifests keep their text as written


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(YamlFileError, match="not found"):
        read_yaml(tmp_path / "absent.yaml")
    with pytest.raises(YamlFileError, match="is a folder"):
        read_yaml(tmp_path)
