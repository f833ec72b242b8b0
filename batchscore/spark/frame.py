"""Score a Spark DataFrame with batchscore's predictor: ``mapInArrow``, exact, pinned, bounded.

The driver loads the model once to learn its features and output columns and records the sha256
of every artifact's bytes; each Python worker then loads the artifacts itself, once, from their
URIs, refusing bytes whose digest is not the recorded one (nothing is pickled into the tasks but
the job's settings). Every Arrow batch Spark hands over is cut into slices of at most
``batch_size`` rows and ``max_batch_bytes`` bytes, and each slice is scored as ``batchscore run``
scores a batch: the same feature matrix (the dtypes ``df[features]`` has in pandas), the same
invalid-row checks, the same columns (passthrough, then prediction, probability or
``probability_<class>``, ``predicted_at``, ``model_version``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from typing import Any

from ..config import JobConfig, build_config
from ..errors import ConfigError, InputDataError

#: Set on the session by ``score`` unless ``session_conf=False``: Spark's own Arrow batches, by
#: rows (``batch_size``) and by bytes (``max_batch_bytes``), so wide rows never make a batch of gigabytes.
ARROW_RECORDS = "spark.sql.execution.arrow.maxRecordsPerBatch"
ARROW_BYTES = "spark.sql.execution.arrow.maxBytesPerBatch"


def job_of(config_or_model: Any, **settings: Any) -> JobConfig:
    """A ``JobConfig``, a job file's path (``.yaml``/``.yml``) or a model's URI, with ``settings``
    (any job keys: scaler, model_version, keep, on_invalid, batch_size, ...) on top."""
    if isinstance(config_or_model, JobConfig):
        return replace(config_or_model, **settings) if settings else config_or_model
    text = str(config_or_model)
    if text.lower().endswith((".yaml", ".yml")):
        return build_config(text, **settings)
    return build_config(None, model=text, **settings)


def load(config: JobConfig) -> Any:
    """The job's model held to its pinned digests, loaded once per process for every task that
    asks for the same artifacts with the same storage settings (see ``load_model_kept``)."""
    from ..models.artifacts import ArtifactPolicy, load_model_kept

    return load_model_kept(
        config.require("model"), config.scaler, config.features, config.storage, ArtifactPolicy.of(config)
    )


def score(
    df: Any,
    config_or_model: Any,
    *,
    session_conf: bool = True,
    **settings: Any,
) -> Any:
    """``df`` scored: its passthrough columns (``keep``, else all of them) and the prediction columns.

    Rows with a null, NaN or infinite feature fail the job (``on_invalid: fail``, naming the
    column) or are left out (``skip``); ``quarantine`` needs a job's state folder and is refused,
    as are challengers and ``engine: compiled`` (a job's, with its manifest: ``batchscore spark``).
    ``engine: auto`` scores with scikit-learn.
    Lazy like any DataFrame: nothing is scored until an action runs.
    """
    import pyarrow as pa
    from pyspark.sql.pandas.types import from_arrow_type, to_arrow_type
    from pyspark.sql.types import StructField, StructType

    from ..job.preparation import now, versioned
    from ..models.engine import Predictor
    from ..models.registry import pinned_uri

    config = job_of(config_or_model, **settings)
    config.require("model")
    if config.on_invalid == "quarantine":
        raise ConfigError(
            "on_invalid quarantine writes rejected rows beside a job's output; a DataFrame has none: "
            "use fail or skip, or filter the rows first"
        )
    if config.models:
        raise ConfigError(
            f"score(df) scores one model, and the job names challengers ({', '.join(m.name for m in config.models)}): "
            "score each model in a call of its own, or run the job with batchscore spark (one pass, every model)"
        )
    if config.engine == "compiled":
        raise ConfigError(
            "score(df) scores with scikit-learn; engine compiled (a verified library per job) is for jobs: "
            "run the job with batchscore spark, or use engine sklearn or auto"
        )
    model = load(config)  # on the driver: features, classes and digests, checked before any task starts
    digests = {a.role: a.sha256 for a in model.artifacts}
    # Each executor loads the model itself: a registry alias is handed on as the version the driver
    # resolved, with the registry, so every task scores that version (or fails on its digests).
    uris = {a.role: pinned_uri(a.uri, a.registry) for a in model.artifacts if a.registry}
    config = versioned(config, [a.to_dict() for a in model.artifacts])
    config = replace(
        config,
        model=uris.get("model", config.model),
        scaler=uris.get("scaler", config.scaler),
        registry_uri=config.storage.registry_uri,
        model_sha256=digests["model"],
        scaler_sha256=digests.get("scaler"),
    )
    predictor = Predictor(model, config.model_version, now())
    columns = list(df.columns)
    missing = [f for f in model.features if f not in columns]
    if missing:
        raise InputDataError(f"DataFrame has no feature column(s) {', '.join(missing)} (columns: {', '.join(columns)})")
    keep = list(config.keep) if config.keep is not None else [c for c in columns]
    unknown = [c for c in keep if c not in columns]
    if unknown:
        raise ConfigError(f"keep names column(s) the DataFrame does not have: {', '.join(unknown)}")
    clash = [c for c in keep if c in predictor.column_names]
    if clash:
        raise ConfigError(
            f"DataFrame column(s) {', '.join(clash)} would be overwritten by the prediction columns; "
            f"drop or rename them, or leave them out of keep"
        )
    read = keep + [f for f in model.features if f not in keep]
    fields = {f.name: f for f in df.schema.fields}
    spark_schema = StructType(
        [StructField(c, fields[c].dataType, True) for c in keep]
        + [StructField(f.name, from_arrow_type(f.type), True) for f in predictor.fields]
    )
    timezone = df.sparkSession.conf.get("spark.sql.session.timeZone")
    arrow_schema = pa.schema(
        [pa.field(f.name, to_arrow_type(f.dataType, timezone=timezone), True) for f in spark_schema.fields]
    )  # what Spark expects back, timestamps in its zone
    if session_conf:
        df.sparkSession.conf.set(ARROW_RECORDS, str(config.batch_size))
        df.sparkSession.conf.set(ARROW_BYTES, str(config.max_batch_bytes))
    scorer = _Scorer(config, predictor.predicted_at.as_py(), keep, arrow_schema, config.max_batch_bytes)
    return df.select(*read).mapInArrow(scorer, spark_schema)


class _Scorer:
    """What ``mapInArrow`` runs in each Python worker: settings only, the model loaded there."""

    def __init__(self, config: JobConfig, predicted_at: datetime, keep: list[str], schema: Any, max_bytes: int):
        self.config, self.predicted_at, self.keep, self.schema, self.max_bytes = (
            config,
            predicted_at,
            keep,
            schema,
            max_bytes,
        )

    def __call__(self, batches: Iterator[Any]) -> Iterator[Any]:
        from ..models.engine import Predictor

        predictor = Predictor(load(self.config), self.config.model_version, self.predicted_at)
        for batch in batches:
            for piece in slices(batch, self.config.batch_size, self.max_bytes):
                scored = self.score(predictor, piece)
                if scored is not None and scored.num_rows:
                    yield scored

    def score(self, predictor: Any, batch: Any) -> Any:
        """One slice, as the job's scorer scores a batch (see job/scorer.py)."""
        import pyarrow as pa

        from ..io.validation import invalid_mask, invalid_reasons

        n = batch.num_rows
        features = predictor.model.features
        nulls = frozenset(f for f in features if batch.column(f).null_count)
        matrix = predictor.feature_matrix(batch, nulls)
        bad = invalid_mask(matrix[:n])
        if bad is not None:
            if self.config.on_invalid == "fail":
                row = int(bad.nonzero()[0][0])
                raise InputDataError(
                    f"a row has an invalid feature value ({invalid_reasons(batch, features, bad.nonzero()[0][:1])[0]}); "
                    f"on_invalid fail stops at the first null/NaN/inf feature (use skip to leave such rows out)"
                )
            matrix[:n][bad] = 0.0  # a placeholder: the predictor never scores it
        prediction = predictor.score(matrix, n, bad)
        if prediction.refused is not None:
            if self.config.on_invalid == "fail":
                row = int(prediction.refused.nonzero()[0][0])
                raise InputDataError(
                    f"a row is refused by the model: {prediction.reasons.get(row, 'invalid')}; "
                    f"on_invalid fail stops there (use skip to leave such rows out)"
                )
            bad = prediction.refused if bad is None else bad | prediction.refused
        if prediction.columns is None:
            return None
        columns = [batch.column(c) for c in self.keep] + prediction.columns
        columns = [c.cast(f.type) if c.type != f.type else c for c, f in zip(columns, self.schema)]
        scored = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        return scored.filter(pa.array(~bad)) if bad is not None else scored


def slices(batch: Any, rows: int, max_bytes: int) -> Iterator[Any]:
    """``batch`` in consecutive slices of at most ``rows`` rows and about ``max_bytes`` bytes
    (never less than one row), in order."""
    n = batch.num_rows
    if not n:
        return
    width = max(1, batch.nbytes // n)
    step = max(1, min(rows, max_bytes // width))
    for start in range(0, n, step):
        yield batch.slice(start, step)
