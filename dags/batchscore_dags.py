"""Airflow DAGs for batchscore: one DAG per job file in ``configs/`` whose ``dag:`` section has a schedule.

Adding a YAML file adds a DAG. Parsing reads those YAML files and nothing else; the task graph
lives in ``batchscore_dagfactory`` and the ``dag:`` keys are declared in ``batchscore.orchestration.dagspec``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # a plain DagBag does not put the DAG folder on the path
    sys.path.append(_HERE)

from batchscore_dagfactory import build_dag, configs_dir, load_jobs

for _job in load_jobs(configs_dir(__file__)):
    globals()[_job.dag_id] = build_dag(_job)
