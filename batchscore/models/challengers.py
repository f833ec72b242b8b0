"""Challengers: the other models of a job, loaded and checked exactly as the champion is, scored on
the same rows in the same pass, each into its own columns.

Each challenger goes through ``artifacts.load_model`` under the job's ``ArtifactPolicy`` (its own
pins, the plan's digests, ``--trust``, ``--no-pickle``), with roles of its own
(``challenger:NAME:model``): there is one loader. A challenger that cannot be loaded is recorded,
not raised, unless ``challengers_required`` says the job needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..errors import ModelError, StorageError
from .artifacts import ArtifactPolicy, LoadedModel, challenger_roles, load_model
from .engine import PREDICTED_AT, Predictor

if TYPE_CHECKING:
    from ..config import JobConfig, ModelEntry

log = logging.getLogger(__name__)

#: What joins a champion column's name to a challenger's name: ``probability__NAME``.
SEPARATOR = "__"
#: A challenger's version when its entry names none (the champion's default too).
UNVERSIONED = "unversioned"


def column_name(column: str, name: str) -> str:
    """A challenger's column: the champion's column of the same meaning, suffixed with its name."""
    return f"{column}{SEPARATOR}{name}"


@dataclass
class Challenger:
    """One challenger of a job: loaded (``model``) or failed (``error``), and the columns it writes."""

    name: str
    version: str
    model: LoadedModel | None
    error: str | None
    fields: tuple[pa.Field, ...]  # its output columns: the champion's, suffixed (no predicted_at)

    @property
    def ok(self) -> bool:
        return self.model is not None

    def failed(self, error: str) -> Challenger:
        """The same challenger, failed: its columns stay (written null) so every part has one schema."""
        return Challenger(self.name, self.version, None, error, self.fields)

    def to_dict(self) -> dict[str, Any]:
        """What a receipt and the manifest record of it: its artifacts are the plan's, each with
        what a registry URI resolved to (name, alias, version, run id, source, every file's sha256)."""
        return {
            "name": self.name,
            "model_version": self.version,
            "status": "ok" if self.ok else "failed",
            "error": self.error,
            "columns": [f.name for f in self.fields],
            "artifacts": [a.to_dict() for a in self.model.artifacts] if self.model is not None else [],
        }


def fields_of(model: LoadedModel, name: str, version: str) -> tuple[pa.Field, ...]:
    """A challenger's output columns: the champion's naming (``prediction``, ``probability`` or
    ``probability_CLASS``, ``model_version``) with ``__NAME`` after each; ``predicted_at`` is the job's."""
    fields = Predictor(model, version, datetime.now(timezone.utc)).fields
    return tuple(pa.field(column_name(f.name, name), f.type) for f in fields if f.name != PREDICTED_AT)


def registry_version(model: LoadedModel) -> str | None:
    """The registry version a model's estimator was resolved to (None for a file or a run's artifact)."""
    registry = model.artifacts[0].registry or {}
    return str(registry["version"]) if registry.get("version") else None


def _load(entry: ModelEntry, config: JobConfig, policy: ArtifactPolicy) -> LoadedModel:
    """Load a challenger through the one loader; fitted without feature names, it takes the job's ``features``."""
    roles = challenger_roles(entry.name)
    try:
        return load_model(entry.model, entry.scaler, None, config.storage, policy, roles)
    except ModelError as exc:
        if not config.features or "fitted without feature names" not in str(exc):
            raise
    return load_model(entry.model, entry.scaler, config.features, config.storage, policy, roles)


def load_challengers(
    config: JobConfig,
    policy: ArtifactPolicy,
    planned_roles: Collection[str] | None = None,
    planned_columns: Mapping[str, str] | None = None,
) -> list[Challenger]:
    """Every challenger of the job, loaded or failed, in the job's order.

    ``planned_roles`` (a shard's): the artifact roles its plan pinned; a challenger the plan does not
    name failed when the job was planned and is not tried again. ``planned_columns`` (name -> type)
    give a challenger that fails now the columns the plan promised, written null. A challenger
    whose entry names no ``model_version`` takes its registry version, as the champion does.

    A challenger required (``challengers_required``) that cannot be loaded fails the job with the
    exit code of its cause's kind: a registry or store that did not answer is exit 1 (a retry may
    pass), anything else exit 4.
    """
    found: list[Challenger] = []
    for entry in config.models:
        version = entry.model_version or UNVERSIONED
        planned_fields = tuple(
            pa.field(column, pa.type_for_alias(kind))
            for column, kind in (planned_columns or {}).items()
            if column.endswith(SEPARATOR + entry.name)
        )
        if planned_roles is not None and challenger_roles(entry.name)[0] not in planned_roles:
            found.append(
                Challenger(
                    entry.name,
                    version,
                    None,
                    f"not in the plan: {entry.model} failed to load when the job was planned (its log says why)",
                    (),
                )
            )
            continue
        try:
            model = _load(entry, config, policy)
        except Exception as exc:  # any failure to load is the challenger's, never the champion's
            message = (
                f"challenger {entry.name}: {exc if isinstance(exc, ModelError) else f'{type(exc).__name__}: {exc}'}"
            )
            if config.challengers_required:
                kind = StorageError if isinstance(exc, StorageError) else ModelError
                raise kind(f"{message} (challengers_required)") from None
            log.warning("%s; the champion's output is not affected", message)
            found.append(Challenger(entry.name, version, None, message, planned_fields))
            continue
        version = entry.model_version or registry_version(model) or UNVERSIONED
        found.append(Challenger(entry.name, version, model, None, fields_of(model, entry.name, version)))
    return found


def score_index(model: LoadedModel) -> int | None:
    """Which prediction column is a model's one score: a binary classifier's probability, a
    regressor's prediction; None for others (multiclass, or no ``predict_proba``)."""
    if not model.is_classifier:
        return 0
    return 1 if model.has_proba and len(model.classes) == 2 else None


def comparable(champion: LoadedModel, challenger: LoadedModel) -> dict[str, bool]:
    """Which agreement measures mean something for this pair: classes only between classifiers,
    differences of scores only between scores of one kind (two probabilities, two regressions)."""
    a, b = score_index(champion), score_index(challenger)
    return {
        "classes": champion.is_classifier and challenger.is_classifier,
        "delta": a is not None and b is not None and champion.is_classifier == challenger.is_classifier,
        "scores": a is not None and b is not None,
    }


def single_threaded_parts(challengers: Sequence[Challenger]) -> list[Any]:
    """The estimators and scalers of the loaded challengers (a worker sets each to one thread)."""
    return [part for c in challengers if c.model is not None for part in (c.model.estimator, c.model.scaler)]
