"""Report each scoring run and shard as an OpenLineage run: START, then COMPLETE or FAIL.

Optional (``pip install batchscore[lineage]``) and configured the standard way: ``OPENLINEAGE_URL``,
``OPENLINEAGE_CONFIG`` (a YAML file) or ``OPENLINEAGE__TRANSPORT__...`` variables; nothing is sent
without one of them, nor with ``OPENLINEAGE_DISABLED=true``. A scheduler hands its task's run to
the container as ``OPENLINEAGE_PARENT_ID`` (and ``OPENLINEAGE_ROOT_PARENT_ID``), each
``<namespace>/<job name>/<run id>`` as the Airflow provider's ``lineage_parent_id`` macro writes
it, so the scoring run appears under the task that started it.

Lineage is a report about the job, never part of it: an event that cannot be sent costs one
warning line and at most ``EMIT_TIMEOUT_SECONDS``, and the events after it are not attempted.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..io.source import GLOB_CHARS

if TYPE_CHECKING:
    from ..config import JobConfig

log = logging.getLogger(__name__)

PARENT_ENV = "OPENLINEAGE_PARENT_ID"
ROOT_PARENT_ENV = "OPENLINEAGE_ROOT_PARENT_ID"
#: How long one event may take to send (the client's own retries included) before the job goes on.
EMIT_TIMEOUT_SECONDS = 5.0
PRODUCER = f"https://pypi.org/project/batchscore/{__version__}/"
DEFAULT_NAMESPACE = "default"


def configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for lineage events (the client would print them otherwise)."""
    if environ.get("OPENLINEAGE_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        environ.get("OPENLINEAGE_URL")
        or environ.get("OPENLINEAGE_CONFIG")
        or any(name.startswith("OPENLINEAGE__") for name in environ)
    )


def dataset_name(uri: str) -> tuple[str, str]:
    """(namespace, name) of a location by OpenLineage's naming rules: ``s3://bucket`` and the key,
    ``file`` and the absolute path. A glob names the folder before its first wildcard."""
    scheme, sep, rest = uri.partition("://")
    path = rest if sep else uri
    if any(ch in path for ch in GLOB_CHARS):
        head = path[: min(path.index(ch) for ch in GLOB_CHARS if ch in path)]
        path = head.rsplit("/", 1)[0] if "/" in head else ""
    if not sep or scheme in ("file", "local"):
        return "file", os.path.abspath(path or ".")
    scheme = "s3" if scheme in ("s3a", "s3n") else scheme
    bucket, _, key = path.partition("/")
    return f"{scheme}://{bucket}", key.rstrip("/") or "/"


def parse_parent(value: str | None, variable: str) -> tuple[str, str, str] | None:
    """``<namespace>/<job name>/<run id>`` as (namespace, name, run id); a malformed one is ignored."""
    if not value:
        return None
    namespace, _, rest = value.partition("/")
    name, _, run_id = rest.rpartition("/")
    try:
        uuid.UUID(run_id)
    except ValueError:
        name = ""
    if not namespace or not name:
        log.warning("ignoring %s=%r: expected <namespace>/<job name>/<run id> with a UUID run id", variable, value)
        return None
    return namespace, name, run_id


