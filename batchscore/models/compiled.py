"""Tree ensembles compiled to native code (treelite + TL2cgen), built once per model and cached.

A compiled library predicts the same trees as scikit-learn, several times faster, but not the
same code: sums run in another order and the link function is TL2cgen's own. So it is never
trusted on its word: ``verification.choose_engine`` compares it with scikit-learn on the job's own
rows before any row is scored with it. Everything here needs the optional extra
``batchscore[compiled]`` and, to build a library (not to load one), a C compiler.

A library is keyed by the model artifact's sha256, the treelite and TL2cgen versions and the
platform, so a cached library is only ever reused for the model and toolchain it was built from;
``batchscore compile`` builds it ahead of time (e.g. where a compiler is available) for an image
that has none. The cache may be remote (``compiled_cache: s3://...``, e.g. next to the model): a
library is then kept in the local cache too, fetched from the remote one when it is there, and
uploaded to it when this process had to compile it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import COMPILED_CACHE_ENV, StorageSettings
from ..errors import BatchscoreError, ConfigError, ModelError, StorageError
from ..io.storage import join, probe_writable, read_bytes, resolve, write_bytes_atomic
from .artifacts import Artifact, ArtifactPolicy, LoadedModel, _deserialize, fetch_artifact
from .engine import Predictor

log = logging.getLogger(__name__)

#: The C compiler TL2cgen drives; a library can be loaded without it.
TOOLCHAIN = "gcc"
#: Where libraries are cached unless ``compiled_cache`` (or this variable) says otherwise.
CACHE_ENV = COMPILED_CACHE_ENV

#: Final estimators the compiled engine scores, by scikit-learn class name. Forests are left out on
#: purpose: measured on 2 cores, TL2cgen's RandomForest was slower than scikit-learn's (1.14 s vs
#: 0.97 s for 200k rows, 50 trees of depth 10) and took 45 s to compile.
#: The value says which input precision scikit-learn's trees compare: HistGradientBoosting
#: compares float64 values, the classic trees compare float32 values against float64 thresholds.
SUPPORTED = {
    "HistGradientBoostingClassifier": np.float64,
    "HistGradientBoostingRegressor": np.float64,
    "GradientBoostingClassifier": np.float32,
    "GradientBoostingRegressor": np.float32,
}
#: Losses whose prediction TL2cgen computes the way scikit-learn does (identity, sigmoid, softmax).
SUPPORTED_LOSSES = {
    "HistGradientBoostingClassifier": ("log_loss",),
    "HistGradientBoostingRegressor": ("squared_error", "absolute_error", "quantile"),
    "GradientBoostingClassifier": ("log_loss",),
    "GradientBoostingRegressor": ("squared_error", "absolute_error", "huber", "quantile"),
}
#: Scikit-learn classes whose predictions have nothing to compile, or are not faster compiled.
NOT_FASTER = ("RandomForestClassifier", "RandomForestRegressor", "ExtraTreesClassifier", "ExtraTreesRegressor")


def missing_dependency() -> str | None:
    """Why the compiled engine cannot be used here at all, or None."""
    try:
        import tl2cgen  # noqa: F401
        import treelite  # noqa: F401
    except ImportError as exc:
        return f"treelite and tl2cgen are not installed ({exc.name} missing); install batchscore[compiled]"
    return None


def unsupported_reason(model: LoadedModel) -> str | None:
    """Why this model is scored with scikit-learn even when the compiled engine is asked for."""
    final = model.final_estimator
    name = type(final).__name__
    if name in NOT_FASTER:
        return f"{name}: the compiled forest is slower than scikit-learn's and slow to compile"
    if name not in SUPPORTED or type(final).__module__.split(".")[0] != "sklearn":
        return f"{name} has no compiled kernel (only {', '.join(SUPPORTED)})"
    if not _is_plain(final):
        return f"{name} is a subclass or replaces predict/predict_proba; only scikit-learn's own classes compile"
    loss = getattr(final, "loss", None)
    if loss not in SUPPORTED_LOSSES[name]:
        return f"{name} with loss {loss!r} has no compiled kernel (only {', '.join(SUPPORTED_LOSSES[name])})"
    if getattr(final, "is_categorical_", None) is not None and np.any(final.is_categorical_):
        return f"{name} with categorical features has no compiled kernel"
    if getattr(final, "init", None) not in (None, "zero") and name.startswith("GradientBoosting"):
        return f"{name} with a custom init estimator has no compiled kernel"
    return None


def _is_plain(estimator: Any) -> bool:
    import sklearn.ensemble as ensemble

    cls = getattr(ensemble, type(estimator).__name__, None)
    own = vars(estimator)
    return type(estimator) is cls and "predict" not in own and "predict_proba" not in own


def toolchain_key() -> str:
    """What a library depends on besides the model: treelite, TL2cgen and the platform."""
    from importlib.metadata import version

    return f"treelite-{version('treelite')}.tl2cgen-{version('tl2cgen')}.{sysconfig.get_platform()}"


def library_name(model_sha256: str) -> str:
    return f"{model_sha256}.{toolchain_key()}.so"


def is_remote(cache: str | None) -> bool:
    """Whether a configured cache is a URL on a remote store (``s3://...``) rather than a folder."""
    return cache is not None and "://" in cache and cache.split("://", 1)[0] not in ("file", "local")


def cache_dir(configured: str | None) -> Path:
    """The local cache folder: ``compiled_cache`` (unless remote), else $BATCHSCORE_COMPILED_CACHE,
    else the user's cache."""
    if configured and not is_remote(configured):
        return Path(configured.split("://", 1)[-1]).expanduser()  # a plain path or a file:// URL
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchscore" / "compiled"


def model_sha256(model: LoadedModel) -> str:
    return next(a.sha256 for a in model.artifacts if a.role == "model")


_quiet_callbacks: list[Any] = []  # kept alive: TL2cgen calls them from native code


def _quiet_tl2cgen() -> None:
    """TL2cgen prints its native log lines on stdout, where batchscore writes its JSON summary:
    send them to this module's debug log instead."""
    if _quiet_callbacks:
        return
    import ctypes

    import tl2cgen.core

    @ctypes.CFUNCTYPE(None, ctypes.c_char_p)
    def to_log(message: bytes) -> None:
        log.debug("tl2cgen: %s", message.decode("utf-8", "replace").strip())

    _quiet_callbacks.append(to_log)
    tl2cgen.core._LIB.TL2cgenRegisterLogCallback(to_log)


def build(model: LoadedModel, path: Path, threads: int = 2) -> float:
    """Compile the model's final estimator into a shared library at ``path``; seconds taken.

    The library appears under its name only once complete (built aside, then renamed), so a
    concurrent job never loads half a file.
    """
    reason = missing_dependency() or unsupported_reason(model)
    if reason:
        raise ModelError(f"cannot compile model {model.artifacts[0].uri}: {reason}")
    if shutil.which(TOOLCHAIN) is None:
        raise ModelError(
            f"cannot compile model {model.artifacts[0].uri}: no C compiler ({TOOLCHAIN}) on PATH; build the library "
            f"where one is (batchscore compile MODEL --out DIR) and point compiled_cache at DIR"
        )
    import tl2cgen
    import treelite

    _quiet_tl2cgen()
    started = time.perf_counter()
    try:
        tree_model = treelite.sklearn.import_model(model.final_estimator)
    except Exception as exc:  # treelite refuses what it cannot represent
        raise ModelError(f"cannot compile model {model.artifacts[0].uri}: treelite: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as scratch:
        built = Path(scratch) / path.name
        with _native_stderr_to(Path(scratch) / "build.log") as build_log:
            try:
                tl2cgen.export_lib(
                    tree_model,
                    toolchain=TOOLCHAIN,
                    libpath=built,
                    nthread=threads,
                    params={"parallel_comp": max(1, threads)},
                )
            except Exception as exc:
                raise ModelError(
                    f"cannot compile model {model.artifacts[0].uri}: {exc}; {build_log()[-500:]}"
                ) from None
        log.debug("build output: %s", build_log())
        os.replace(built, path)
    seconds = time.perf_counter() - started
    log.info("compiled %s into %s in %.2f s", model.artifacts[0].uri, path, seconds)
    return seconds


@contextlib.contextmanager
def _native_stderr_to(path: Path) -> Iterator[Callable[[], str]]:
    """Send what native code writes on standard error (treelite's version notes, the compiler's
    messages) to a file while a library is built; yields a function that reads it back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: path.read_text(errors="replace").strip()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass(frozen=True)
class Library:
    """A compiled library for one model: where it is, its own sha256, and how it was obtained."""

    path: str
    sha256: str
    built: bool  # compiled by this run (else found in a cache)
    seconds: float  # compiling (or finding) it
    remote: str | None = None  # its copy in the remote cache, when the cache is remote
    downloaded: bool = False  # fetched from the remote cache by this run

    def to_dict(self) -> dict[str, Any]:
        record = {
            "library": os.path.basename(self.path),
            "library_sha256": self.sha256,
            "compiled_now": self.built,
            "compile_seconds": round(self.seconds, 3),
        }
        if self.remote:
            record.update(remote_library=self.remote, downloaded_now=self.downloaded)
        return record


def obtain(
    model: LoadedModel,
    configured_cache: str | None,
    storage: StorageSettings | None = None,
    must_upload: bool = False,
) -> Library:
    """The model's library from the cache, compiled into it first if it is not there.

    With a remote cache the library is looked up locally, then remotely, and only then compiled
    (and uploaded, so the next host need not compile). A failed upload is a warning for a run,
    which can score anyway, and an error where publishing is the point (``must_upload``).
    """
    started = time.perf_counter()
    name = library_name(model_sha256(model))
    path = check_cache(model, configured_cache)
    remote = join(configured_cache, name) if configured_cache and is_remote(configured_cache) else None
    downloaded = False
    if remote and not path.is_file():
        downloaded = _download(remote, path, storage)
    built = not path.is_file()
    if built:
        try:
            build(model, path, threads=min(4, os.cpu_count() or 1))
        except OSError as exc:
            raise ModelError(f"cannot write the compiled library {path}: {exc.strerror or exc}") from None
    data = path.read_bytes()
    if remote and (built or must_upload):
        _upload(data, remote, storage, must_upload)
    return Library(
        str(path), hashlib.sha256(data).hexdigest(), built, time.perf_counter() - started, remote, downloaded
    )


def check_cache(model: LoadedModel, configured_cache: str | None) -> Path:
    """Where the model's library is in the local cache; raise the ``ModelError`` that ``obtain``
    would, before anything is compiled or scored, when it is there but unreadable, or missing
    from a cache folder that takes no writes (fetched or compiled, it must be written there)."""
    path = cache_dir(configured_cache) / library_name(model_sha256(model))
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise ModelError(f"cannot read the compiled library {path}: permission denied")
        return path
    try:
        folder = resolve(str(path.parent))
        probe_writable(folder.fs, folder.path, tidy=False)  # the cache folder is kept
    except BatchscoreError as exc:
        raise ModelError(f"cannot write the compiled library {path}: {exc}") from None
    return path


def _download(uri: str, path: Path, storage: StorageSettings | None) -> bool:
    """Copy the remote cache's library into the local cache; False when it is not there (or the
    remote cache cannot be read, which costs a compile, not the run)."""
    try:
        remote = resolve(uri, storage)
        data = read_bytes(remote.fs, remote.path)
    except FileNotFoundError:
        return False
    except (OSError, BatchscoreError) as exc:
        log.warning("cannot read the compiled library %s (%s); compiling it here", uri, exc)
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        local = resolve(str(path))
        write_bytes_atomic(local.fs, local.path, data)
    except OSError as exc:
        raise ModelError(f"cannot write the compiled library {path}: {exc.strerror or exc}") from None
    log.info("fetched the compiled library %s into %s", uri, path)
    return True


def _upload(data: bytes, uri: str, storage: StorageSettings | None, must_upload: bool) -> None:
    """Publish a library to the remote cache: one whole object, so readers see all of it or none."""
    try:
        remote = resolve(uri, storage)
        write_bytes_atomic(remote.fs, remote.path, data)
    except (OSError, BatchscoreError) as exc:
        if must_upload:
            raise StorageError(f"cannot upload the compiled library to {uri}: {exc}") from None
        log.warning("cannot upload the compiled library to %s (%s); scoring with the local copy", uri, exc)
        return
    log.info("uploaded the compiled library to %s", uri)


class Kernel:
    """A loaded library, predicting one row at a time on one thread (a worker owns one core)."""

    def __init__(self, path: str, input_type: Any):
        import tl2cgen

        _quiet_tl2cgen()
        self._tl2cgen = tl2cgen
        self._predictor = tl2cgen.Predictor(path, nthread=1)
        self.input_type = input_type

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(rows, outputs): the probability of each class (of the positive class for two), or the value."""
        values = features.astype(self.input_type, copy=False).astype(np.float64, copy=False)
        out = self._predictor.predict(self._tl2cgen.DMatrix(np.ascontiguousarray(values), dtype="float64"))
        return np.asarray(out, dtype=np.float64).reshape(len(values), -1)


class CompiledPredictor(Predictor):
    """A ``Predictor`` whose tree ensemble runs in a compiled library.

    Everything around the trees stays scikit-learn's: the scaler, a pipeline's earlier steps, the
    check of every transform's output (``engine.TransformCheck``, so the same rows are refused), and
    the class of any row whose top two probabilities (nearly) tie, plus the per-batch check of
    derived classes against ``predict``. The hooks below get the trees' input, every transform applied.
    """

    def __init__(self, model: LoadedModel, model_version: str, predicted_at: Any, library_path: str):
        super().__init__(model, model_version, predicted_at)
        self.kernel = Kernel(library_path, SUPPORTED[type(model.final_estimator).__name__])

    def _predict_proba(self, scaled: Any) -> np.ndarray:
        proba = self.kernel.predict(np.asarray(scaled))
        if proba.shape[1] == 1:  # two classes: the positive one's probability
            return np.column_stack([1.0 - proba[:, 0], proba[:, 0]])
        return proba

    def _predict_values(self, scaled: Any) -> np.ndarray:
        return self.kernel.predict(np.asarray(scaled))[:, 0]


def predictor(model: LoadedModel, model_version: str, predicted_at: Any, library_path: str | None) -> Predictor:
    """The predictor a worker scores with: compiled when the job chose a library, else scikit-learn's."""
    if library_path is None:
        return Predictor(model, model_version, predicted_at)
    return CompiledPredictor(model, model_version, predicted_at, library_path)


def compile_ahead(
    uri: str, storage: StorageSettings, policy: ArtifactPolicy, out: str | None
) -> tuple[Artifact, Library]:
    """``batchscore compile``: build (or find) the model's library in ``out``, keyed as a run looks
    it up. Only the model artifact matters (a separate scaler runs in scikit-learn), so no feature
    names are needed."""
    reason = missing_dependency()
    if reason:
        raise ConfigError(f"batchscore compile needs the compiled engine: {reason}")
    data, artifact = fetch_artifact("model", uri, storage, policy)
    estimator, _ = _deserialize(artifact, data, policy.trusted_types)
    model = LoadedModel(estimator, None, (), False, None, False, (artifact,), "")
    return artifact, obtain(model, out, storage, must_upload=True)
