"""A batch is bounded by bytes as well as rows: wide rows in a huge row group make smaller batches.

The reader (``io.source.iter_batches``) is what every scorer reads through (``batchscore run``,
each shard, each Spark task): these tests read real files written three ways, and check that the
rows come out exactly once, in order, in batches of at most ``max_batch_bytes`` each, and that the
decoded data held while reading stays near the bound instead of the row group's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchscore
from batchscore.io.source import PROBE_ROWS, iter_batches
from batchscore.sample import churn_table
from helpers import assert_exact, read_inputs, read_output

ROWS = 2_032
MAX_BYTES = 400_000


def wide_table(rows: int, kind: str, seed: int = 5) -> pa.Table:
    """Churn rows with a ``note`` column of about 4 KB a row: all different (``distinct``), one
    string repeated (``repeated``: dictionary-encoded, its footer says almost nothing of its width),
    or short for the first half and wide after (``widening``)."""
    table = churn_table(rows, seed=seed, first_id=1)
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    if kind == "repeated":
        notes = ["r" * 4_001] * rows
    else:
        notes = [bytes(rng.choice(letters, 3_900 + int(rng.integers(0, 200)))).decode() for _ in range(rows)]
        if kind == "widening":
            notes[: rows // 2] = [f"n{i}" for i in range(rows // 2)]
    return table.append_column("note", pa.array(notes, pa.string()))


@pytest.mark.parametrize("kind", ["distinct", "repeated", "widening"])
def test_batches_stay_within_max_bytes_and_keep_every_row_once_in_order(tmp_path: Path, kind: str) -> None:
    table = wide_table(ROWS, kind)
    path = tmp_path / f"{kind}.parquet"
    # One row group of 8 MB of text, in pages of 64 KiB (a reader decodes a whole page at once);
    # the repeated text dictionary-encoded, as writers do by default.
    pq.write_table(
        table, path, row_group_size=ROWS, data_page_size=1 << 16, write_batch_size=16, use_dictionary=kind != "distinct"
    )
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    columns = ["customer_id", "note", "tenure"]
    for start, rows in ((0, None), (517, 1_100), (1_999, 33)):
        expected = table.select(columns).slice(start, rows if rows is not None else ROWS - start)
        baseline, held, done, batches = pa.total_allocated_bytes(), 0, 0, 0
        for batch in iter_batches(
            str(path), [0], columns, 65_536, start=start, rows=rows, max_bytes=MAX_BYTES, use_threads=False
        ):
            held = max(held, pa.total_allocated_bytes() - baseline)
            assert batch.num_rows == 1 or batch.nbytes <= MAX_BYTES, (kind, start, batch.num_rows, batch.nbytes)
            assert batch.equals(expected.slice(done, batch.num_rows).combine_chunks().to_batches()[0]), (kind, done)
            done, batches = done + batch.num_rows, batches + 1
            del batch  # only what the reader holds counts below
        assert done == expected.num_rows, (kind, start)
        if kind != "widening":  # rows as wide as the first ones: the decoded data itself stays bounded
            assert held < 3 * MAX_BYTES < expected.nbytes or start, (kind, start, held)
        assert batches >= expected.nbytes // MAX_BYTES


def test_narrow_rows_are_read_in_full_batches_after_the_probe(tmp_path: Path) -> None:
    """Dictionary-encoded text that might not fit is measured on its first rows, then read at
    ``batch_size``; text whose column chunks are small enough to fit in any case is not probed."""
    table = churn_table(9_008, seed=3, first_id=1)
    path = tmp_path / "narrow.parquet"
    pq.write_table(table, path, row_group_size=9_008)
    sizes = [b.num_rows for b in iter_batches(str(path), [0], table.column_names, 4_000, max_bytes=MAX_BYTES * 10)]
    assert sizes == [PROBE_ROWS, 4_000 - PROBE_ROWS, 4_000, 1_008]  # read on from the row group's start
    assert [b.num_rows for b in iter_batches(str(path), [0], ["age"], 4_000, max_bytes=MAX_BYTES * 10)] == [
        4_000,
        4_000,
        1_008,
    ]  # numbers only: the footer tells their width, no probe
    assert [b.num_rows for b in iter_batches(str(path), [0], table.column_names, 4_000, max_bytes=1 << 26)] == [
        4_000,
        4_000,
        1_008,
    ]  # short dictionaries: no value can be wider than its column chunk, far within the bound


def test_run_writes_wide_rows_in_batches_within_max_bytes(tmp_path: Path, binary_model_paths: dict[str, Path]) -> None:
    """``batchscore run`` on a wide-row file of one row group: each scored batch (one row group of
    the part it writes) holds at most ``max_batch_bytes`` of input, and the output is exact."""
    table = wide_table(ROWS, "distinct")
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "wide.parquet", row_group_size=ROWS)
    output = tmp_path / "out"
    batchscore.run(
        batchscore.build_config(
            None,
            input=(str(tmp_path / "in"),),
            output=str(output),
            model=str(binary_model_paths["model"]),
            scaler=str(binary_model_paths["scaler"]),
            max_batch_bytes=MAX_BYTES,
        )
    )
    assert_exact(read_output(output), read_inputs([tmp_path / "in" / "wide.parquet"]), binary_model_paths)
    assert max(written_batches(output)) <= MAX_BYTES // 3_900


def written_batches(output: Path) -> list[int]:
    """The rows of every row group of every part: one scored batch each."""
    return [
        pq.ParquetFile(part).metadata.row_group(g).num_rows
        for part in sorted(output.glob("part-*.parquet"))
        for g in range(pq.ParquetFile(part).metadata.num_row_groups)
    ]
