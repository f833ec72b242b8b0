"""Prepare a job: load its model, read its inputs' footers and check every schema, writing nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import pyarrow as pa

from ..config import JobConfig
from ..models.engine import Predictor
from ..io.layout import check_output
from ..observe.metrics import observe_model_load
from ..models.artifacts import ArtifactPolicy, LoadedModel, load_model
from ..io.source import InputFile, list_inputs, read_footers
from ..io.storage import filesystem, full_uri
from ..io.validation import SchemaContract, check_schemas


@dataclass
class Prepared:
    """A job whose model, inputs and schemas have all been checked; nothing scored yet."""

    config: JobConfig
    model: LoadedModel
    files: list[InputFile]
    output: str  # full URI
    passthrough: tuple[str, ...]
    output_schema: pa.Schema
    #: What every file must look like; each worker checks it again on the footer it opens.
    contract: SchemaContract | None = None


def now() -> datetime:
    return datetime.now(timezone.utc)


def normalize_output(config: JobConfig) -> str:
    fs, path = filesystem(config.require("output"), config.storage_options)
    output = full_uri(fs, fs._strip_protocol(path).rstrip("/"))
    check_output(output)  # its state goes beside it: a root has no beside
    return output


def prepare(
    config: JobConfig, input_uris: Sequence[str] | None = None, policy: ArtifactPolicy | None = None
) -> Prepared:
    """Load the model first (a bad model costs no I/O), then read footers and check every schema.

    The artifacts must pass ``policy`` (by default the job's pins and formats) before loading.
    """
    model_uri = config.require("model")
    output = normalize_output(config)
    policy = policy or ArtifactPolicy.of(config)
    model = load_model(model_uri, config.scaler, config.features, config.storage_options, policy)
    observe_model_load(model.load_seconds)
    uris = list(input_uris) if input_uris is not None else list_inputs(config.input, config.storage_options)
    files = read_footers(uris, config.storage_options)
    predictor_fields = Predictor(model, config.model_version, now()).fields
    contract = check_schemas(files, model.features, config.keep, [f.name for f in predictor_fields])
    assert contract is not None  # list_inputs never returns no file
    passthrough = contract.passthrough
    # Nullable whatever the first file declares: a later file may hold nulls there, and its type is the same.
    fields = [files[0].schema.field(c).with_nullable(True) for c in passthrough] + list(predictor_fields)
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
