"""The reference tables of ``docs/``, rendered from the declarations they describe.

Each page runs these functions in its own cog blocks (``make docs`` regenerates them, ``cog --check``
tells whether a page is stale), so a setting, option, exit code or metric is documented where it is
declared. Nothing here is used at run time.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from . import schema
from .config import COMMAND_FIELDS, CONFIG_KEYS, FIELDS, IGNORED_SECTIONS, TEXT_KEYS
from .errors import EXIT_CODES

#: What a table shows for a default that is nothing at all.
NOTHING = "none"


def table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """A Markdown table; a ``|`` inside a cell is escaped so that it stays one cell."""
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _section(info: FieldInfo) -> type[BaseModel] | None:
    """The nested section a setting holds (``dag.sensor``), or the section each item of a list is."""
    kind = schema._plain_type(info.annotation)
    if typing.get_origin(kind) is tuple:
        kind = schema._plain_type(typing.get_args(kind)[0])
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def value(info: FieldInfo) -> str:
    """What a setting takes, with its bounds: the words a bad value's error uses."""
    section = _section(info)
    if section is not None:
        if typing.get_origin(schema._plain_type(info.annotation)) is tuple:
            return "a list of mappings"
        return "true, false or a mapping" if info.default is None else "a mapping"  # a section that may be off
    return schema.expectation(info)


def default(info: FieldInfo) -> str:
    """The default as ``--help`` shows it, or what it means when the value itself says little."""
    shown = schema.shown_default(info)
    if info.is_required():
        return "required"
    if shown is None:
        return schema.flag_text(info.get_default()) if isinstance(info.get_default(), bool) else NOTHING
    if isinstance(info.get_default(), str) and "shown" not in schema.extra(info):
        return f"`{shown}`"
    return shown


def settings_rows(fields: Mapping[str, FieldInfo], with_flags: bool) -> list[list[str]]:
    """One row per setting: key, (flag,) what it takes, default, meaning."""
    rows = []
    for key, info in fields.items():
        cells = [f"`{key}`"]
        if with_flags:
            metavar = schema.extra(info).get("metavar")
            repeat = " (repeatable)" if schema._repeated(info) else ""
            cells.append(f"`{schema.flag_of(key, info)}{' ' + metavar if metavar else ''}`{repeat}")
        cells += [value(info), default(info), info.description or ""]
        rows.append(cells)
    return rows


def job_keys() -> str:
    """Every job key (``JobConfig``), with its flag, and the sections the scorer leaves to others."""
    sections = [
        [f"`{key}`", NOTHING, "a mapping", NOTHING, f"{text} See [Airflow](airflow.md#the-dag-section)."]
        for key, text in IGNORED_SECTIONS.items()
    ]
    return table(["key", "flag", "value", "default", "meaning"], settings_rows(FIELDS, True) + sections)


def bounds() -> str:
    """Every number a job key or a command flag takes: its largest value and why it is that."""
    rows = [
        [f"`{key}`", schema._number(schema.upper_bound(info)), schema.extra(info)["why"]]
        for key, info in FIELDS.items()
        if schema.is_number(info)
    ]
    rows += [
        [f"`{schema.flag_of(key, info)}`", schema._number(schema.upper_bound(info)), schema.extra(info)["why"]]
        for key, info in COMMAND_FIELDS.items()
    ]
    return table(["setting", "at most", "why"], rows)


def words(items: Iterable[str]) -> str:
    """``a``, ``b`` and ``c``, each as code."""
    items = [f"`{item}`" for item in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def text_keys() -> str:
    """The keys whose values must be text (YAML must not read them as numbers)."""
    return words(TEXT_KEYS)


def dag_keys() -> str:
    """Every ``dag:`` key (``DagSpec``), then the keys of each of its nested sections."""
    from .orchestration.dagspec import DAG_FIELDS

    out = [table(["key", "value", "default", "meaning"], settings_rows(DAG_FIELDS, False))]
    for key, info in DAG_FIELDS.items():
        section = _section(info)
        if section is not None:
            item = "[]" if value(info).startswith("a list") else ""
            out += [
                f"\n`dag.{key}{item}`:\n\n",
                table(["key", "value", "default", "meaning"], settings_rows(section.model_fields, False)),
            ]
    return "".join(out)


def exit_codes() -> str:
    return table(["code", "meaning"], [[str(code), meaning] for code, meaning in EXIT_CODES.items()])


def _job_key(param: Any) -> str | None:
    """The job key an option is the flag of (its help is the key's), or None for a command's own."""
    info = FIELDS.get(param.name or "")
    return param.name if info is not None and (param.help or "").startswith(info.description or "") else None


def commands() -> str:
    """Each command's usage, help and own options, as ``batchscore COMMAND --help`` gives them."""
    import inspect

    import click

    from .cli import main

    out = []
    root = click.Context(main, info_name="batchscore")
    for name, command in main.commands.items():
        ctx = click.Context(command, info_name=name, parent=root)
        out.append(
            f"### `batchscore {name}`\n\n```\n{command.get_usage(ctx)}\n```\n\n"
            f"{inspect.cleandoc(command.help or '')}\n\n"
        )
        rows, keys = [], []
        for param in command.get_params(ctx):
            if not isinstance(param, click.Option) or "--help" in param.opts:
                continue
            if _job_key(param):
                keys.append(param.name)
                continue
            flag, help_text = param.get_help_record(ctx) or ("", "")
            rows.append([f"`{flag}`", help_text])
        if rows:
            out.append(table(["option", "meaning"], rows) + "\n")
        if set(keys) == set(CONFIG_KEYS):
            out.append("And every job key's flag (see [Configuration](configuration.md#keys)).\n\n")
        elif keys:
            flags = [f"`{schema.flag_of(key, FIELDS[key])}`" for key in keys]
            out.append(
                f"And the flags of the job keys {', '.join(flags)} (see [Configuration](configuration.md#keys)).\n\n"
            )
    return "".join(out).rstrip("\n") + "\n"


def metrics() -> str:
    """Every metric a command pushes (``metrics.METRICS``)."""
    from .observe.metrics import BATCH_SECONDS_BUCKETS, METRICS

    rows = []
    for metric in METRICS.values():
        name = metric.name + ("_total" if metric.kind == "counter" else "")
        labels = "{" + ",".join(metric.labels) + "}" if metric.labels else ""
        meaning = metric.help
        if metric.kind == "histogram":
            meaning += f" Buckets (seconds): {', '.join(map(schema._number, BATCH_SECONDS_BUCKETS))}."
        rows.append([f"`{name}{labels}`", metric.kind, meaning])
    return table(["metric", "type", "meaning"], rows)
