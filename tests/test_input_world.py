"""The input is a closed world, and the output schema is a contract.

Every entry an input spec reaches is either a regular Parquet file that is scored, or an error
naming it with nothing committed; the rules that skip names (``.``/``_``, not ``*.parquet``,
S3 folder markers) log what they skipped. Every file must match the first file's columns and
types (missing, extra, retyped: exit 3 naming file and column), however the job is sharded.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchscore.errors import EXIT_FAILURE, EXIT_INPUT
from batchscore.io import layout
from helpers import assert_exact, cli, plan_file, read_inputs, read_manifest, read_output, write_inputs

pytestmark = pytest.mark.fault

ROWS = 336  # per file: a multiple of 16 (see helpers.assert_exact), not a round number


def _job(inputs: list[Any], out: Path, model: dict[str, Path], *extra: Any) -> list[str]:
    args = ["--output", out, "--model", model["model"], "--scaler", model["scaler"], "--workers", "1", *extra]
    for spec in inputs:
        args += ["--input", spec]
    return [str(a) for a in args]


def _one_error(stderr: str, *needles: Any) -> str:
    """The last line is the one ``Error:`` line and names each needle; no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0], stderr
    for needle in needles:
        assert str(needle) in errors[0], (needle, errors[0])
    return errors[0]


def _nothing_committed(out: Path) -> None:
    assert not (out / "_SUCCESS").exists()
    assert not Path(layout.manifest_path(str(out))).exists()
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith("part-")]


def _refused(args: list[str], out: Path, code: int, *needles: Any) -> str:
    result = cli("run", *args)
    assert result.exit_code == code, (result.exit_code, result.stderr)
    _nothing_committed(out)
    return _one_error(result.stderr, *needles)


def _tree(root: Path) -> list[Path]:
    """Two files at the top, one in a partition folder: the files a search of ``root`` reads."""
    top = write_inputs(root, files=2, rows=ROWS, row_group_size=112)
    part = write_inputs(root / "dt=2026-11-24", files=1, rows=ROWS + 16, row_group_size=112, seed=40)
    return top + part


# -- not a regular file, as root ---------------------------------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))  # the socket file stays after the socket is closed
    sock.close()


def _folder(path: Path) -> None:
    write_inputs(path, files=1, rows=ROWS)  # a Spark-style folder named like a file: not one file


def _broken(path: Path) -> None:
    path.symlink_to(path.parent / "gone.parquet")


def _self_loop(path: Path) -> None:
    path.symlink_to(path)


def _two_loop(path: Path) -> None:
    other = path.parent / "other.parquet"
    other.symlink_to(path)
    path.symlink_to(other)


def _folder_loop(path: Path) -> None:
    path.parent.joinpath("up").symlink_to(path.parent.parent)  # a folder that holds itself


def _device(path: Path) -> None:
    path.symlink_to("/dev/null")


ODD_ENTRIES = {
    "fifo": (_fifo, "a FIFO"),
    "socket": (_socket, "a socket"),
    "device": (_device, "a device"),
    "folder": (_folder, "is a folder"),
    "broken-symlink": (_broken, "broken symlink"),
    "symlink-loop": (_self_loop, "symlink loop"),
    "symlink-loop-of-two": (_two_loop, "symlink loop"),
    "folder-loop": (_folder_loop, "symlink loop"),
}


#: How the spec reaches the entry: a search of the folder, a glob, a ``**`` glob, or by its name. A
#: folder loop is met only by what descends; a folder named explicitly is searched, whatever its name.
REACHED_BY = [
    (kind, how)
    for kind in sorted(ODD_ENTRIES)
    for how in ("folder", "glob", "recursive-glob", "named")
    if not (kind == "folder-loop" and how in ("glob", "named")) and (kind, how) != ("folder", "named")
]


