"""Resolve a model registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/RUN_ID/PATH``) to one pinned artifact: the bytes of its estimator file and where they came from.

An alias is a pointer that moves: a job resolves it once, records the version it found and the
sha256 of every file of that version, and every later step of the job (a shard, a retry, the
commit) asks for that version, not the alias, and checks the digests again. MLflow is only a
transport here: batchscore reads the model directory's ``MLmodel`` to find the estimator file and
how it was serialized, then loads those bytes itself (``artifacts``), under the job's pins and
trusted types. The ``skops_trusted_types`` MLflow writes into ``MLmodel`` are whatever the file's
author chose to trust and are never read (GHSA-w582-9x45-8mpx). mlflow is imported only here,
only when a job names such a URI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import REGISTRY_ENV, StorageSettings
from ..errors import ConfigError, ModelError, StorageError, param

SCHEMES = ("models:/", "runs:/")
_MODELS = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")
_RUNS = re.compile(r"runs:/(?P<run>[0-9A-Za-z_-]+)/(?P<path>.+)")
#: How MLflow's scikit-learn flavour says its estimator file was written, and how batchscore reads it.
SERIALIZATIONS = {"skops": "skops", "pickle": "joblib", "cloudpickle": "joblib"}
#: MLflow's answers that mean "no such model, version, alias or run": the job's reference is wrong.
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
#: The most retries MLflow's HTTP client accepts (its _MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT).
MAX_RETRIES = 10


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(SCHEMES)


@dataclass(frozen=True)
class Reference:
    """A registry URI taken apart: a registered model by alias or version, or a run's artifact."""

    uri: str
    name: str | None = None
    alias: str | None = None
    version: str | None = None
    run_id: str | None = None
    path: str | None = None

    @classmethod
    def parse(cls, role: str, uri: str) -> Reference:
        models, runs = _MODELS.fullmatch(uri), _RUNS.fullmatch(uri)
        if models:
            return cls(uri, name=models["name"], alias=models["alias"], version=models["version"])
        if runs and ".." not in runs["path"].split("/"):
            return cls(uri, run_id=runs["run"], path=runs["path"].strip("/"))
        raise ConfigError(
            f"{role} {uri!r} is not a registry URI batchscore reads: give models:/NAME@ALIAS, "
            f"models:/NAME/VERSION or runs:/RUN_ID/PATH"
        )


@dataclass(frozen=True)
class Resolved:
    """A registry URI pinned: the estimator file's bytes, how to read them, and their provenance."""

    data: bytes
    format: str  # "joblib" or "skops", as artifacts.py reads them
    provenance: dict[str, Any]  # reference, name, alias, version, run_id, source, file, files {path: sha256}


def registry_of(storage: StorageSettings | None) -> str | None:
    return (storage.registry_uri if storage else None) or os.environ.get(REGISTRY_ENV) or None


@contextlib.contextmanager
def _bounded(storage: StorageSettings | None) -> Iterator[None]:
    """Every HTTP request MLflow makes here is held to the job's storage bounds: a registry that is
    down or stalled fails a call within (retries + 1) x timeout + 2^retries - 1 seconds, as storage does."""
    settings = storage or StorageSettings()
    bounds = {  # MLflow takes whole seconds, and refuses more than MAX_RETRIES retries
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(settings.timeout))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(min(settings.retries, MAX_RETRIES)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    }
    saved = {key: os.environ.get(key) for key in bounds}
    os.environ.update(bounds)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _client(role: str, uri: str, registry: str | None) -> Any:
    if not registry:
        raise ConfigError(
            f"{role} {uri} is a registry URI but no registry is given: give {param('registry_uri')} "
            f"(YAML registry_uri) or set {REGISTRY_ENV}"
        )
    if registry.startswith("sqlite:///"):
        path = registry[len("sqlite:///") :]
        if not os.path.isfile(path):  # SQLite would create an empty registry and find nothing in it
            raise ConfigError(f"registry {registry}: no such file {path}")
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError(
            f"{role} {uri} is a registry URI, which needs MLflow's client: pip install 'batchscore[mlflow]'"
        ) from None
    return MlflowClient(tracking_uri=registry, registry_uri=registry)


def _failure(role: str, what: str, registry: str, exc: Exception) -> Exception:
    """A reference that names nothing is the model's fault (exit 4); anything else, the registry's (exit 1)."""
    code = getattr(exc, "error_code", None)
    message = _shown(str(getattr(exc, "message", exc)).splitlines()[0])
    message = message if len(message) <= 300 else message[:299] + "…"
    if code in NOT_FOUND:
        return ModelError(f"{role} {what}: not found in registry {_shown(registry)} ({message})")
    return StorageError(f"{role} {what}: registry {_shown(registry)} did not answer: {type(exc).__name__}: {message}")


