"""Load model artifacts, check they can score, and describe what they expect and produce.

A joblib (pickle) artifact runs whatever code it names while it is unpickled, so every artifact's
bytes are read once, checked against the job's pins and allowed formats, and only then
deserialized, from those same bytes. A ``.skops`` artifact never reaches pickle: skops.io builds
only the types it trusts and the types the job allows by name.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..config import FIELDS, StorageSettings
from ..errors import ModelError, param
from ..io.storage import read_bytes, resolve
from ..schema import to_argv
from .registry import is_registry_uri, resolve_model

if TYPE_CHECKING:
    from ..config import JobConfig

JOBLIB = "joblib"
SKOPS = "skops"


def artifact_format(uri: str) -> str:
    """How an artifact is read, decided by its name alone, so a ``.skops`` file never reaches pickle."""
    return SKOPS if uri.lower().endswith(".skops") else JOBLIB


@dataclass(frozen=True)
class Artifact:
    """One file the predictions depend on, identified by content."""

    role: str
    uri: str
    sha256: str
    bytes: int
    format: str = JOBLIB
    #: For a registry URI, what it resolved to (see ``registry.resolve_model``): name, alias,
    #: version, run id, source and the sha256 of every file of that version.
    registry: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        entry = {"role": self.role, "uri": self.uri, "format": self.format, "sha256": self.sha256, "bytes": self.bytes}
        return {**entry, "registry": dict(self.registry)} if self.registry else entry

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Artifact:
        """An artifact as a plan recorded it (plans made before formats were recorded name none)."""
        uri = entry["uri"]
        fmt = entry.get("format") or artifact_format(uri)
        return cls(entry["role"], uri, entry["sha256"], entry["bytes"], fmt, entry.get("registry"))


@dataclass(frozen=True)
class Pin:
    """A digest an artifact must have before its bytes are deserialized, and what a mismatch means."""

    sha256: str
    mismatch: str  # completes "<role> artifact <uri> ..."
    hint: str = ""


@dataclass(frozen=True)
class ArtifactPolicy:
    """What an artifact's bytes must satisfy before they are deserialized: its pins, and whether
    pickle may be used at all; plus the types a ``.skops`` artifact may hold beyond skops' own."""

    pins: Mapping[str, tuple[Pin, ...]] = field(default_factory=dict)  # by role
    trusted_types: tuple[str, ...] = ()
    allow_pickle: bool = True
    #: By role, what a plan's registry URI resolved to: a later step fetches that version again
    #: instead of resolving the alias anew (see ``registry.resolve_model``).
    planned: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, config: JobConfig) -> ArtifactPolicy:
        pins = {
            role: (Pin(digest, f"does not match its pinned digest (--{role}-sha256 / {role}_sha256)"),)
            for role, digest in (("model", config.model_sha256), ("scaler", config.scaler_sha256))
            if digest
        }
        for entry in config.models:  # a challenger's pins, from its models: entry
            for role, key, digest in zip(
                challenger_roles(entry.name), ROLES, (entry.model_sha256, entry.scaler_sha256)
            ):
                if digest:
                    pins[role] = (Pin(digest, f"does not match its pinned digest (models: {entry.name} {key}_sha256)"),)
        return cls(pins, tuple(config.trusted_types), config.allow_pickle)

    def with_plan(self, planned: Sequence[Mapping[str, Any]], plan_id: str, roles: Sequence[str]) -> ArtifactPolicy:
        """Also require the digests a plan recorded: a shard scores with the plan's model or not at all."""
        planned_roles = [entry["role"] for entry in planned]
        if sorted(planned_roles) != sorted(roles):
            raise ModelError(
                f"plan {plan_id} was made with artifact(s) {', '.join(planned_roles)} but this job gives "
                f"{', '.join(roles)}; plan again"
            )
        pins = dict(self.pins)
        for entry in planned:
            hint = f" (plan {plan_id}); plan again to score with it"
            pin = Pin(entry["sha256"], "changed since the plan was made", hint)
            pins[entry["role"]] = pins.get(entry["role"], ()) + (pin,)
        return replace(self.following(planned), pins=pins)

    def following(self, planned: Sequence[Mapping[str, Any]]) -> ArtifactPolicy:
        """Fetch a registry URI as the plan resolved it (its version, not the alias's current one)."""
        return replace(self, planned={e["role"]: e["registry"] for e in planned if e.get("registry")})

    def check(self, artifact: Artifact) -> None:
        """Refuse an artifact from its digest and format alone, before anything deserializes it."""
        for pin in self.pins.get(artifact.role, ()):
            if artifact.sha256 != pin.sha256:
                raise ModelError(
                    f"{artifact.role} artifact {artifact.uri} {pin.mismatch}: expected sha256 {pin.sha256}, "
                    f"got {artifact.sha256}; nothing was loaded from it{pin.hint}"
                )
        if artifact.format == JOBLIB and not self.allow_pickle:
            raise ModelError(
                f"{artifact.role} artifact {artifact.uri} is a joblib (pickle) file and pickles are not allowed "
                f"(refused by {param('allow_pickle')}); save it with skops.io.dump as a .skops file"
            )

    def check_planned(self, planned: Sequence[Mapping[str, Any]], source: str) -> None:
        """Refuse a plan made with artifacts this job would refuse (checked without reading them)."""
        for entry in planned:
            try:
                self.check(Artifact.from_dict(entry))
            except ModelError as exc:
                raise ModelError(f"plan {source}: {exc}") from None


