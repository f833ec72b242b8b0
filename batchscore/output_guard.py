"""Guard the output: never write where the input lives, never replace a finished output unasked."""

from __future__ import annotations

from typing import Sequence

from .config import JobConfig
from .errors import ConfigError
from .lease import LEASE_FILE
from .sink import PLAN_FILE, listing
from .source import GLOB_CHARS, InputFile
from .storage import filesystem, full_uri, location, overlapping


def _input_root(spec: str, config: JobConfig) -> str:
    """The folder or file an input spec covers; for a glob, the folder before its first wildcard."""
    fs, path = filesystem(spec, config.storage_options)
    path = fs._strip_protocol(path)
    if any(ch in path for ch in GLOB_CHARS):
        head = path[: min(path.index(ch) for ch in GLOB_CHARS if ch in path)]
        path = head.rsplit("/", 1)[0] if "/" in head else ""
    return full_uri(fs, path)


def guard_output(config: JobConfig, output: str, files: Sequence[InputFile]) -> None:
    """Never write where the input lives; never replace a finished output unless asked to."""
    guard_overlap(config, output, [f.uri for f in files])
    fs, path = filesystem(output, config.storage_options)
    if fs.exists(path):
        if not fs.isdir(path):
            raise ConfigError(f"output {output} exists and is a file")
        leftovers = [n for n in listing(fs, path) if n not in (PLAN_FILE, LEASE_FILE)]
        if leftovers and not config.overwrite:
            raise ConfigError(
                f"output {output} already exists ({len(leftovers)} entries, e.g. {leftovers[0]}); "
                f"pass --overwrite to replace it"
            )


def guard_overlap(config: JobConfig, output: str, input_uris: Sequence[str]) -> None:
    """Refuse an output equal to, inside, or holding any input: the input is never at risk.

    Locations are compared, not spellings: ``out/../data``, ``data/./``, a symlink to the input
    folder, ``file://`` and relative paths all resolve to where they really are, and so does each
    input file (which may itself be a symlink into the output).
    """
    out = location(output)
    inputs = [(spec, location(_input_root(spec, config))) for spec in config.input]
    inputs += [(uri, location(uri)) for uri in input_uris]
    for name, where in inputs:
        if overlapping(where, out):
            raise ConfigError(
                f"output {output} (at {out}) overlaps input {name} (at {where}): refusing to write where the input lives"
            )
