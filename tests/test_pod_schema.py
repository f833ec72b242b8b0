"""The kubernetes runner's pod, as the provider renders it, checked against the Kubernetes API's schema.

No cluster runs here: ``kubernetes-validate`` ships the API's JSON schemas (one per Kubernetes
release) and checks the pod offline, strictly (no unknown field), for the oldest and newest
releases it knows. A pod the API server would refuse fails here instead of at 3 a.m.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from test_dag import (
    DAY,
    configs_dir,  # noqa: F401  (fixture)
    load_dags,
    write_job,
)

VERSIONS = ("1.28.0", kubernetes_validate.latest_version())


def rendered_pod(dag: Any, shard: list[str], image: str) -> dict[str, Any]:
    """Shard ``shard``'s pod from the provider's own builder, as the JSON the API server receives."""
    from kubernetes.client import ApiClient

    op = dag.get_task("score").unmap({"arguments": shard})
    op.render_template_fields({"ds": DAY, "params": {"image": image}})
    return ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))


def validate(pod: dict[str, Any]) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def test_repository_job_pod_is_valid_for_the_kubernetes_api(airflow_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/daily_churn.yaml's pod: resources, secrets as env, node selector, service account."""
    monkeypatch.delenv("BATCHSCORE_CONFIGS_DIR", raising=False)
    monkeypatch.delenv("BATCHSCORE_RUNNER", raising=False)
    dag = load_dags()["batchscore_daily_churn"]
    pod = rendered_pod(dag, ["run", "--plan", "s3://b/p.json", "--shard", "2"], dag.params["image"])
    assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
    validate(pod)
    # The check is live: what the API server refuses, it refuses too.
    container = pod["spec"]["containers"][0]
    for broken in (
        {**container, "resources": {"limits": {"cpu": ["2"]}}},
        {**container, "imagePullPolicy": 3},
        {**container, "env_vars": []},
        {**container, "args": "run --shard 2"},
    ):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate({**pod, "spec": {**pod["spec"], "containers": [broken]}})


def test_every_dag_setting_the_pod_carries_is_valid(airflow_env: Path, configs_dir: Path) -> None:  # noqa: F811
    """A job using each pod-related ``dag:`` key at once (whole secrets and single keys, requests and
    limits in every unit the docs allow, env templates, pull policy, node selector)."""
    dag_section = {
        "schedule": "@daily",
        "start_date": "2024-01-01",
        "runner": "kubernetes",
        "image": "registry.example/bs:1",
        "image_pull_policy": "IfNotPresent",
        "namespace": "scoring",
        "service_account": "scorer",
        "node_selector": {"pool": "batch", "disk": "ssd"},
        "env": {"SCORED_DAY": "{{ ds }}", "LOG_LEVEL": "INFO"},
        "resources": {"requests": {"cpu": "500m", "memory": "1.5Gi"}, "limits": {"cpu": 2, "memory": "6G"}},
        "secrets": [{"secret": "s3", "key": "id", "env": "AWS_ACCESS_KEY_ID"}, {"secret": "whole-secret"}],
    }
    job = {"input": "s3://b/in/dt={{ ds }}/", "output": "s3://b/out/dt={{ ds }}/", "model": "s3://b/m.joblib"}
    write_job(configs_dir, "every_key", job, dag_section)
    pod = rendered_pod(load_dags(configs_dir)["batchscore_every_key"], ["run", "--shard", "0"], "registry.example/bs:2")
    validate(pod)
    container = pod["spec"]["containers"][0]
    assert (
        container["image"] == "registry.example/bs:2" and container["envFrom"][0]["secretRef"]["name"] == "whole-secret"
    )
    assert {e["name"]: e.get("value") for e in container["env"]}["SCORED_DAY"] == DAY