@pytest.mark.parametrize(("kind", "how"), REACHED_BY)
def test_an_entry_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, binary_model_paths, kind: str, how: str
) -> None:
    root = tmp_path / "in"
    _tree(root)
    make, words = ODD_ENTRIES[kind]
    odd = root / "dt=2026-11-24" / "x.parquet"
    make(odd)
    culprit = odd.parent / "up" if kind == "folder-loop" else odd
    spec = {
        "folder": root,
        "glob": root / "dt=*" / "*.parquet",
        "recursive-glob": root / "**" / "*.parquet",
        "named": odd,
    }[how]
    out = tmp_path / "out"
    line = _refused(_job([spec], out, binary_model_paths), out, EXIT_INPUT, words)
    assert str(culprit) in line or (kind == "symlink-loop-of-two" and str(odd.parent / "other.parquet") in line), line


def test_a_fifo_named_parquet_fails_fast_in_a_real_process(tmp_path: Path, binary_model_paths) -> None:
    """Opening a FIFO blocks until a writer comes: the job must refuse it without opening it."""
    root = tmp_path / "in"
    _tree(root)
    fifo = root / "dt=2026-11-24" / "zz.parquet"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    for spec in (root, fifo, root / "*" / "*.parquet"):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "batchscore", "run", *_job([spec], out, binary_model_paths)],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == EXIT_INPUT, done.stderr
        _one_error(done.stderr, fifo, "FIFO")
        _nothing_committed(out)
        assert time.monotonic() - started < 60


def test_a_glob_that_matches_a_folder_is_refused(tmp_path: Path, binary_model_paths) -> None:
    root = tmp_path / "in"
    _tree(root)
    out = tmp_path / "out"
    _refused(_job([root / "*"], out, binary_model_paths), out, EXIT_INPUT, root / "dt=2026-11-24", "is a folder")


def test_what_is_not_matched_is_not_looked_at(tmp_path: Path, binary_model_paths) -> None:
    """A FIFO or a broken link a glob does not match is none of the job's business."""
    root = tmp_path / "in"
    inputs = _tree(root)
    os.mkfifo(root / "pipe")
    (root / "dangling").symlink_to(root / "nowhere")
    out = tmp_path / "out"
    result = cli("run", *_job([root / "day-*.parquet"], out, binary_model_paths))
    assert result.exit_code == 0, result.stderr
    assert_exact(read_output(out), read_inputs(inputs[:2]), binary_model_paths)


