"""YAML read as ``yaml.safe_load`` reads it, except that a key named twice in one mapping is an error.

Job files and ``--storage-option`` values are read here, so a repeated key never silently takes the last value.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names one key twice: YAML loaders keep the last value without a word."""

    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"key {key!r} appears twice (lines {first} and {second}); keep one")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping naming a key twice, at any depth (``dag:`` too)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *defaults``: later keys override it
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base loader says what is wrong with it
                continue
        return super().construct_mapping(node, deep=deep)


def load_yaml(stream: Any) -> Any:
    """YAML as ``yaml.safe_load`` reads it, but a key named twice in one mapping is an error."""
    return yaml.load(stream, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