def _digests(root: str) -> dict[str, str]:
    """The sha256 of every file under ``root``, by its path relative to it."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            found[os.path.relpath(path, root).replace(os.sep, "/")] = digest.hexdigest()
    return dict(sorted(found.items()))


def _estimator_file(role: str, uri: str, local: str) -> tuple[str, str]:
    """The estimator file of a downloaded artifact (relative path) and its format: the file itself,
    or, for an MLflow model directory, the one its scikit-learn flavour names."""
    if os.path.isfile(local):
        name = os.path.basename(local)
        return name, "skops" if name.lower().endswith(".skops") else "joblib"
    mlmodel = os.path.join(local, "MLmodel")
    if not os.path.isfile(mlmodel):
        raise ModelError(f"{role} {uri} is a folder without an MLmodel file: not an MLflow model")
    import yaml

    try:
        with open(mlmodel, "rb") as fh:
            flavors = (yaml.safe_load(fh) or {}).get("flavors") or {}
    except (yaml.YAMLError, AttributeError) as exc:
        raise ModelError(f"{role} {uri}: its MLmodel file is not readable: {exc}") from None
    sklearn = flavors.get("sklearn")
    if not isinstance(sklearn, Mapping):
        raise ModelError(
            f"{role} {uri} is an MLflow model of flavour(s) {', '.join(map(str, flavors)) or 'none'}, not "
            f"scikit-learn: batchscore scores only scikit-learn models (a pyfunc model runs its own code)"
        )
    serialization = sklearn.get("serialization_format", "cloudpickle")
    path = str(sklearn.get("pickled_model") or "")
    if serialization not in SERIALIZATIONS or not path or path.startswith("/") or ".." in path.split("/"):
        raise ModelError(
            f"{role} {uri}: its scikit-learn flavour names model file {path!r} serialized as {serialization!r}; "
            f"batchscore reads a file inside the model folder written with {', '.join(SERIALIZATIONS)}"
        )
    return posixpath.normpath(path), SERIALIZATIONS[serialization]


def resolve_model(
    role: str, uri: str, storage: StorageSettings | None = None, planned: Mapping[str, Any] | None = None
) -> Resolved:
    """The one way a registry URI becomes bytes: resolve it (an alias to a version), download that
    version, hash every file and return the estimator file's bytes with the provenance.

    ``planned`` is the provenance a plan recorded for this role: when it was made from this very
    URI, its version is fetched instead of resolving the alias again, and every file must still
    have its planned digest, so every step of a job scores what its plan pinned.
    """
    ref = Reference.parse(role, uri)
    registry = registry_of(storage)
    client = _client(role, uri, registry)
    assert registry is not None
    follow = planned if planned and planned.get("reference") == uri else None
    import mlflow.artifacts

    with _bounded(storage):
        if ref.name is not None:
            what = f"{uri} (registered model {ref.name!r}, " + (
                f"alias {ref.alias!r})" if ref.alias else f"version {ref.version})"
            )
            try:
                if follow:
                    version = str(follow["version"])
                elif ref.alias:
                    version = str(client.get_model_version_by_alias(ref.name, ref.alias).version)
                else:
                    version = str(ref.version)
                found = client.get_model_version(ref.name, version)
                source, run_id = found.source, found.run_id
                download = client.get_model_version_download_uri(ref.name, version)
            except Exception as exc:  # MLflow raises MlflowException, requests' and urllib3's errors
                raise _failure(role, what, registry, exc) from None
        else:
            what, version, source, run_id, download = uri, None, uri, ref.run_id, uri
            try:
                client.get_run(ref.run_id)
            except Exception as exc:
                raise _failure(role, f"{uri} (run {ref.run_id})", registry, exc) from None
        with tempfile.TemporaryDirectory(prefix="batchscore-registry-") as folder:
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=download, dst_path=folder, tracking_uri=registry, registry_uri=registry
                )
            except Exception as exc:
                raise _failure(role, f"{what}: downloading {download}", registry, exc) from None
            file, fmt = _estimator_file(role, uri, local)
            root = local if os.path.isdir(local) else os.path.dirname(local)
            files = _digests(root)
            if file not in files:
                raise ModelError(f"{role} {uri}: its MLmodel names model file {file}, which the folder lacks")
            with open(os.path.join(root, file), "rb") as fh:
                data = fh.read()
    provenance = {
        "reference": uri,
        "registry": _shown(registry),
        "name": ref.name,
        "alias": ref.alias,
        "version": version,
        "run_id": run_id,
        "source": source,
        "file": file,
        "files": files,
    }
    if follow and follow.get("files") != files:
        changed = sorted(p for p in {*files, *follow.get("files", {})} if files.get(p) != follow["files"].get(p))
        raise ModelError(
            f"{role} {uri} version {version} changed since the plan was made (file(s) {', '.join(changed)} "
            f"differ from their planned sha256); nothing was loaded from it; plan again"
        )
    return Resolved(data, fmt, provenance)


def pinned_uri(uri: str, provenance: Mapping[str, Any] | None) -> str:
    """The URI that names what ``uri`` resolved to: ``models:/NAME/VERSION`` for a registered model
    (an alias may move; a version does not), else ``uri`` itself. For a process that resolves again."""
    if provenance and provenance.get("name") and provenance.get("version"):
        return f"models:/{provenance['name']}/{provenance['version']}"
    return uri


def _shown(registry: str) -> str:
    """The registry as a manifest may show it: without any user:password in an http URL."""
    return re.sub(r"//[^/@]*@", "//", registry)
