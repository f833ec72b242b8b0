"""Guard the output: never write where the input lives, never replace a finished output unasked,
and never publish an output that holds files another tool (or a person) put there.
"""

from __future__ import annotations

import itertools
import posixpath
from collections.abc import Sequence
from typing import Any

from fsspec.core import split_protocol

from ..config import JobConfig
from ..errors import ConfigError, param
from .layout import TABLE_DATA_PATTERN, plan_path, state_folder
from .sink import listing, owned_name
from .source import GLOB_CHARS, InputFile, InputFiles
from .storage import Location, full_uri, location, overlapping, translated

#: How many foreign files a refusal names (then how many more there are).
NAMED_FOREIGN = 5


def _input_root(spec: str) -> str:
    """The folder or file an input spec covers; for a glob, the folder before its first wildcard.
    Only its spelling matters (``location`` tells where it is): no filesystem is opened."""
    protocol, path = split_protocol(spec)
    if any(ch in path for ch in GLOB_CHARS):
        head = path[: min(path.index(ch) for ch in GLOB_CHARS if ch in path)]
        path = head.rsplit("/", 1)[0] if "/" in head else ""
    return f"{protocol}://{path}" if protocol else path


def guard_output(config: JobConfig, where: Location, files: Sequence[InputFile]) -> None:
    """Never write where the input lives; never replace a finished output unless asked to."""
    output, fs, path = where.uri, where.fs, where.path  # the output
    guard_overlap(config, output, files.uris if isinstance(files, InputFiles) else [f.uri for f in files])
    data_folder = TABLE_DATA_PATTERN.match(posixpath.basename(path.rstrip("/"))) is not None
    if config.output_format != "parquet" and not data_folder:
        if fs.exists(path) and not fs.isdir(path):  # a table: its own data folders are guarded one by one
            raise ConfigError(f"output {output} exists and is a file")
        return
    if fs.exists(path):
        if not fs.isdir(path):
            raise ConfigError(f"output {output} exists and is a file")
        leftovers = listing(fs, path)
        # A table's data folder is its plan's alone: what is there is an uncommitted attempt's.
        if leftovers and not config.overwrite and not data_folder:
            raise ConfigError(
                f"output {output} already exists ({len(leftovers)} entries, e.g. {leftovers[0]}); "
                f"pass {param('overwrite')} to replace it"
            )
        if leftovers:
            refuse_foreign(fs, path, output)


def foreign_files(fs: Any, path: str) -> list[str]:
    """Everything under the output folder ``path`` that batchscore does not write, relative to it.

    Readers read a folder whole: pandas and pyarrow every file whose name does not start with
    ``.`` or ``_``, in subfolders too; Spark files without a ``.parquet`` suffix; DuckDB and Polars
    globs hidden files as well. So anything but batchscore's own names (see ``sink.owned_name``)
    counts, at any depth, whatever its name: files by name, a folder by its own name when empty.
    """
    fs.invalidate_cache(path)
    root = path.rstrip("/")
    with translated("list", full_uri(fs, path)):
        found = fs.find(root, withdirs=True, detail=True)
    entries = {}
    for name, info in found.items():
        rel = name.rstrip("/")[len(root) :].lstrip("/")
        if rel:
            entries[rel] = info.get("type") == "directory"
    files = [rel for rel, is_dir in entries.items() if not is_dir]
    foreign = [rel for rel in files if not owned_name(rel)]
    empty_dirs = [
        rel + "/" for rel, is_dir in entries.items() if is_dir and not any(f.startswith(rel + "/") for f in files)
    ]
    return sorted(foreign + empty_dirs)


def refuse_foreign(fs: Any, path: str, output: str) -> None:
    """Exit 2, naming them, when the output folder holds files batchscore did not write: replacing
    an output never deletes someone else's files, and never publishes them as this run's rows."""
    foreign = foreign_files(fs, path)
    if not foreign:
        return
    named = ", ".join(foreign[:NAMED_FOREIGN])
    more = f" and {len(foreign) - NAMED_FOREIGN} more" if len(foreign) > NAMED_FOREIGN else ""
    raise ConfigError(
        f"output {output} holds {len(foreign)} file(s) batchscore did not write, which readers of the folder "
        f"would read as rows: {named}{more}; {param('overwrite')} replaces only batchscore's own parts, so move or delete "
        f"them (or write to another folder) and run again"
    )


def guard_overlap(config: JobConfig, output: str, input_uris: Sequence[str]) -> None:
    """Refuse an output (or its state folder, or a compiled cache the job may write) equal to,
    inside, or holding any input: the input is never at risk; and a compiled cache overlapping the
    output, where readers would meet the libraries.

    Locations are compared, not spellings: ``out/../data``, ``data/./``, a symlink to the input
    folder, ``file://`` and relative paths all resolve to where they really are, and so does each
    input file (which may itself be a symlink into the output).
    """
    written = [
        (f"output {output}", location(output)),
        (f"output {output}'s state folder", location(state_folder(output))),
    ]
    cache = None
    if config.engine != "sklearn" and config.compiled_cache:  # libraries are written there too
        cache = (f"compiled_cache {config.compiled_cache}", location(config.compiled_cache))
    roots = [(spec, location(_input_root(spec))) for spec in config.input]
    targets = written + ([cache] if cache else [])
    # Each file's location is found, checked and let go: 100,000 files are never 100,000 locations held.
    for name, where in itertools.chain(roots, ((uri, location(uri)) for uri in input_uris)):
        for what, out in targets:
            if overlapping(where, out):
                raise ConfigError(
                    f"{what} (at {out}) overlaps input {name} (at {where}): refusing to write where the input lives"
                )
    if cache:
        for name, out in written:
            if overlapping(cache[1], out):
                raise ConfigError(
                    f"{cache[0]} (at {cache[1]}) overlaps {name} (at {out}): readers would see the libraries"
                )


def guard_plan_file(output: str, out: str) -> None:
    """A plan written into the output folder would be read as data (Polars refuses the folder)."""
    if overlapping(location(out), location(output)):
        raise ConfigError(
            f"plan {param('out')} {out} is inside output {output}, where readers would see it; "
            f"write it to {plan_path(output)}"
        )
