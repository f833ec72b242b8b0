"""Where an output's state goes: beside it, in every spelling of the output; never for a root."""

from __future__ import annotations

import pytest

from batchscore.errors import ConfigError
from batchscore.io.layout import manifest_path, plan_path, receipt_path, rejected_path, state_folder


@pytest.mark.parametrize(
    "output, state",
    [
        ("s3://bucket/scores/dt=2026-11-24", "s3://bucket/scores/_batchscore/dt=2026-11-24"),
        ("s3://bucket/scores/dt=2026-11-24/", "s3://bucket/scores/_batchscore/dt=2026-11-24"),
        ("s3://bucket/scores", "s3://bucket/_batchscore/scores"),
        ("bucket/scores/dt=2026-11-24", "bucket/scores/_batchscore/dt=2026-11-24"),  # fsspec's own spelling
        ("/data/out", "/data/_batchscore/out"),
        ("/out", "/_batchscore/out"),
        ("out", "_batchscore/out"),
        ("data/./out/", "data/_batchscore/out"),
        ("file:///data/out", "file:///data/_batchscore/out"),
    ],
)
def test_the_state_folder_is_a_sibling_of_the_output(output: str, state: str) -> None:
    assert state_folder(output) == state


def test_every_state_file_is_in_the_state_folder_and_no_rejected_file_ends_in_parquet() -> None:
    output = "s3://bucket/scores/dt=2026-11-24"
    state = "s3://bucket/scores/_batchscore/dt=2026-11-24"
    assert manifest_path(output) == f"{state}/manifest.json"
    assert plan_path(output) == f"{state}/plan.json"
    assert receipt_path(output, 3) == f"{state}/receipts/shard-00003.json"
    rejected = rejected_path(output, "part-00000-00001.parquet")
    assert rejected == f"{state}/rejected/part-00000-00001.parquet.rejected" and not rejected.endswith(".parquet")


@pytest.mark.parametrize("output", ["s3://bucket", "s3://bucket/", "/", "file:///", "", "."])
def test_a_root_has_no_state_folder(output: str) -> None:
    with pytest.raises(ConfigError, match="bucket or filesystem root"):
        state_folder(output)
