"""Exception types and the exit codes they map to: the one source of truth for both."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_MODEL = 4
EXIT_DRIFT = 5


class ExitCode(NamedTuple):
    """One exit code: what it is in a few words, what causes it, and whether running the same
    command again can end otherwise (a scheduler retries only those)."""

    summary: str
    causes: str
    retry_can_fix: bool


#: Every exit code, declared once: ``--help``, docs/commands.md and the DAG's retry policy come from here.
EXITS: dict[int, ExitCode] = {
    EXIT_OK: ExitCode(
        "success",
        "the output is committed (_SUCCESS written), also when a challenger failed (unless challengers_required: "
        "the report and metrics say which and why)",
        False,
    ),
    EXIT_FAILURE: ExitCode(
        "anything else",
        "storage failure (an input folder or file that cannot be listed or read), a model registry that is down "
        "or does not answer (a challenger's too, under challengers_required), interrupted run, internal error",
        True,
    ),
    EXIT_USAGE: ExitCode(
        "usage or configuration error",
        "bad flag or YAML key, output exists, output holds files "
        "batchscore did not write, output overlaps the input, output held by another job",
        False,
    ),
    EXIT_INPUT: ExitCode(
        "input data invalid",
        "no file matched, an input entry that is not a regular file (FIFO, "
        "socket, device, folder named *.parquet or matched by a glob, broken symlink, symlink loop), "
        "unreadable Parquet, missing or non-numeric feature column, a column missing, extra or of "
        "another type than in the first file, invalid feature values, input changed since the plan, "
        "plan or receipts inconsistent",
        False,
    ),
    EXIT_MODEL: ExitCode(
        "model error",
        "artifact missing, not loadable, not fitted, feature mismatch, "
        "sha256 not as pinned or planned, untrusted type, pickle refused, a registry model, version, alias "
        "or run that does not exist, an MLflow flavour other than scikit-learn, a challenger failed under "
        "challengers_required",
        False,
    ),
    EXIT_DRIFT: ExitCode(
        "drift above threshold (--drift-fail)",
        "parts and report written, _SUCCESS not; review the report, then commit with --accept-drift",
        False,
    ),
}

#: Exit code -> meaning, rendered into ``--help`` and docs/commands.md.
EXIT_CODES: dict[int, str] = {code: f"{exit.summary}: {exit.causes}" for code, exit in EXITS.items()}

#: The failures no retry can fix (bad settings, data or model; drift held for review), with their summary:
#: a scheduler fails these at once instead of using up its retries.
PERMANENT_EXIT_CODES: dict[int, str] = {
    code: exit.summary for code, exit in EXITS.items() if code != EXIT_OK and not exit.retry_can_fix
}


#: How a message marks the name of a parameter or setting (see ``param``).
_PARAM = re.compile("\x02([A-Za-z_][A-Za-z0-9_]*)\x03")


def param(name: str) -> str:
    """A parameter or setting named in an error message: the library says ``name`` as Python spells
    it (``max_invalid_fraction``, ``plan``), the CLI says its flag (``--max-invalid-fraction``)."""
    return f"\x02{name}\x03"


def render(text: str, name: Callable[[str], str]) -> str:
    """``text`` with each ``param`` marker replaced by ``name(parameter)``."""
    return _PARAM.sub(lambda match: name(match.group(1)), text)


class BatchscoreError(Exception):
    """Base of every error a user can cause; ``exit_code`` tells the CLI how to exit.

    ``str()`` names parameters as the library's caller passed them; ``render`` names them otherwise
    (the CLI, as flags)."""

    exit_code = EXIT_FAILURE

    def __str__(self) -> str:
        return self.render(lambda name: name)

    def render(self, name: Callable[[str], str]) -> str:
        return render(super().__str__(), name)


class ConfigError(BatchscoreError):
    """The job's settings are wrong or refer to an output we must not touch."""

    exit_code = EXIT_USAGE


class InputDataError(BatchscoreError):
    """The input (files, schema, values) or the plan/receipts describing it are unusable."""

    exit_code = EXIT_INPUT


class ModelError(BatchscoreError):
    """The model or scaler artifact cannot be used to score."""

    exit_code = EXIT_MODEL


class StorageError(BatchscoreError):
    """Reading or writing storage failed for reasons outside the data itself."""

    exit_code = EXIT_FAILURE


class StorageUnreachableError(StorageError):
    """Storage did not answer (refused, timed out): further calls to it would only wait too."""


class DriftError(BatchscoreError):
    """Tonight's distributions moved further from the reference's than ``--drift-fail`` allows."""

    exit_code = EXIT_DRIFT


#: How the message of ``NothingToScore`` begins: what the CLI prints, and a DAG's plan task reads.
NOTHING_NEW = "nothing new to score"


class NothingToScore(Exception):
    """An incremental job that finds no input file to score: it commits nothing, and the command
    exits 0 saying so (not a failure: the output is up to date)."""