@dataclass
class LoadedModel:
    """A ready-to-score estimator (plus optional separate scaler) and what it expects."""

    estimator: Any
    scaler: Any | None
    features: tuple[str, ...]
    is_classifier: bool
    classes: Any  # numpy array of class labels for classifiers, None for others
    has_proba: bool
    artifacts: tuple[Artifact, ...]
    sklearn_version: str  # version the estimator was saved with
    load_seconds: float = 0.0  # reading, checking and unpickling every artifact

    @property
    def final_estimator(self) -> Any:
        steps = getattr(self.estimator, "steps", None)
        return steps[-1][1] if steps else self.estimator


def fetch_artifact(
    role: str, uri: str, storage: StorageSettings | None, policy: ArtifactPolicy | None = None
) -> tuple[bytes, Artifact]:
    """Read an artifact's bytes once and check them against ``policy``: the same bytes then give
    the object, so what was checked is exactly what is loaded. A registry URI (``models:/``,
    ``runs:/``) is resolved and pinned by ``registry.resolve_model``, then checked the same way."""
    policy = policy or ArtifactPolicy()
    if is_registry_uri(uri):
        resolved = resolve_model(role, uri, storage, policy.planned.get(role))
        digest = hashlib.sha256(resolved.data).hexdigest()
        artifact = Artifact(role, uri, digest, len(resolved.data), resolved.format, resolved.provenance)
        policy.check(artifact)
        return resolved.data, artifact
    where = resolve(uri, storage)
    try:
        data = read_bytes(where.fs, where.path)
    except FileNotFoundError:
        raise ModelError(f"{role} artifact not found: {uri}") from None
    except IsADirectoryError:
        raise ModelError(f"{role} artifact is a directory, not a file: {uri}") from None
    except OSError as exc:
        raise ModelError(f"cannot read {role} artifact {uri}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    artifact = Artifact(role, where.uri, digest, len(data), artifact_format(where.path))
    policy.check(artifact)
    return data, artifact


#: The roles of a model's two artifacts: the champion's are the job's ``model`` and ``scaler``.
ROLES = ("model", "scaler")


def artifact_roles(scaler_uri: str | None) -> list[str]:
    return ["model", "scaler"] if scaler_uri else ["model"]


def challenger_roles(name: str) -> tuple[str, str]:
    """The roles of a challenger's model and scaler artifacts, as plans and manifests record them."""
    return (f"challenger:{name}:model", f"challenger:{name}:scaler")


def challenger_of(role: str) -> str | None:
    """The challenger an artifact's role belongs to (None for the champion's)."""
    return role.split(":")[1] if role.startswith("challenger:") else None


def artifact_digests(
    model_uri: str,
    scaler_uri: str | None,
    storage: StorageSettings | None,
    policy: ArtifactPolicy | None = None,
    roles: tuple[str, str] = ROLES,
) -> tuple[Artifact, ...]:
    """Each artifact's sha256 and format, checked against ``policy``, without deserializing it
    (cheap enough for a planning step, and safe on a file not yet trusted)."""
    uris = {roles[0]: model_uri, roles[1]: scaler_uri or ""}  # a role only when given
    return tuple(fetch_artifact(role, uris[role], storage, policy)[1] for role in roles[: 2 if scaler_uri else 1])


def pin_flags(artifacts: Sequence[Artifact]) -> str:
    """The flags that pin exactly these artifacts (YAML: ``model_sha256``, ``scaler_sha256``)."""
    return " ".join(flag for a in artifacts for flag in to_argv(FIELDS, {f"{a.role}_sha256": a.sha256}))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Loading the first artifact imports scikit-learn, SciPy and pandas: about a million objects
    that live as long as the process. Collecting while they are created only slows the start."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _load_joblib(artifact: Artifact, data: bytes) -> Any:
    import joblib

    try:
        return joblib.load(io.BytesIO(data))
    except Exception as exc:  # a corrupt or foreign pickle can raise nearly anything
        raise ModelError(
            f"{artifact.role} artifact {artifact.uri} could not be loaded with joblib: {type(exc).__name__}: {exc}"
        ) from None


def _load_skops(artifact: Artifact, data: bytes, trusted_types: Sequence[str]) -> Any:
    """Build the object with skops.io, refusing any type neither skops nor the job trusts.

    skops leaves out even some scikit-learn types on purpose (e.g. the tree structures of forests
    and gradient boosting, whose raw node indices a crafted file could point out of bounds), so
    those too are loaded only when named.
    """
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as exc:  # not a zip, or not skops' layout
        raise ModelError(
            f"{artifact.role} artifact {artifact.uri} is not a readable skops file: {type(exc).__name__}: {exc}"
        ) from None
    refused = [name for name in untrusted if name not in trusted_types]
    if refused:
        raise ModelError(
            f"{artifact.role} artifact {artifact.uri} holds type(s) that are not trusted: {', '.join(refused)}; "
            f"if you trust the file's source, allow each by name "
            f"({' '.join(param('trusted_types') + ' ' + name for name in refused)}, or YAML trusted_types)"
        )
    try:
        return sio.loads(data, trusted=untrusted)
    except Exception as exc:
        raise ModelError(
            f"{artifact.role} artifact {artifact.uri} could not be loaded with skops: {type(exc).__name__}: {exc}"
        ) from None


def _deserialize(artifact: Artifact, data: bytes, trusted_types: Sequence[str]) -> tuple[Any, str | None]:
    """Build an artifact's object from its checked bytes; also return the scikit-learn version it
    was saved with, if that differs from the installed one."""
    with _collector_paused():
        from sklearn.exceptions import InconsistentVersionWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InconsistentVersionWarning)
            if artifact.format == SKOPS:
                obj = _load_skops(artifact, data, trusted_types)
            else:
                obj = _load_joblib(artifact, data)
    saved_with = None
    for warning in caught:
        if issubclass(warning.category, InconsistentVersionWarning):
            saved_with = getattr(warning.message, "original_sklearn_version", None)
            warnings.warn(f"{artifact.role} artifact {artifact.uri}: {warning.message}", stacklevel=2)
    return obj, saved_with


