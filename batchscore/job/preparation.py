"""Prepare a job: load its model, read its inputs' footers and check every schema, writing nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from ..config import JobConfig
from ..io.layout import check_output
from ..io.source import InputFiles, iter_footers, list_inputs
from ..io.storage import Location, resolve
from ..io.validation import SchemaContract
from ..models.artifacts import ArtifactPolicy, LoadedModel, load_model, load_model_kept
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

    @property
    def output(self) -> str:
        """The output's full URI."""
        return self.location.uri


def now() -> datetime:
    return datetime.now(timezone.utc)


def output_location(config: JobConfig) -> Location:
    """Where the job writes, resolved once for the step that asks."""
    output = resolve(config.require("output"), config.storage)
    check_output(output.uri)  # its state goes beside it: a root has no beside
    return output


def normalize_output(config: JobConfig) -> str:
    return output_location(config).uri


def prepare(
    config: JobConfig,
    input_uris: Sequence[str] | None = None,
    policy: ArtifactPolicy | None = None,
    observers: Observers = NONE,
    keep_model: bool = False,
) -> Prepared:
    """Load the model first (a bad model costs no I/O), then read footers and check every schema.

    The artifacts must pass ``policy`` (by default the job's pins and formats) before loading;
    ``observers`` hear how long the model took to load. ``keep_model`` keeps pinned artifacts
    loaded in this process for the next step that asks for them (see ``load_model_kept``).
    """
    model_uri = config.require("model")
    output = output_location(config)
    policy = policy or ArtifactPolicy.of(config)
    load = load_model_kept if keep_model else load_model
    model = load(model_uri, config.scaler, config.features, config.storage, policy)
    observers.model_loaded(model.load_seconds)
    uris = list(input_uris) if input_uris is not None else list_inputs(config.input, config.storage)
    predictor_fields = Predictor(model, config.model_version, now()).fields
    files, contract = InputFiles(), None
    # Each footer is checked as it arrives and kept as a compact record: 100,000 files are never
    # 100,000 footers (or objects) held at once.
    for found in iter_footers(uris, config.storage):
        if contract is None:  # the first file fixes the contract (see SchemaContract)
            contract = SchemaContract.of(found, model.features, config.keep, [f.name for f in predictor_fields])
        contract.check(found.uri, found.schema)
        files.append(found)
    assert contract is not None  # list_inputs never returns no file
    passthrough = contract.passthrough
    # Nullable whatever the first file declares: a later file may hold nulls there, and its type is the same.
    fields = [contract.reference_schema.field(c).with_nullable(True) for c in passthrough] + list(predictor_fields)
    return Prepared(config, model, files, output, passthrough, pa.schema(fields), contract)


def schema_dicts(schema: pa.Schema) -> list[dict[str, str]]:
    """An output schema as plans and receipts record it."""
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def schema_difference(expected: Sequence[dict[str, str]], actual: Sequence[dict[str, str]]) -> str:
    """What tells two output schemas apart, in words: ``score double != float``, ``missing x``."""
    want, have = {c["name"]: c["type"] for c in expected}, {c["name"]: c["type"] for c in actual}
    words = [f"{n} {have[n]} != {t}" for n, t in want.items() if n in have and have[n] != t]
    words += [f"missing {n}" for n in want if n not in have] + [f"extra {n}" for n in have if n not in want]
    return ", ".join(words) or "column order differs"
