"""Incremental jobs: which input files to score, from the listing and the table's record alone.

A table output's incremental commits record every input file the table holds rows of: its
identity when scored, the scoring key, and which parts hold its rows (io/scored.py; kept in a Delta
commit's info, io/tables.py, or in a file an Iceberg snapshot points to, io/iceberg.py). A job
compares each listed file with that record before it opens any file: a file not recorded is
scored, one recorded with the same identity and key is skipped, and one whose identity (size, mtime
or inode; ETag on S3) or scoring key changed is rescored, its previous parts removed in the same
commit that adds its new ones. Nothing but the listing and the table's log (or its metadata and
record) is read for a file that is skipped: no footer, no data page.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import JobConfig
from ..errors import NOTHING_NEW, ConfigError, NothingToScore, param
from ..io.listing import listed_identities
from ..io.source import COMPARED_IDENTITY
from ..io.storage import Location
from ..io.tables import scoring_key
from ..logs import event

log = logging.getLogger(__name__)

SCORE, SKIP, RESCORE = "score", "skip", "rescore"


@dataclass(frozen=True)
class Decision:
    uri: str
    action: str  # score, skip, rescore
    reason: str


def _changed(listed: Mapping[str, Any], recorded: Mapping[str, Any]) -> list[str]:
    """The identity fields that tell the listed file from the one scored (those both know)."""
    return [k for k in COMPARED_IDENTITY if k in listed and recorded.get(k) is not None and listed[k] != recorded[k]]


def decide(
    uris: Sequence[str],
    identities: Mapping[str, Mapping[str, Any]],
    record: Mapping[str, Any],
    key: str,
    full_refresh: bool = False,
) -> list[Decision]:
    """Each listed file as score, skip or rescore, with the reason."""
    found = []
    for uri in uris:
        scored = record.get(uri)
        if full_refresh:
            found.append(Decision(uri, RESCORE if scored else SCORE, "full refresh"))
        elif scored is None:
            found.append(Decision(uri, SCORE, "not scored yet"))
        elif changed := _changed(identities.get(uri, {}), scored.identity):
            found.append(Decision(uri, RESCORE, f"the file changed ({', '.join(changed)})"))
        elif scored.key != key:
            found.append(Decision(uri, RESCORE, "scored by another model, scoring settings or batchscore version"))
        else:
            found.append(Decision(uri, SKIP, "scored already, unchanged"))
    return found


def incremental_inputs(config: JobConfig, output: Location, artifact_sha256: Sequence[str]) -> list[str]:
    """The input files an incremental job scores, each decision logged; raises ``NothingToScore``
    when there is none. Reads the listing and the table's log, no input file."""
    from ..io.tables import Target, table_record

    if config.table_mode != "append":
        raise ConfigError(
            f"{param('incremental')} appends what is new and replaces only the rows of rescored files; "
            f"{param('table_mode')} replace would drop the rest (use {param('full_refresh')} to rescore everything)"
        )
    uris, identities = listed_identities(config.input, config.storage)
    try:
        record = table_record(Target.of(config, output))
    except ConfigError:
        if not config.full_refresh:
            raise
        record = {}  # unreadable or expired: a full refresh replaces every row without it
    decisions = decide(uris, identities, record, scoring_key(config, artifact_sha256), config.full_refresh)
    counts = {action: 0 for action in (SCORE, RESCORE, SKIP)}
    for d in decisions:
        counts[d.action] += 1
        log.info(f"{d.action} {d.uri}: {d.reason}", extra=event("incremental_file", **vars(d)))
    gone = len(set(record) - set(uris))
    log.info(
        f"incremental: {counts[SCORE]} file(s) to score, {counts[RESCORE]} to rescore, {counts[SKIP]} skipped"
        + (f"; {gone} recorded file(s) no longer listed keep their rows" if gone else ""),
        extra=event("incremental", **counts, gone=gone),
    )
    chosen = [d.uri for d in decisions if d.action != SKIP]
    if not chosen:
        raise NothingToScore(
            f"{NOTHING_NEW}: the {len(uris)} input file(s) are in {output.uri} already, scored by this "
            "model with these settings; nothing was committed"
        )
    return chosen