def _check_fitted(role: str, uri: str, obj: Any, method: str) -> None:
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not hasattr(obj, method):
        raise ModelError(f"{role} artifact {uri} holds a {type(obj).__name__}, which has no {method}()")
    try:
        check_is_fitted(obj)
    except NotFittedError:
        raise ModelError(f"{role} artifact {uri} holds a {type(obj).__name__} that is not fitted") from None
    except TypeError as exc:  # not an estimator at all
        raise ModelError(f"{role} artifact {uri} is not a scikit-learn estimator: {exc}") from None


def _resolve_features(first: Any, features: Sequence[str] | None, expected: int | None, uri: str) -> tuple[str, ...]:
    """Feature columns in the order the first estimator expects them."""
    fitted_names = getattr(first, "feature_names_in_", None)
    if fitted_names is not None:
        fitted = tuple(str(n) for n in fitted_names)
        if features and set(features) != set(fitted):
            unseen = sorted(set(features) - set(fitted))
            missing = sorted(set(fitted) - set(features))
            raise ModelError(
                f"{param('features')} disagrees with the features {uri} was fitted on: "
                f"unseen at fit time: {unseen or 'none'}; fitted but not given: {missing or 'none'}"
            )
        return fitted
    if not features:
        raise ModelError(
            f"{uri} was fitted without feature names, so the feature columns must be given "
            f"(give {param('features')}, e.g. a,b,c, or YAML key 'features'), in the order used at fit time"
        )
    if expected is not None and len(features) != expected:
        raise ModelError(f"{len(features)} features given but {uri} expects {expected}: {', '.join(features)}")
    if len(set(features)) != len(features):
        raise ModelError(f"feature list names a column twice: {', '.join(features)}")
    return tuple(features)


