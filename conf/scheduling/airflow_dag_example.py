"""Example Airflow DAG: carousel's nightly training at 03:00 (copy into your DAGs folder).

Each step is its own task so a failure is visible where it happened and can be retried alone;
``nightly`` runs all four in one process when a single task is preferred.
"""

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

CAROUSEL_HOME = "/opt/carousel"  # where the repository is checked out and `make setup` ran

with DAG(
    dag_id="carousel_nightly_training",
    schedule="0 3 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
    tags=["carousel"],
) as dag:
    nightly = BashOperator(
        task_id="export_validate_train_publish",
        bash_command=f"cd {CAROUSEL_HOME} && ./spark-submit.sh nightly --end '{{{{ data_interval_end }}}}'",
        execution_timeout=timedelta(hours=2),
    )
