"""The Airflow side: a job file's ``dag:`` section and what the DAG's tasks run; the only place Airflow is imported."""
