"""Builders for test data and models, and the reference computation outputs are checked against."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner, Result

from batchscore.cli import main
from batchscore.io import layout
from batchscore.sample import FEATURES, churn_table

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = REPO / "configs" / "sample.yaml"


def cli(*args: str) -> Result:
    """Invoke the real CLI in-process; stderr is kept apart from stdout."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def write_inputs(
    folder: Path, files: int = 3, rows: int = 4_800, row_group_size: int = 1_000, seed: int = 7
) -> list[Path]:
    """Several churn files with several row groups each; ids run on across files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        path = folder / f"day-{i:02d}.parquet"
        pq.write_table(churn_table(rows, seed=seed + i, first_id=1 + i * rows), path, row_group_size=row_group_size)
        paths.append(path)
    return paths


def training_frame(rows: int = 3_000, seed: int = 3):
    return churn_table(rows, seed=seed).to_pandas()


def save(folder: Path, **objects: Any) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, obj in objects.items():
        paths[name] = folder / f"{name}.joblib"
        joblib.dump(obj, paths[name])
    return paths


def binary_model(folder: Path) -> dict[str, Path]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    frame = training_frame()
    scaler = StandardScaler().fit(frame[list(FEATURES)])
    model = LogisticRegression().fit(scaler.transform(frame[list(FEATURES)]), frame["churned"])
    return save(folder, model=model, scaler=scaler)


def multiclass_model(folder: Path) -> dict[str, Path]:
    """String classes, three of them, from a tree ensemble."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.preprocessing import MinMaxScaler

    frame = training_frame()
    scaler = MinMaxScaler().fit(frame[list(FEATURES)])
    model = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(
        scaler.transform(frame[list(FEATURES)]), frame["plan"]
    )
    return save(folder, model=model, scaler=scaler)


def regressor_model(folder: Path) -> dict[str, Path]:
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    frame = training_frame()
    scaler = StandardScaler().fit(frame[list(FEATURES)])
    model = Ridge().fit(scaler.transform(frame[list(FEATURES)]), frame["total_charges"] / 100)
    return save(folder, model=model, scaler=scaler)


def pipeline_model(folder: Path) -> dict[str, Path]:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    frame = training_frame()
    pipe = make_pipeline(StandardScaler(), RandomForestClassifier(n_estimators=10, max_depth=6, random_state=0))
    pipe.fit(frame[list(FEATURES)], frame["churned"])
    return save(folder, model=pipe)


def read_output(output: Path | str, filesystem: Any = None) -> pa.Table:
    """Every committed part, in name order (which is input order)."""
    if filesystem is None:
        names = sorted(p for p in os.listdir(output) if p.startswith("part-"))
        assert names, f"no part files in {output}"
        return pa.concat_tables([pq.read_table(os.path.join(output, n)) for n in names])
    filesystem.invalidate_cache(str(output))
    names = sorted(p for p in filesystem.ls(str(output), detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    assert names, f"no part files in {output}"
    return pa.concat_tables([pq.read_table(n, filesystem=filesystem) for n in names])


def state(output: Path) -> Path:
    """The job's state folder beside a local output (see batchscore/io/layout.py)."""
    return Path(layout.state_folder(str(output)))


def read_manifest(output: Path | str, filesystem: Any = None) -> dict[str, Any]:
    """The manifest commit wrote for ``output`` (local, or a bucket path on ``filesystem``)."""
    path = layout.manifest_path(str(output))
    return json.loads(filesystem.cat_file(path) if filesystem is not None else Path(path).read_bytes())


def plan_file(output: Path) -> Path:
    """Where the docs and the DAG put a sharded job's plan."""
    return Path(layout.plan_path(str(output)))


def planned_file(plan: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """File ``index`` of a plan document, its compact record read by field name."""
    return dict(zip(plan["file_fields"], plan["files"][index]))


def receipt_file(output: Path, shard: int) -> Path:
    return Path(layout.receipt_path(str(output), shard))


def rejected_file(output: Path, part_name: str = "part-00000-00000.parquet") -> Path:
    return Path(layout.rejected_path(str(output), part_name))


def read_rejected(output: Path | str) -> pa.Table:
    """Every rejected row of a local output, in part order."""
    folder = Path(layout.rejected_folder(str(output)))
    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.iterdir())])


def read_inputs(paths: Sequence[Path]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths])


def assert_exact(
    output: pa.Table, inputs: pa.Table, model_paths: dict[str, Path], passthrough: Sequence[str] | None = None
) -> None:
    """Every output row equals predict/predict_proba(scaler.transform(row)), in input order.

    The reference is one call over the whole input, as a user would write it. BLAS/SIMD kernels
    round the remainder rows of a matrix (its last ``n mod 4``) differently from the rest, even
    inside scikit-learn; batchscore pads its batches so no real row is a remainder row, and test
    inputs hold a multiple of 16 rows so that the reference has none either.
    """
    model = joblib.load(model_paths["model"])
    scaler = joblib.load(model_paths["scaler"]) if "scaler" in model_paths else None
    frame = inputs.to_pandas()
    names = list(getattr(scaler if scaler is not None else model, "feature_names_in_", FEATURES))
    features = frame[names]
    x = scaler.transform(features) if scaler is not None else features
    assert output.num_rows == inputs.num_rows
    expected_pred = model.predict(x)
    got_pred = output.column("prediction").to_numpy(zero_copy_only=False)
    assert np.array_equal(got_pred, expected_pred), "predictions differ"
    assert inputs.num_rows % 16 == 0, "use a multiple of 16 rows (see above)"
    if hasattr(model, "predict_proba"):
        proba = model.predict_proba(x)
        if proba.shape[1] == 2:
            assert np.array_equal(output.column("probability").to_numpy(), proba[:, 1])
        else:
            for k, label in enumerate(model.classes_):
                assert np.array_equal(output.column(f"probability_{label}").to_numpy(), proba[:, k])
    for name in passthrough if passthrough is not None else inputs.column_names:
        assert output.column(name).equals(inputs.column(name)), f"passthrough column {name} changed"


def no_success(output: Path) -> bool:
    return not (output / "_SUCCESS").exists()


def only_complete_parts(output: Path) -> bool:
    """No file at a final part name is partial: each one reads back as Parquet."""
    if not output.exists():
        return True
    for name in os.listdir(output):
        if name.startswith("part-"):
            pq.read_metadata(output / name)
    return True


def read_run_report(output: Path | str) -> dict[str, Any]:
    """A local output's run report, as written (sketches included)."""
    import json

    from batchscore.io.sink import report_path

    return json.loads(Path(report_path(str(output))).read_text())


def writing_a_part(out: Path, prefix: str = ".part-") -> bool:
    """Whether a part is being written into ``out`` now. The folder may come and go before the
    first part (a run checks it can write there with a probe it removes), so a folder gone between
    looking and listing is "not yet", not an error."""
    try:
        return any(name.startswith(prefix) for name in os.listdir(out))
    except FileNotFoundError:
        return False
