"""A model kept loaded in a process (a Spark executor's Python worker) for the tasks that follow.

``load_model_kept`` loads pinned artifacts once per process, keyed by everything that decides what
is loaded and how: the URIs, the pinned digests, the features, the formats allowed and every storage
setting. These tests load real artifacts from disk and count the loads the process made.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from batchscore.config import StorageSettings
from batchscore.errors import ModelError
from batchscore.models.artifacts import ArtifactPolicy, Pin, artifact_digests, kept_loads, load_model_kept
from helpers import binary_model


def _pinned(digests: dict[str, str]) -> ArtifactPolicy:
    return ArtifactPolicy({role: (Pin(sha, "does not match its pinned digest"),) for role, sha in digests.items()})


def test_pinned_artifacts_load_once_per_process_and_storage_settings(tmp_path: Path) -> None:
    paths = binary_model(tmp_path / "m")
    model, scaler = str(paths["model"]), str(paths["scaler"])
    digests = {a.role: a.sha256 for a in artifact_digests(model, scaler, None)}
    policy = _pinned(digests)
    before = kept_loads()
    first = load_model_kept(model, scaler, None, StorageSettings(), policy)
    again = load_model_kept(model, scaler, None, StorageSettings(), _pinned(dict(digests)))
    assert kept_loads() == before + 1 and again.estimator is first.estimator and again.load_seconds == 0.0
    # Every storage setting is part of the key: other bounds or options load (and check) again.
    for other in (
        StorageSettings(timeout=3.5),
        StorageSettings(retries=0),
        StorageSettings(throttle_seconds=7.0),
        StorageSettings(options={"anon": True}),
    ):
        loads = kept_loads()
        assert load_model_kept(model, scaler, None, other, policy).estimator is not first.estimator
        assert kept_loads() == loads + 1, other
    # Other features, or other formats allowed, are another key too.
    loads = kept_loads()
    load_model_kept(model, scaler, ("tenure", "monthly_charges", "total_charges", "age"), StorageSettings(), policy)
    assert kept_loads() == loads + 1


def test_only_pinned_artifacts_are_kept_and_a_wrong_pin_is_refused_before_loading(tmp_path: Path) -> None:
    paths = binary_model(tmp_path / "m")
    model, scaler = str(paths["model"]), str(paths["scaler"])
    digests = {a.role: a.sha256 for a in artifact_digests(model, scaler, None)}
    loads = kept_loads()
    unpinned = [load_model_kept(model, scaler, None, StorageSettings(), ArtifactPolicy()) for _ in range(2)]
    assert unpinned[0].estimator is not unpinned[1].estimator and kept_loads() == loads  # loaded each time
    only_model = _pinned({"model": digests["model"]})  # the scaler unpinned: its bytes may change
    assert load_model_kept(model, scaler, None, None, only_model) is not load_model_kept(
        model, scaler, None, None, only_model
    )
    kept = load_model_kept(model, scaler, None, None, _pinned(digests))
    with pytest.raises(ModelError, match="does not match its pinned digest"):
        load_model_kept(model, scaler, None, None, _pinned({**digests, "model": "0" * 64}))
    # The file replaced by other bytes: the kept model is still the pinned one, and new pins load
    # the file's new bytes, checked against them.
    shutil.copy(paths["model"], paths["scaler"])
    assert load_model_kept(model, scaler, None, None, _pinned(digests)).estimator is kept.estimator
    with pytest.raises(ModelError, match="does not match its pinned digest"):
        load_model_kept(model, scaler, None, StorageSettings(timeout=9.0), _pinned(digests))
