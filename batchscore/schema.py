"""Settings declared once, as pydantic fields, and everything derived from that declaration.

A setting is a field with a type, a default, a help text and its constraints (see :func:`setting`).
From the fields come the command-line options, the argv that re-creates a job on another machine,
the tables of docs/ (see reference.py) and the error a bad value gets, worded like scikit-learn's
checks: the setting, what it must be, and what was given ("setting 'batch_size' must be a positive
integer, got -3").

Importing this module loads pydantic and nothing heavy: the DAG files import it at parse time.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, Literal, Union

import annotated_types
from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    metavar: str | None = None,
    repeat: bool = False,
    csv: bool = False,
    switch: bool | None = None,
    shown: str | None = None,
    unit: str | None = None,
    envvar: str | None = None,
    why: str | None = None,
    **constraints: Any,
) -> Any:
    """Declare one setting: its default, help and constraints (``ge``, ``le``, ``gt`` ...).

    ``flag`` names the option when it is not ``--the-key``; ``repeat`` makes it repeatable (one value
    per flag); ``csv`` takes a comma-separated list; ``switch`` makes it a flag without a value that
    sets the setting to that value (``--no-pickle`` sets ``allow_pickle`` to False); ``shown`` is the
    default as documented when the value itself says little (``None`` meaning "all cores");
    ``unit`` words the expected value ("a number of seconds"); ``envvar`` is an environment variable
    the flag falls back on (it wins over the YAML key, as the flag does). ``why`` says why a number's
    bounds are what they are: every number has an upper bound (``le``/``lt``), and a value past it
    is refused with this reason (see :func:`unbounded`).
    """
    faces: dict[str, Any] = {
        "flag": flag,
        "metavar": metavar,
        "repeat": repeat or None,
        "csv": csv or None,
        "switch": switch,
        "shown": shown,
        "unit": unit,
        "envvar": envvar,
        "why": why,
    }
    faces = {key: value for key, value in faces.items() if value is not None}
    if isinstance(default, dict):
        return Field(default_factory=dict, description=help, json_schema_extra=faces, **constraints)
    return Field(default, description=help, json_schema_extra=faces, **constraints)


def extra(info: FieldInfo) -> dict[str, Any]:
    """What :func:`setting` recorded about a field's faces (flag, metavar, repeat ...)."""
    return dict(info.json_schema_extra or {}) if isinstance(info.json_schema_extra, dict) else {}


def _plain_type(annotation: Any) -> Any:
    """The type a setting holds, without ``| None`` and ``Annotated``."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return _plain_type(rest[0])
    return annotation


def choices(info: FieldInfo) -> tuple[str, ...] | None:
    kind = _plain_type(info.annotation)
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def _bounds(info: FieldInfo) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in info.metadata:
        for name in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, name.capitalize())):
                found[name] = getattr(item, name)
    return found


def is_number(info: FieldInfo) -> bool:
    """Whether a setting holds a number (an int or a float, not a bool)."""
    return _plain_type(info.annotation) in (int, float)


def upper_bound(info: FieldInfo) -> Any:
    """A number setting's largest value (``le``, or ``lt`` when the bound itself is excluded); None if none."""
    bounds = _bounds(info)
    return bounds.get("le", bounds.get("lt"))


def unbounded(fields: Mapping[str, FieldInfo]) -> list[str]:
    """The number settings without an upper bound, or without the reason for it (``why``).

    A typo like ``--batch-size 99999999999999999999999`` must be a one-line usage error, not a
    traceback from deep inside the job: every number gets a bound, and the bound a reason.
    """
    return [
        key
        for key, info in fields.items()
        if is_number(info) and (upper_bound(info) is None or not extra(info).get("why"))
    ]


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expectation(info: FieldInfo) -> str:
    """What a setting's value must be, in words, from its type and constraints."""
    kind = _plain_type(info.annotation)
    options = choices(info)
    if options:
        return "one of " + ", ".join(map(str, options))
    if kind is bool:
        return "true or false"
    bounds = _bounds(info)
    low, high = bounds.get("ge", bounds.get("gt")), bounds.get("le", bounds.get("lt"))
    if kind in (int, float):
        word = ("an integer" if kind is int else "a number") + (
            f" of {extra(info)['unit']}" if "unit" in extra(info) else ""
        )
        if low is not None and high is not None:
            return f"{word} from {_number(low)} to {_number(high)}"
        if high is not None:
            return f"{word}, at most {_number(high)}"
        return f"{word}, at least {_number(low)}" if low is not None else word
    origin = typing.get_origin(kind)
    if origin is tuple:
        return "a string or a list of strings" if typing.get_args(kind)[0] is str else "a list"
    if kind is dict or origin in (dict, Mapping):
        return "a mapping"
    if kind is datetime:
        return "a date like 2024-06-01"
    return "text" if kind is str else f"a {getattr(kind, '__name__', kind)}"


def _field_at(fields: Mapping[str, FieldInfo], loc: tuple[Any, ...]) -> FieldInfo | None:
    """The field a pydantic error location names, inside nested sections too (``sensor.timeout``)."""
    info = None
    for step in loc:
        if isinstance(step, int):  # an item of a list of sections
            continue
        if info is not None:
            kind = _plain_type(info.annotation)
            if typing.get_origin(kind) is tuple:
                kind = _plain_type(typing.get_args(kind)[0])
            fields = getattr(kind, "model_fields", None) or getattr(kind, "__pydantic_fields__", None) or {}
        info = fields.get(str(step))
        if info is None:
            return None
    return info


