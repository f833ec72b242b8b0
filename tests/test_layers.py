"""The package's layers: each sub-package imports only from the layers below it, never up.

Read from the code's own import statements (those inside functions too), so a new import that
climbs a layer fails here, naming the module and the line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "batchscore"

#: Lowest first. A module may import its own layer and those below it.
LAYERS = {
    "errors": 0,
    "logs": 0,
    "strict_yaml": 0,
    "schema": 0,
    "config": 0,
    "io": 1,
    "models": 2,
    "observe": 3,
    "job": 4,
    "orchestration": 4,
    "api": 5,
    "sample": 5,
    "spark": 5,
    "cli": 6,
    "__main__": 6,
    "__init__": 6,
    "reference": 7,  # renders the docs' tables from every declaration, the CLI's included
    "spark.submit": 6,  # the script spark-submit runs: the CLI's `spark` command
}


def layer_of(module: str) -> tuple[str, int]:
    """``batchscore.io.storage`` -> (``io``, 1); a module with a layer of its own (``spark.submit``) has that."""
    own = ".".join(module.split(".")[1:3])
    part = own if own in LAYERS else module.split(".")[1] if "." in module else "__init__"
    return part, LAYERS[part]


def imports(path: Path) -> list[tuple[int, str]]:
    """Every batchscore module ``path`` imports, with the line, relative imports resolved."""
    name = "batchscore." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
            found += [(node.lineno, t) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, t) for line, t in found if t == "batchscore" or t.startswith("batchscore.")]


def test_every_module_has_a_layer() -> None:
    tops = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert tops <= set(LAYERS), f"give these a layer in LAYERS: {sorted(tops - set(LAYERS))}"


def test_no_import_climbs_a_layer() -> None:
    climbs = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = "batchscore." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        here, rank = layer_of(module)
        for line, target in imports(path):
            if target == "batchscore.__version__":  # set first thing in __init__, from the installed metadata
                continue
            there, other = layer_of(target) if target != "batchscore" else ("__init__", LAYERS["__init__"])
            if other > rank:
                climbs.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})")
    assert not climbs, "imports that climb a layer:\n" + "\n".join(climbs)


def test_only_orchestration_imports_airflow() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "orchestration":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            )
            found += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] == "airflow"]
    assert not found, found


@pytest.mark.parametrize("module", ["batchscore", "batchscore.config", "batchscore.orchestration.dagspec"])
def test_importing_loads_no_data_stack(module: str) -> None:
    """The package, the settings and the DAG's declarations load without the data stack or storage."""
    heavy = (
        "pyarrow",
        "pandas",
        "sklearn",
        "joblib",
        "fsspec",
        "s3fs",
        "airflow",
        "mlflow",
        "batchscore.io.storage",
        "batchscore.job.pool",
    )
    probe = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
