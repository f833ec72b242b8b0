"""Prepare a job: load its model, read its inputs' footers and check every schema, writing nothing."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from ..config import DEFAULT_MODEL_VERSION, JobConfig
from ..errors import ConfigError, ModelError, param
from ..io.layout import check_output
from ..io.source import InputFiles, iter_footers, list_inputs
from ..io.storage import Location, resolve
from ..io.validation import SchemaContract, is_numeric
from ..models.artifacts import ArtifactPolicy, LoadedModel, load_model, load_model_kept
from ..models.challengers import Challenger, load_challengers
from ..models.engine import Predictor
from ..observe.observers import NONE, Observers


@dataclass
class Prepared:
    """A job whose model, inputs and schemas have all been checked; nothing scored yet."""

    config: JobConfig
    model: LoadedModel
    files: InputFiles  # one compact record per file, not an object each
    location: Location  # of the output, resolved once for the step
    passthrough: tuple[str, ...]
    output_schema: pa.Schema
    #: What every file must look like; each worker checks it again on the footer it opens.
    contract: SchemaContract | None = None
    #: The job's challengers, loaded or failed, in its order (see models/challengers.py).
    challengers: tuple[Challenger, ...] = ()
    #: ``challenger_output: folders``: each loaded challenger's own parts' schema, by name (in order).
    challenger_schemas: Mapping[str, pa.Schema] = field(default_factory=dict)

    @property
    def output(self) -> str:
        """The output's full URI."""
        return self.location.uri


def now() -> datetime:
    return datetime.now(timezone.utc)


def check_challenger_output(config: JobConfig) -> None:
    """Refuse challenger folders where they cannot be committed with the output: a table output
    commits its parts in one table transaction that holds no other folder."""
    if config.challenger_output == "folders" and config.output_format != "parquet":
        raise ConfigError(
            f"{param('challenger_output')} folders is not supported for {config.output_format} outputs; give "
            f"{param('challenger_output')} columns (each challenger adds its own columns)"
        )


def output_location(config: JobConfig) -> Location:
    """Where the job writes, resolved once for the step that asks."""
    check_challenger_output(config)
    output = resolve(config.require("output"), config.storage)
    check_output(output.uri, table=config.output_format != "parquet")  # its state goes beside it: a root has no beside
    return output


def versioned(config: JobConfig, artifacts: Sequence[Mapping[str, Any]]) -> JobConfig:
    """The job with its registry model's version as ``model_version`` when it gives none: rows and
    manifest then name the version scored, not the alias (``artifacts`` as a plan records them)."""
    model = next((a for a in artifacts if a["role"] == "model"), None)
    version = ((model or {}).get("registry") or {}).get("version")
    if version and config.model_version == DEFAULT_MODEL_VERSION:
        return replace(config, model_version=str(version))
    return config


def normalize_output(config: JobConfig) -> str:
    return output_location(config).uri