# -- unreadable folders, as a user the permission bits apply to -----------------------------------

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_permission_override() -> None:
    """In the child, before exec: without these capabilities root obeys permission bits (its own
    files' owner bits included), as any user does. Used where ``nobody`` cannot reach the interpreter."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _nobody_can_run_python() -> bool:
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import batchscore.cli"],
            user="nobody",
            group="nogroup",
            extra_groups=[],
            cwd="/",
            capture_output=True,
            timeout=120,
        )
    except (PermissionError, KeyError):  # the interpreter lies under a folder only root may enter
        return False
    return done.returncode == 0


@pytest.fixture(scope="module")
def unprivileged() -> dict[str, Any]:
    """How to start a process that permission bits apply to: as ``nobody``, else root without DAC override."""
    if os.geteuid() != 0:
        return {}
    if _nobody_can_run_python():
        return {"user": "nobody", "group": "nogroup", "extra_groups": []}
    return {"preexec_fn": _drop_permission_override}


@pytest.fixture
def world(binary_model_paths) -> Iterator[tuple[Path, dict[str, Path]]]:
    """A folder any user may read and write, with a copy of the model in it."""
    folder = Path(tempfile.mkdtemp(prefix="batchscore-world-"))
    folder.chmod(0o777)
    model = {}
    for role, path in binary_model_paths.items():
        model[role] = folder / path.name
        shutil.copy(path, model[role])
        model[role].chmod(0o644)
    try:
        yield folder, model
    finally:
        for dirpath, dirnames, _ in os.walk(folder):
            for name in dirnames:
                os.chmod(os.path.join(dirpath, name), 0o755)
        shutil.rmtree(folder)


def _open_up(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


@pytest.mark.parametrize("case", ["sub-folder", "sub-sub-folder", "listable-not-enterable", "through-a-glob"])
def test_an_unreadable_folder_fails_the_job_for_an_unprivileged_user(world, unprivileged, case: str) -> None:
    folder, model = world
    root = folder / "in"
    _tree(root)
    deep = write_inputs(root / "dt=2026-11-25" / "hour=03", files=1, rows=ROWS, seed=60)[0]
    _open_up(root)
    locked, mode = {
        "sub-folder": (root / "dt=2026-11-24", 0o000),
        "sub-sub-folder": (deep.parent, 0o000),
        "listable-not-enterable": (root / "dt=2026-11-24", 0o444),
        "through-a-glob": (root / "dt=2026-11-24", 0o000),
    }[case]
    locked.chmod(mode)
    spec = root / "dt=*" / "*.parquet" if case == "through-a-glob" else root
    # the process really is refused the folder (root would not be)
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os; os.listdir({str(locked)!r}); "
            f"[os.stat(os.path.join({str(locked)!r}, n)) for n in os.listdir({str(locked)!r})]",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        **unprivileged,
    )
    assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
    out = folder / "out"
    done = subprocess.run(
        [sys.executable, "-m", "batchscore", "run", *_job([spec], out, model)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=folder,
        env={**os.environ, "HOME": str(folder)},
        **unprivileged,
    )
    assert done.returncode == EXIT_FAILURE, (done.returncode, done.stderr)
    line = _one_error(done.stderr, locked, "ermission denied")
    assert "cannot" in line
    _nothing_committed(out)


# -- what the rules skip is logged; the manifest lists exactly what was read ---------------------


def test_skip_rules_are_logged_and_the_manifest_lists_exactly_the_files_read(
    tmp_path: Path, binary_model_paths
) -> None:
    root = tmp_path / "in"
    inputs = _tree(root)
    (root / "_SUCCESS").write_text("")
    (root / ".day-09.parquet.tmp").write_bytes(b"partial")
    hidden = write_inputs(root / "_temporary" / "0", files=1, rows=ROWS, seed=70)[0]  # never data
    (root / ".hidden.parquet").write_bytes(b"not even parquet")
    (root / "README.txt").write_text("notes")
    os.mkfifo(root / "dt=2026-11-24" / "control.fifo")  # not named *.parquet: skipped by name, never opened
    out = tmp_path / "out"
    result = cli("run", *_job([root], out, binary_model_paths))
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if f"input {root}: skipped" in line]
    assert len(lines) == 1, result.stderr
    assert "4 entries whose names start with '.' or '_'" in lines[0] and str(root / "_SUCCESS") in lines[0]
    assert "2 entries not named *.parquet" in lines[0] and str(root / "README.txt") in lines[0]
    manifest = read_manifest(out)
    assert [i["uri"] for i in manifest["inputs"]] == [str(p) for p in sorted(inputs)]
    assert str(hidden) not in json.dumps(manifest)
    assert_exact(read_output(out), read_inputs(sorted(inputs)), binary_model_paths)
    # a pattern that spells the '_' itself asks for those names
    spelled = tmp_path / "spelled"
    result = cli("run", *_job([root / "_temporary" / "*" / "*.parquet"], spelled, binary_model_paths))
    assert result.exit_code == 0, result.stderr
    assert [i["uri"] for i in read_manifest(spelled)["inputs"]] == [str(hidden)]


# -- S3 ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _only_get_object(endpoint: str, bucket: str) -> Iterator[dict[str, str]]:
    """Credentials of a user allowed s3:GetObject on ``bucket`` and nothing else, with the S3
    server checking every request's credentials meanwhile."""
    import boto3
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    user = f"reader-{bucket}"
    iam.create_user(UserName=user)
    iam.put_user_policy(
        UserName=user,
        PolicyName="read-objects",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName=user)["AccessKey"]
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = ActionAuthenticatorMixin.request_count  # from now on, every request
    try:
        yield {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before


def _s3_job(spec: str, out: Path, model: dict[str, Path], options: dict[str, str]) -> list[str]:
    extra = []
    for name, value in options.items():
        extra += ["--storage-option", f"{name}={value}"]
    return _job([spec], out, model, "--storage-retries", "0", *extra)


def test_an_s3_listing_that_is_refused_fails_the_job(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    inputs = write_inputs(tmp_path / "in", files=2, rows=ROWS)
    for path in inputs:
        fs.put_file(str(path), f"{bucket}/in/dt=2026-11-24/{path.name}")
    out = tmp_path / "out"
    with _only_get_object(options["endpoint_url"], bucket) as reader:
        for spec, listed in (
            (f"s3://{bucket}/in/", "in/"),
            (f"s3://{bucket}/in", "in/"),
            (f"s3://{bucket}/in/*/*.parquet", "in/"),
            (f"s3://{bucket}", ""),
        ):
            _refused(
                _s3_job(spec, out, binary_model_paths, {**options, **reader}),
                out,
                EXIT_FAILURE,
                f"cannot list input s3://{bucket}/{listed}:",
                "Access Denied",
            )
        # a file named by its key needs no listing: GetObject alone reads it
        named = f"s3://{bucket}/in/dt=2026-11-24/{inputs[1].name}"
        result = cli("run", *_s3_job(named, out, binary_model_paths, {**options, **reader}))
        assert result.exit_code == 0, result.stderr
        assert [i["uri"] for i in read_manifest(out)["inputs"]] == [named]


def test_s3_missing_bucket_markers_and_folder_named_like_a_file(tmp_path: Path, s3, binary_model_paths) -> None:
    fs, bucket, options = s3
    inputs = write_inputs(tmp_path / "in", files=2, rows=ROWS)
    base = f"{bucket}/in"
    for path in inputs:
        fs.put_file(str(path), f"{base}/dt=2026-11-24/{path.name}")
    out = tmp_path / "out"
    missing = f"s3://{bucket}-gone/in/"
    _refused(_s3_job(missing, out, binary_model_paths, options), out, EXIT_INPUT, "input not found", missing)
    # folder markers (empty keys ending in '/') are folders; _SUCCESS is skipped; both are logged
    fs.call_s3("put_object", Bucket=bucket, Key="in/", Body=b"")
    fs.call_s3("put_object", Bucket=bucket, Key="in/dt=2026-11-24/", Body=b"")
    fs.pipe_file(f"{base}/dt=2026-11-24/_SUCCESS", b"")
    result = cli("run", *_s3_job(f"s3://{base}/", out, binary_model_paths, options))
    assert result.exit_code == 0, result.stderr
    assert [i["uri"] for i in read_manifest(out)["inputs"]] == [f"s3://{base}/dt=2026-11-24/{p.name}" for p in inputs]
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "2 folder marker objects" in skipped[0] and "_SUCCESS" in skipped[0], result.stderr
    # a key ending in '/' that holds bytes is no file and no folder
    fs.call_s3("put_object", Bucket=bucket, Key="in/dt=2026-11-25/", Body=b"PAR1 data")
    out2 = tmp_path / "out2"
    _refused(
        _s3_job(f"s3://{base}/", out2, binary_model_paths, options),
        out2,
        EXIT_INPUT,
        f"s3://{base}/dt=2026-11-25/",
        "ends in '/'",
    )
    fs.call_s3("delete_object", Bucket=bucket, Key="in/dt=2026-11-25/")
    # a folder named *.parquet (Spark's layout) is not one file
    fs.put_file(str(inputs[0]), f"{base}/dt=2026-11-26/x.parquet/part-0.parquet")
    for spec in (f"s3://{base}/", f"s3://{base}/*/*.parquet"):
        _refused(
            _s3_job(spec, out2, binary_model_paths, options), out2, EXIT_INPUT, f"s3://{base}/dt=2026-11-26/x.parquet"
        )


# -- the output schema is a contract ---------------------------------------------------------------


def _with(table: pa.Table, name: str, array: pa.Array) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, name, array) if index >= 0 else table.append_column(name, array)


def _seen(n: int, unit: str = "us", tz: str | None = None) -> pa.Array:
    return pa.array([1_764_547_200_000_000 + i * 1_000 for i in range(n)], pa.timestamp("us")).cast(
        pa.timestamp(unit, tz)
    )


def _base(table: pa.Table) -> pa.Table:
    return _with(table, "seen_at", _seen(table.num_rows))


CHANGES = {
    # name: (how the later file differs, the column named, words of the message)
    "extra-column": (lambda t: t.append_column("note", pa.array(["x"] * t.num_rows)), "note", "extra column"),
    "missing-column": (lambda t: t.drop(["region"]), "region", "missing"),
    "int64-to-string": (
        lambda t: _with(t, "customer_id", pa.array([str(v) for v in t["customer_id"].to_pylist()])),
        "customer_id",
        "has type string",
    ),
    "int64-to-int32": (lambda t: _with(t, "customer_id", t["customer_id"].cast(pa.int32())), "customer_id", "int32"),
    "timestamp-unit": (lambda t: _with(t, "seen_at", _seen(t.num_rows, "ms")), "seen_at", "timestamp[ms]"),
    "timestamp-zone": (lambda t: _with(t, "seen_at", _seen(t.num_rows, "us", "UTC")), "seen_at", "tz=UTC"),
    "dictionary": (lambda t: _with(t, "region", t["region"].dictionary_encode()), "region", "dictionary"),
    "feature-int-to-float": (lambda t: _with(t, "tenure", t["tenure"].cast(pa.float64())), "tenure", "has type double"),
}


def _schema_inputs(root: Path, change: Any) -> list[Path]:
    inputs = write_inputs(root, files=3, rows=ROWS, row_group_size=112)
    for path in inputs:
        pq.write_table(_base(pq.read_table(path)), path, row_group_size=112)
    pq.write_table(change(pq.read_table(inputs[2])), inputs[2], row_group_size=112)
    return inputs


@pytest.mark.parametrize("mode", ["run", "plan", "shard"])
@pytest.mark.parametrize("case", sorted(CHANGES))
def test_a_later_file_that_breaks_the_schema_is_refused(
    tmp_path: Path, binary_model_paths, case: str, mode: str
) -> None:
    change, column, words = CHANGES[case]
    inputs = _schema_inputs(tmp_path / "in", change)
    out = tmp_path / "out"
    args = _job([tmp_path / "in"], out, binary_model_paths)
    command = {
        "run": ["run"],
        "plan": ["plan", "--shards", "2", "--out", str(plan_file(out))],
        "shard": ["run", "--shard", "1/2"],
    }[mode]
    result = cli(*command, *args)
    assert result.exit_code == EXIT_INPUT, (result.exit_code, result.stderr)
    _one_error(
        result.stderr,
        inputs[2],
        f"'{column}'"
        if "type" in words or "int32" in words or "timestamp" in words or "tz" in words or "dictionary" in words
        else column,
        words,
    )
    _nothing_committed(out)
    assert not plan_file(out).exists()


def test_a_feature_of_another_type_is_refused_even_when_not_kept(tmp_path: Path, binary_model_paths) -> None:
    inputs = _schema_inputs(tmp_path / "in", CHANGES["feature-int-to-float"][0])
    out = tmp_path / "out"
    _refused(
        _job([tmp_path / "in"], out, binary_model_paths, "--keep", "customer_id"),
        out,
        EXIT_INPUT,
        inputs[2],
        "feature column 'tenure' has type double",
        "int64",
    )


def test_a_rewrite_that_keeps_the_identity_is_caught_by_the_schema_at_the_shard(
    tmp_path: Path, binary_model_paths
) -> None:
    """A file rewritten with an extra column but the same size, inode and mtime passes the identity
    check; the shard still refuses it, from its footer, before scoring a row."""
    inputs = write_inputs(tmp_path / "in", files=2, rows=ROWS, row_group_size=112)
    original = pq.read_table(inputs[1])
    pq.write_table(original.replace_schema_metadata({b"pad": b"x" * 8192}), inputs[1])  # room to fill
    size = inputs[1].stat().st_size
    scratch, width = tmp_path / "scratch.parquet", 0
    for _ in range(8):  # a first value of the width that gives the same size (plain, uncompressed, no statistics)
        note = pa.array(["n" * width] + [""] * (ROWS - 1))
        pq.write_table(
            original.append_column("note", note),
            scratch,
            compression="none",
            use_dictionary=False,
            write_statistics=False,
        )
        gap = size - scratch.stat().st_size
        if gap == 0:
            break
        width += gap
    assert scratch.stat().st_size == size
    out = tmp_path / "out"
    args = _job([tmp_path / "in"], out, binary_model_paths)
    assert cli("plan", "--shards", "2", "--out", plan_file(out), *args).exit_code == 0
    before = inputs[1].stat()
    with open(inputs[1], "r+b") as fh:  # same inode
        fh.write(scratch.read_bytes())
    os.utime(inputs[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    after = inputs[1].stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == (before.st_size, before.st_ino, before.st_mtime_ns)
    result = cli("run", *args, "--plan", plan_file(out), "--shard", "1")
    assert result.exit_code == EXIT_INPUT, result.stderr
    _one_error(result.stderr, inputs[1], "extra column(s) note")
    assert not (out / "part-00001-00000.parquet").exists()
    result = cli("commit", *args, "--plan", plan_file(out))
    assert result.exit_code != 0
    _nothing_committed(out)


def test_what_the_contract_allows(tmp_path: Path, binary_model_paths) -> None:
    """Reordered columns (matched by name), nullability, and with --keep columns never asked for."""
    root = tmp_path / "in"
    inputs = write_inputs(root, files=3, rows=ROWS, row_group_size=112)
    first = pq.read_table(inputs[0])
    strict = pa.schema([f.with_nullable(f.name != "region") for f in first.schema])
    pq.write_table(first.cast(strict), inputs[0])  # non-nullable columns in the first file
    later = pq.read_table(inputs[1])
    ids = pa.array([None if i % 7 == 0 else v for i, v in enumerate(later["customer_id"].to_pylist())])
    later = _with(later, "customer_id", ids)
    pq.write_table(
        later.select(list(reversed(later.column_names))), inputs[1]
    )  # reordered, nulls where the first forbade them
    out = tmp_path / "out"
    result = cli("run", *_job([root], out, binary_model_paths))
    assert result.exit_code == 0, result.stderr
    table = read_output(out)
    assert table.column_names[: first.num_columns] == first.column_names
    expected = pa.concat_tables([pq.read_table(p).select(first.column_names).cast(first.schema) for p in inputs])
    assert_exact(table, expected, binary_model_paths)
    assert table["customer_id"].null_count == later["customer_id"].null_count > 0
    # with --keep, a later file's extra column was never asked for
    pq.write_table(pq.read_table(inputs[2]).append_column("note", pa.array(["n"] * ROWS)), inputs[2])
    kept = tmp_path / "kept"
    result = cli("run", *_job([root], kept, binary_model_paths, "--keep", "customer_id,region"))
    assert result.exit_code == 0, result.stderr
    assert read_output(kept).column_names[:2] == ["customer_id", "region"]
    result = cli("run", *_job([root], tmp_path / "all", binary_model_paths))
    assert result.exit_code == EXIT_INPUT and "extra column(s) note" in result.stderr
    assert stat.S_ISREG(inputs[2].stat().st_mode)  # input untouched
