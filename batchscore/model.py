"""Load model artifacts, check they can score, and describe what they expect and produce."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from .errors import ModelError
from .storage import filesystem, full_uri, read_bytes


@dataclass(frozen=True)
class Artifact:
    """One file the predictions depend on, identified by content."""

    role: str
    uri: str
    sha256: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "uri": self.uri, "sha256": self.sha256, "bytes": self.bytes}


@dataclass
class LoadedModel:
    """A ready-to-score estimator (plus optional separate scaler) and what it expects."""

    estimator: Any
    scaler: Any | None
    features: tuple[str, ...]
    is_classifier: bool
    classes: Any | None  # numpy array of class labels for classifiers
    has_proba: bool
    artifacts: tuple[Artifact, ...]
    sklearn_version: str  # version the estimator was saved with

    @property
    def final_estimator(self) -> Any:
        steps = getattr(self.estimator, "steps", None)
        return steps[-1][1] if steps else self.estimator


def fetch_artifact(role: str, uri: str, storage_options: Mapping[str, Any] | None) -> tuple[bytes, Artifact]:
    """Read an artifact's bytes once: they give both its sha256 and the object."""
    fs, path = filesystem(uri, storage_options)
    try:
        data = read_bytes(fs, path)
    except FileNotFoundError:
        raise ModelError(f"{role} artifact not found: {uri}") from None
    except IsADirectoryError:
        raise ModelError(f"{role} artifact is a directory, not a file: {uri}") from None
    except OSError as exc:
        raise ModelError(f"cannot read {role} artifact {uri}: {exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    return data, Artifact(role, full_uri(fs, path), digest, len(data))


def artifact_digests(
    model_uri: str, scaler_uri: str | None, storage_options: Mapping[str, Any] | None
) -> tuple[Artifact, ...]:
    """sha256 of each artifact without unpickling it (cheap enough for a planning step)."""
    pairs = [("model", model_uri)] + ([("scaler", scaler_uri)] if scaler_uri else [])
    return tuple(fetch_artifact(role, uri, storage_options)[1] for role, uri in pairs)


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


def _unpickle(role: str, uri: str, data: bytes) -> tuple[Any, str | None]:
    """Unpickle an artifact; also return the scikit-learn version it was saved with, if that differs."""
    with _collector_paused():
        import joblib
        from sklearn.exceptions import InconsistentVersionWarning

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", InconsistentVersionWarning)
                obj = joblib.load(io.BytesIO(data))
        except Exception as exc:  # a corrupt or foreign pickle can raise nearly anything
            raise ModelError(f"{role} artifact {uri} could not be loaded with joblib: {type(exc).__name__}: {exc}") from None
    saved_with = None
    for warning in caught:
        if issubclass(warning.category, InconsistentVersionWarning):
            saved_with = getattr(warning.message, "original_sklearn_version", None)
            warnings.warn(f"{role} artifact {uri}: {warning.message}", stacklevel=2)
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
                f"--features disagrees with the features {uri} was fitted on: "
                f"unseen at fit time: {unseen or 'none'}; fitted but not given: {missing or 'none'}"
            )
        return fitted
    if not features:
        raise ModelError(
            f"{uri} was fitted without feature names, so the feature columns must be given "
            f"(--features a,b,c or YAML 'features'), in the order used at fit time"
        )
    if expected is not None and len(features) != expected:
        raise ModelError(f"{len(features)} features given but {uri} expects {expected}: {', '.join(features)}")
    if len(set(features)) != len(features):
        raise ModelError(f"feature list names a column twice: {', '.join(features)}")
    return tuple(features)


def load_model(
    model_uri: str,
    scaler_uri: str | None = None,
    features: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Load and check the artifacts before any row is read, so a bad model costs no I/O."""
    data, model_artifact = fetch_artifact("model", model_uri, storage_options)
    estimator, saved_with = _unpickle("model", model_artifact.uri, data)
    _check_fitted("model", model_artifact.uri, estimator, "predict")
    artifacts = [model_artifact]
    scaler = None
    if scaler_uri:
        data, scaler_artifact = fetch_artifact("scaler", scaler_uri, storage_options)
        scaler, _ = _unpickle("scaler", scaler_artifact.uri, data)
        _check_fitted("scaler", scaler_artifact.uri, scaler, "transform")
        artifacts.append(scaler_artifact)
        n_scaler = getattr(scaler, "n_features_out_", None) or getattr(scaler, "n_features_in_", None)
        n_model = getattr(estimator, "n_features_in_", None)
        if n_scaler is not None and n_model is not None and n_scaler != n_model:
            raise ModelError(
                f"feature-count mismatch: scaler {scaler_artifact.uri} produces {n_scaler} features "
                f"but model {model_artifact.uri} expects {n_model}"
            )
    first, first_uri = (scaler, artifacts[1].uri) if scaler is not None else (estimator, model_artifact.uri)
    names = _resolve_features(first, features, getattr(first, "n_features_in_", None), first_uri)

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
    )


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
        "classes": [c.item() if hasattr(c, "item") else c for c in model.classes] if model.classes is not None else None,
        "predict_proba": model.has_proba,
        "saved_with_sklearn": model.sklearn_version,
        "installed_sklearn": sklearn.__version__,
        "artifacts": [a.to_dict() for a in model.artifacts],
    }