def explain(
    exc: ValidationError,
    fields: Mapping[str, FieldInfo],
    name: Callable[[tuple[Any, ...]], str],
    where: Callable[[str], str] = lambda key: "",
) -> str:
    """One sentence per invalid value of a pydantic error, naming each setting with ``name(loc)``,
    after ``where(key)`` (e.g. the file it was written in).

    A validator's own ``ValueError`` is already a sentence naming its setting and is kept as it is.
    """
    sentences: list[str] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = str(loc[0]) if loc else ""
        if error["type"] == "value_error":
            sentences.append(where(key) + str(error["ctx"]["error"]))
        elif error["type"] == "missing":
            sentences.append(f"{where(key)}{name(loc)} is required")
        elif error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            sentences.append(f"{where(key)}{name(loc)} is not a known setting")
        else:
            info = _field_at(fields, loc)
            expected = expectation(info) if info is not None else error["msg"][0].lower() + error["msg"][1:]
            if expected.startswith("input should be "):
                expected = expected[len("input should be ") :]
            if error["type"] in ("less_than_equal", "less_than") and info is not None and extra(info).get("why"):
                expected += f" ({extra(info)['why']})"
            sentences.append(f"{where(key)}{name(loc)} must be {expected}, got {error['input']!r}")
    return "; ".join(dict.fromkeys(sentences))


# --------------------------------------------------------------------------- faces of the declaration


def flag_of(key: str, info: FieldInfo) -> str:
    return extra(info).get("flag") or "--" + key.replace("_", "-")


def is_mapping(info: FieldInfo) -> bool:
    kind = _plain_type(info.annotation)
    return kind is dict or typing.get_origin(kind) in (dict, Mapping)


def _repeated(info: FieldInfo) -> bool:
    return bool(extra(info).get("repeat")) or is_mapping(info)


def shown_default(info: FieldInfo) -> str | None:
    """The default as the docs and ``--help`` show it; None when there is nothing to say. A setting
    that falls back on an environment variable shows that variable, unless ``shown`` says more."""
    if "shown" in extra(info):
        return extra(info)["shown"]
    if "envvar" in extra(info):
        return "$" + extra(info)["envvar"]
    default = info.get_default(call_default_factory=True)
    if default in (None, (), {}) or isinstance(default, bool):
        return None
    return _number(default)


def click_options(fields: Mapping[str, FieldInfo], keys: Iterable[str]) -> list[Callable[[Any], Any]]:
    """One click option per setting, with the key itself as the parameter name; none has a default,
    so a flag left out is ``None`` and the YAML file's value (or the declared default) stands."""
    import click

    options = []
    for key in keys:
        info = fields[key]
        default = shown_default(info)
        help_text = (info.description or "") + (" Repeatable." if _repeated(info) else "")
        help_text += f" [default: {default}]" if default and default != "required" else ""
        kwargs: dict[str, Any] = {"help": help_text, "metavar": extra(info).get("metavar")}
        if "envvar" in extra(info):
            kwargs.update(envvar=extra(info)["envvar"], show_envvar=True)
        kind = _plain_type(info.annotation)
        if "switch" in extra(info):
            kwargs.update(is_flag=True, default=None)
        elif _repeated(info):
            kwargs.update(multiple=True)
        elif allowed := choices(info):
            kwargs.update(type=click.Choice(allowed))
        elif kind in (int, float):
            kwargs.update(type=kind)
        options.append(click.option(flag_of(key, info), key, **kwargs))
    return options


def parse_pairs(values: Iterable[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` flags as a mapping; each value is read as YAML reads it (``true``, 3, text)."""
    import yaml

    from .errors import ConfigError
    from .strict_yaml import load_yaml

    pairs: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} takes key=value, got {item!r}")
        if key in pairs:
            raise ConfigError(f"{flag} gives {key!r} twice ({key}={pairs[key]!r} and {item!r}); keep one")
        try:
            pairs[key] = load_yaml(value) if value else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{flag} {item!r}: the value is not valid YAML: {str(exc).splitlines()[0]}") from None
    return pairs


def from_click(fields: Mapping[str, FieldInfo], keys: Iterable[str], kw: dict[str, Any]) -> dict[str, Any]:
    """Pop the options of ``keys`` out of a command's keyword arguments, as settings (None: not given)."""
    settings: dict[str, Any] = {}
    for key in keys:
        info, value = fields[key], kw.pop(key)
        if "switch" in extra(info):
            value = extra(info)["switch"] if value else None
        elif is_mapping(info):
            value = parse_pairs(value, flag_of(key, info))
        settings[key] = value
    return settings


def flag_text(value: Any) -> str:
    """A value as the command line spells it (YAML's booleans as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "flag_text"):  # a structured item (a challenger) spells itself
        return str(value.flag_text())
    return str(value)


def to_argv(fields: Mapping[str, FieldInfo], values: Mapping[str, Any]) -> list[str]:
    """The flags that give a command these settings, in declaration order."""
    argv: list[str] = []
    for key, info in fields.items():
        value = values.get(key)
        if value is None or value in ((), {}):
            continue
        flag = flag_of(key, info)
        if "switch" in extra(info):
            argv += [flag] if value == extra(info)["switch"] else []
        elif is_mapping(info):
            for name, item in value.items():
                argv += [flag, f"{name}={flag_text(item)}"]
        elif extra(info).get("repeat"):
            for item in value:
                argv += [flag, flag_text(item)]
        elif extra(info).get("csv"):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, flag_text(value)]
    return argv
