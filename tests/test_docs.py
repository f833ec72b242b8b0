"""The docs: generated tables are not stale, and every relative link reaches a file and heading."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PAGES = sorted((REPO / "docs").glob("*.md"))
#: The Markdown files a reader of the repository meets: the README and every page of docs/.
MARKDOWN = [REPO / "README.md", *PAGES]
COG_MARKER = "[[[cog"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def prose(text: str) -> str:
    """The text outside code blocks and inline code, where links and headings live."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces as hyphens, and
    ``-1``, ``-2`` ... after a heading's repeats."""
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", FENCE.sub("", path.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def test_every_page_is_markdown_and_listed_in_the_index() -> None:
    names = {page.name for page in PAGES}
    assert {
        "index.md",
        "commands.md",
        "configuration.md",
        "output.md",
        "safety.md",
        "monitoring.md",
        "airflow.md",
        "library.md",
    } <= names
    index = (REPO / "docs" / "index.md").read_text()
    assert [name for name in sorted(names - {"index.md"}) if f"]({name})" not in index] == []


def test_generated_tables_are_not_stale() -> None:
    """``cog --check`` over every file with cog blocks: a declaration changed since ``make docs``
    fails here, with the diff."""
    generated = {path.name for path in MARKDOWN if COG_MARKER in path.read_text()}
    assert {"commands.md", "configuration.md", "airflow.md", "monitoring.md"} <= generated
    files = [str(path) for path in MARKDOWN]
    done = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", "--diff", "--check-fail-msg", "run `make docs`", *files],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]


def test_cog_check_fails_on_a_stale_table(tmp_path: Path) -> None:
    """The check above can fail: a table edited by hand (or left behind by a declaration) is stale."""
    page = (REPO / "docs" / "configuration.md").read_text()
    assert "| `batch_size` | `--batch-size` |" in page
    stale = tmp_path / "configuration.md"
    stale.write_text(page.replace("| `batch_size` | `--batch-size` |", "| `batch_size` | `--batch-rows` |", 1))
    done = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", str(stale)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode != 0 and "configuration.md" in done.stdout + done.stderr


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_reach_a_file_and_heading(path: Path) -> None:
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert broken == []


def test_the_anchor_rules_match_githubs() -> None:
    page = REPO / "docs" / "airflow.md"
    assert {"the-dag-section", "running-it-locally", "reruns-and-backfills", "container"} <= anchors(page)
    assert "batchscore-run" in anchors(REPO / "docs" / "commands.md")


def test_readme_is_a_first_read() -> None:
    """The README is what a newcomer needs first; the reference lives in docs/."""
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for needed in ("make run", "make test", "make test-fast", "```python", "dag:", "docs/index.md"):
        assert needed in text, needed


def test_job_file_examples_are_valid() -> None:
    """Every YAML job file the README and docs show passes the checks its scheduler or ``run`` makes."""
    from batchscore.config import load_yaml, validate_settings
    from batchscore.orchestration.dagspec import parse_job

    checked = []
    for path in MARKDOWN:
        for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), re.S):
            data = load_yaml(block)
            if not isinstance(data, dict) or not {"input", "output"} <= set(data):
                continue  # not a job file (an alert rule)
            if "dag" in data:
                assert parse_job(f"{path.name}.yaml", data).dag_id.startswith("batchscore_")
            else:
                validate_settings(data)
            checked.append(path.name)
    assert {"README.md", "airflow.md", "configuration.md"} <= set(checked), checked