class LineageRun:
    """One OpenLineage run of a scoring command: START now, COMPLETE or FAIL when it ends."""

    def __init__(
        self,
        client: Any,
        namespace: str,
        job: str,
        inputs: Sequence[str],
        output: str | None,
        parent: tuple[str, str, str] | None,
        root: tuple[str, str, str] | None,
    ):
        from openlineage.client.uuid import generate_new_uuid

        self.client, self.namespace, self.job = client, namespace, job
        self.inputs, self.output = list(inputs), output
        self.parent, self.root = parent, root
        self.run_id = str(generate_new_uuid())
        self.broken = False
        self.ended = False

    def start(self) -> None:
        self._emit("START", self.inputs, self.output)

    def succeeded(self, result: Mapping[str, Any] | None) -> None:
        result = result or {}
        inputs = self.inputs or [i["uri"] for i in result.get("inputs", ())]
        rows = result["rows"]["out"] if "rows" in result else result.get("rows_out")
        self._emit(
            "COMPLETE",
            inputs,
            self.output or result.get("output"),
            rows=rows,
            parts=len(result.get("parts", ())),
            schema=result.get("schema"),
        )

    def failed(self, exit_code: int, message: str = "") -> None:
        self._emit("FAIL", self.inputs, self.output, error=f"exit code {exit_code}: {message}")

    def _event(
        self,
        state: str,
        inputs: Sequence[str],
        output: str | None,
        rows: int | None = None,
        parts: int = 0,
        schema: Sequence[Mapping[str, str]] | None = None,
        error: str | None = None,
    ) -> Any:
        from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
        from openlineage.client.generated import (
            error_message_run,
            job_type_job,
            output_statistics_output_dataset,
            parent_run,
            processing_engine_run,
            schema_dataset,
        )

        run_facets: dict[str, Any] = {
            "processing_engine": processing_engine_run.ProcessingEngineRunFacet(version=__version__, name="batchscore"),
        }
        if self.parent is not None:
            namespace, name, run_id = self.parent
            root = None
            if self.root is not None:
                root = parent_run.Root(
                    run=parent_run.RootRun(runId=self.root[2]),
                    job=parent_run.RootJob(namespace=self.root[0], name=self.root[1]),
                )
            run_facets["parent"] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=run_id), job=parent_run.Job(namespace=namespace, name=name), root=root
            )
        if error is not None:
            run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=error, programmingLanguage="python"
            )
        outputs = []
        if output:
            output_facets: dict[str, Any] = {}
            if rows is not None:
                output_facets["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                    rowCount=rows, fileCount=parts
                )
            facets: dict[str, Any] = {}
            if schema:
                facets["schema"] = schema_dataset.SchemaDatasetFacet(
                    fields=[schema_dataset.SchemaDatasetFacetFields(name=c["name"], type=c["type"]) for c in schema]
                )
            outputs.append(OutputDataset(*dataset_name(output), facets=facets, outputFacets=output_facets))
        names = list(dict.fromkeys(dataset_name(uri) for uri in inputs))
        job_facets: dict[str, Any] = {
            "jobType": job_type_job.JobTypeJobFacet(processingType="BATCH", integration="BATCHSCORE", jobType="JOB")
        }
        return RunEvent(
            eventType=getattr(RunState, state),
            eventTime=datetime.now(timezone.utc).isoformat(),
            run=Run(runId=self.run_id, facets=run_facets),
            job=Job(namespace=self.namespace, name=self.job, facets=job_facets),
            inputs=[InputDataset(namespace, name) for namespace, name in names],
            outputs=outputs,
            producer=PRODUCER,
        )

    def _emit(self, state: str, *args: Any, **kwargs: Any) -> None:
        """Send one event, waiting at most ``EMIT_TIMEOUT_SECONDS``; after a failure, send no more."""
        if self.ended or self.broken:
            return
        self.ended = state != "START"
        problem: list[BaseException] = []

        def send() -> None:
            try:
                self.client.emit(self._event(state, *args, **kwargs))
            except Exception as exc:  # reported below: lineage never fails the job
                problem.append(exc)

        sender = threading.Thread(target=send, name="batchscore-lineage", daemon=True)
        sender.start()
        sender.join(EMIT_TIMEOUT_SECONDS)
        if sender.is_alive() or problem:
            self.broken = True
            reason = (
                f"{type(problem[0]).__name__}: {problem[0]}" if problem else f"no answer in {EMIT_TIMEOUT_SECONDS:g} s"
            )
            log.warning(
                "could not send the OpenLineage %s event of %s (%s); the job's result is unaffected",
                state,
                self.job,
                reason,
            )


def start(config: JobConfig, job_name: str, shard: int | None = None) -> LineageRun | None:
    """Emit a scoring command's START event and return its run, where lineage is configured."""
    if not configured():
        return None
    try:
        from openlineage.client import OpenLineageClient
    except ImportError:
        log.warning(
            "OpenLineage is configured but openlineage-python is not installed "
            "(pip install 'batchscore[lineage]'); no lineage events are sent"
        )
        return None
    parent = parse_parent(os.environ.get(PARENT_ENV), PARENT_ENV)
    root = parse_parent(os.environ.get(ROOT_PARENT_ENV), ROOT_PARENT_ENV)
    namespace = os.environ.get("OPENLINEAGE_NAMESPACE") or (parent[0] if parent else DEFAULT_NAMESPACE)
    name = job_name if shard is None else f"{job_name}.shard-{shard}"
    before = set(os.environ)
    try:
        client = OpenLineageClient()
    except Exception as exc:  # a broken OPENLINEAGE_CONFIG: a warning, like every lineage problem
        log.warning("could not set up OpenLineage (%s: %s); no lineage events are sent", type(exc).__name__, exc)
        return None
    finally:  # the client copies OPENLINEAGE_URL into variables of its own, which would outlive this run
        for added in set(os.environ) - before:  # (a library caller's next run, to another URL, included)
            if added.startswith("OPENLINEAGE"):
                os.environ.pop(added, None)
    run = LineageRun(client, namespace, name, list(config.input), config.output, parent, root)
    run.start()
    return run