def prepare(
    config: JobConfig,
    input_uris: Sequence[str] | None = None,
    policy: ArtifactPolicy | None = None,
    observers: Observers = NONE,
    planned: tuple[Collection[str], Sequence[Mapping[str, str]] | None] | None = None,
    keep_model: bool = False,
) -> Prepared:
    """Load the model first (a bad model costs no I/O), then read footers and check every schema.

    The artifacts must pass ``policy`` (by default the job's pins and formats) before loading;
    ``observers`` hear how long the model took to load. ``planned`` (a shard's): the artifact roles
    and the output schema of its plan, which hold its challengers to the planned ones.
    ``keep_model`` keeps the champion's pinned artifacts loaded in this process for the next step
    that asks for them (see ``load_model_kept``).
    """
    model_uri = config.require("model")
    output = output_location(config)
    policy = policy or ArtifactPolicy.of(config)
    load = load_model_kept if keep_model else load_model
    model = load(model_uri, config.scaler, config.features, config.storage, policy)
    config = versioned(config, [a.to_dict() for a in model.artifacts])
    roles, schema = planned if planned is not None else (None, None)
    columns = {c["name"]: c["type"] for c in schema} if schema is not None else None
    challengers = load_challengers(config, policy, roles, columns)
    observers.model_loaded(model.load_seconds + sum(c.model.load_seconds for c in challengers if c.model))
    if input_uris is not None:
        uris = list(input_uris)
    elif config.incremental:  # only what the table has not scored: no footer of the rest is read
        from .incremental import incremental_inputs

        artifacts = [*model.artifacts, *(a for c in challengers if c.model is not None for a in c.model.artifacts)]
        uris = incremental_inputs(config, output, [a.to_dict()["sha256"] for a in artifacts])
    else:
        uris = list_inputs(config.input, config.storage)
    predictor_fields = list(Predictor(model, config.model_version, now()).fields)
    folders = config.challenger_output == "folders"
    files, contract = InputFiles(), None
    # Each footer is checked as it arrives and kept as a compact record: 100,000 files are never
    # 100,000 footers (or objects) held at once.
    for found in iter_footers(uris, config.storage):
        if contract is None:  # the first file fixes the contract (see SchemaContract)
            challengers = [_with_features(c, found.schema, config.challengers_required) for c in challengers]
            columned = () if folders else challengers  # challengers in folders add no column here
            features = _features(model, challengers)
            output_columns = [f.name for f in predictor_fields] + [f.name for c in columned for f in c.fields]
            contract = SchemaContract.of(found, features, config.keep, output_columns)
        contract.check(found.uri, found.schema)
        files.append(found)
    assert contract is not None  # list_inputs never returns no file
    passthrough = contract.passthrough
    # Nullable whatever the first file declares: a later file may hold nulls there, and its type is the same.
    fields = [contract.reference_schema.field(c).with_nullable(True) for c in passthrough] + predictor_fields
    fields += [f.with_nullable(True) for c in (() if folders else challengers) for f in c.fields]
    schemas = {}
    if folders:  # each as a champion-only job of that model writes it
        head = fields[: len(passthrough)]
        schemas = {
            c.name: pa.schema(head + list(Predictor(c.model, c.version, now()).fields))
            for c in challengers
            if c.model is not None
        }
    return Prepared(config, model, files, output, passthrough, pa.schema(fields), contract, tuple(challengers), schemas)


def _with_features(challenger: Challenger, schema: pa.Schema, required: bool) -> Challenger:
    """A challenger whose features the first input file lacks (or holds as non-numbers) fails, alone."""
    if challenger.model is None:
        return challenger
    names = set(schema.names)
    missing = [f for f in challenger.model.features if f not in names or not is_numeric(schema.field(f).type)]
    if not missing:
        return challenger
    error = f"challenger {challenger.name}: feature column(s) {', '.join(missing)} missing or not numeric in the input"
    if required:
        raise ModelError(f"{error} (challengers_required)")
    return challenger.failed(error)


def _features(model: LoadedModel, challengers: Sequence[Challenger]) -> tuple[str, ...]:
    """Every feature a file must give: the champion's, then each loaded challenger's others."""
    names = list(model.features)
    for c in challengers:
        names += [f for f in (c.model.features if c.model is not None else ()) if f not in names]
    return tuple(names)


def schema_dicts(schema: pa.Schema) -> list[dict[str, str]]:
    """An output schema as plans and receipts record it."""
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def schema_difference(expected: Sequence[dict[str, str]], actual: Sequence[dict[str, str]]) -> str:
    """What tells two output schemas apart, in words: ``score double != float``, ``missing x``."""
    want, have = {c["name"]: c["type"] for c in expected}, {c["name"]: c["type"] for c in actual}
    words = [f"{n} {have[n]} != {t}" for n, t in want.items() if n in have and have[n] != t]
    words += [f"missing {n}" for n in want if n not in have] + [f"extra {n}" for n in have if n not in want]
    return ", ".join(words) or "column order differs"
