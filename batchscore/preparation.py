"""Prepare a job: load its model, read its inputs' footers and check every schema, writing nothing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import pyarrow as pa

from .config import JobConfig
from .engine import Predictor
from .layout import check_output
from .model import ArtifactPolicy, LoadedModel, load_model
from .source import InputFiles, iter_footers, list_inputs
from .storage import filesystem, full_uri
from .validation import SchemaContract


@dataclass
class Prepared:
    """A job whose model, inputs and schemas have all been checked; nothing scored yet."""

    config: JobConfig
    model: LoadedModel
    files: InputFiles  # one compact record per file, not an object each
    output: str  # full URI
    passthrough: tuple[str, ...]
    output_schema: pa.Schema
    #: What every file must look like; each worker checks it again on the footer it opens.
    contract: SchemaContract | None = None


def now() -> datetime:
    return datetime.now(timezone.utc)


def normalize_output(config: JobConfig) -> str:
    config.require("output")
    fs, path = filesystem(config.output, config.storage_options)  # type: ignore[arg-type]
    output = full_uri(fs, fs._strip_protocol(path).rstrip("/"))
    check_output(output)  # its state goes beside it: a root has no beside
    return output


def prepare(
    config: JobConfig, input_uris: Sequence[str] | None = None, policy: ArtifactPolicy | None = None
) -> Prepared:
    """Load the model first (a bad model costs no I/O), then read footers and check every schema.

    The artifacts must pass ``policy`` (by default the job's pins and formats) before loading.
    """
    config.require("model")
    output = normalize_output(config)
    policy = policy or ArtifactPolicy.of(config)
    model = load_model(
        config.model, config.scaler, config.features, config.storage_options, policy  # type: ignore[arg-type]
    )
    uris = list(input_uris) if input_uris is not None else list_inputs(config.input, config.storage_options)
    predictor_fields = Predictor(model, config.model_version, now()).fields
    files, contract = InputFiles(), None
    # Each footer is checked as it arrives and kept as a compact record: 100,000 files are never
    # 100,000 footers (or objects) held at once.
    for found in iter_footers(uris, config.storage_options):
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