@contextlib.contextmanager
def _probing() -> Iterator[None]:
    """Quiet, unchecked calls on a made-up row: only the shape of the answer matters."""
    import sklearn

    with sklearn.config_context(assume_finite=True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _output_width(scaler: Any) -> int | None:
    """How many columns the scaler's ``transform`` gives, from transforming one row: scikit-learn
    records no output width on most transformers (PCA, PolynomialFeatures, ...). None if unknown
    (a transformer that refuses a row of zeros is judged by the run itself)."""
    import numpy as np

    width = getattr(scaler, "n_features_in_", None)
    if width is not None:
        try:
            with _probing():
                shape: tuple[int, ...] = getattr(scaler.transform(np.zeros((1, width))), "shape", ())
            if len(shape) == 2:
                return int(shape[1])
        except Exception:
            pass
    return getattr(scaler, "n_features_out_", None) or width


def _refuse_multi_output(estimator: Any, uri: str, scaler: Any, width: int) -> None:
    """A model that predicts several values per row has no one prediction column to write."""
    import numpy as np

    classes = getattr(estimator, "classes_", None)
    outputs = getattr(estimator, "n_outputs_", 1)
    if isinstance(classes, list) or (isinstance(outputs, int) and outputs > 1):
        shape = f"{len(classes) if isinstance(classes, list) else outputs} outputs"
    else:
        try:
            with _probing():
                row = np.zeros((1, width))
                answer = estimator.predict(scaler.transform(row) if scaler is not None else row)
        except Exception:  # a model that refuses a row of zeros: the run itself will tell
            return
        if np.ndim(answer) <= 1 or np.shape(answer)[1] == 1:  # one column is one prediction per row
            return
        shape = f"{np.shape(answer)[1]} outputs"
    raise ModelError(
        f"model {uri} is a multi-output {type(estimator).__name__} ({shape} per row); batchscore writes one "
        f"prediction per row: save one model per output and score each separately"
    )


def load_model(
    model_uri: str,
    scaler_uri: str | None = None,
    features: Sequence[str] | None = None,
    storage: StorageSettings | None = None,
    policy: ArtifactPolicy | None = None,
    roles: tuple[str, str] = ROLES,
) -> LoadedModel:
    """Load and check the artifacts before any row is read, so a bad model costs no I/O.

    Both artifacts pass ``policy`` before either is deserialized: a swapped scaler must not
    get to run code because the model was fine. ``roles`` name the two artifacts (and pick their
    pins): the champion's are ``model`` and ``scaler``, a challenger's its own (``challenger_roles``).
    """
    started = time.perf_counter()
    policy = policy or ArtifactPolicy()
    data, model_artifact = fetch_artifact(roles[0], model_uri, storage, policy)
    scaler_data, scaler_artifact = fetch_artifact(roles[1], scaler_uri, storage, policy) if scaler_uri else (b"", None)
    estimator, saved_with = _deserialize(model_artifact, data, policy.trusted_types)
    _check_fitted(roles[0], model_artifact.uri, estimator, "predict")
    artifacts = [model_artifact]
    scaler = None
    if scaler_artifact is not None:
        scaler, _ = _deserialize(scaler_artifact, scaler_data, policy.trusted_types)
        _check_fitted(roles[1], scaler_artifact.uri, scaler, "transform")
        artifacts.append(scaler_artifact)
        n_scaler = _output_width(scaler)
        n_model = getattr(estimator, "n_features_in_", None)
        if n_scaler is not None and n_model is not None and n_scaler != n_model:
            raise ModelError(
                f"feature-count mismatch: scaler {scaler_artifact.uri} produces {n_scaler} features "
                f"but model {model_artifact.uri} expects {n_model}"
            )
    first, first_uri = (scaler, artifacts[1].uri) if scaler is not None else (estimator, model_artifact.uri)
    names = _resolve_features(first, features, getattr(first, "n_features_in_", None), first_uri)
    _refuse_multi_output(estimator, model_artifact.uri, scaler, len(names))

    import sklearn
    from sklearn.base import is_classifier

    classifier = bool(is_classifier(estimator))
    classes = getattr(estimator, "classes_", None) if classifier else None
    if classifier and classes is None:
        raise ModelError(f"model {model_artifact.uri} is a classifier without classes_")
    return LoadedModel(
        estimator=estimator,
        scaler=scaler,
        features=names,
        is_classifier=classifier,
        classes=classes,
        has_proba=classifier and hasattr(estimator, "predict_proba"),
        artifacts=tuple(artifacts),
        sklearn_version=saved_with or sklearn.__version__,
        load_seconds=time.perf_counter() - started,
    )


#: How many loaded models one process keeps (``load_model_kept``): the jobs one Spark executor runs.
KEPT_MODELS = 4
_kept: dict[tuple[Any, ...], LoadedModel] = {}
_kept_lock = threading.Lock()
_kept_loads = 0


def load_model_kept(
    model_uri: str,
    scaler_uri: str | None = None,
    features: Sequence[str] | None = None,
    storage: StorageSettings | None = None,
    policy: ArtifactPolicy | None = None,
) -> LoadedModel:
    """``load_model``, kept in this process for the next call that asks for the same artifacts: a
    Spark executor's Python worker scores many tasks, and loads the model once for all of them.

    Kept only when ``policy`` pins every artifact: the key is the pinned digests with the URIs,
    the features, the formats allowed and every storage setting (options and bounds), so a kept
    model is always one whose bytes were checked against these pins, in this process, before
    anything deserialized them. Unpinned artifacts are loaded on every call (their bytes may change).
    """
    global _kept_loads
    policy = policy or ArtifactPolicy()
    roles = ["model", "scaler"] if scaler_uri else ["model"]
    if not all(policy.pins.get(role) for role in roles):
        return load_model(model_uri, scaler_uri, features, storage, policy)
    settings = storage or StorageSettings()
    key = (
        model_uri,
        scaler_uri,
        tuple(features) if features is not None else None,
        tuple(sorted((role, tuple(sorted({p.sha256.lower() for p in pins}))) for role, pins in policy.pins.items())),
        tuple(policy.trusted_types),
        policy.allow_pickle,
        json.dumps(dict(settings.options), sort_keys=True, default=str),
        settings.timeout,
        settings.retries,
        settings.throttle_seconds,
    )
    with _kept_lock:  # one load at a time: two tasks of one worker never load the same model twice
        found = _kept.get(key)
        if found is not None:
            return replace(found, load_seconds=0.0)
        model = load_model(model_uri, scaler_uri, features, storage, policy)
        _kept_loads += 1
        while len(_kept) >= KEPT_MODELS:
            del _kept[next(iter(_kept))]  # the oldest
        _kept[key] = model
        return model


def kept_loads() -> int:
    """How many times this process has loaded artifacts from their bytes for ``load_model_kept``."""
    return _kept_loads


def describe(model: LoadedModel) -> dict[str, Any]:
    """What ``batchscore inspect`` prints: enough to know what a run would produce."""
    import sklearn

    final = model.final_estimator
    steps = getattr(model.estimator, "steps", None)
    return {
        "type": type(model.estimator).__name__,
        "final_estimator": type(final).__name__,
        "pipeline_steps": [name for name, _ in steps] if steps else None,
        "scaler": type(model.scaler).__name__ if model.scaler is not None else None,
        "task": "classification" if model.is_classifier else "regression",
        "features": list(model.features),
        "classes": [c.item() if hasattr(c, "item") else c for c in model.classes]
        if model.classes is not None
        else None,
        "predict_proba": model.has_proba,
        "saved_with_sklearn": model.sklearn_version,
        "installed_sklearn": sklearn.__version__,
        "artifacts": [a.to_dict() for a in model.artifacts],
        "pin": pin_flags(model.artifacts),
    }
