"""Example Airflow DAGs: carousel's nightly training and table upkeep at 03:00, online model updates
every 15 minutes, a weekly email campaign.

Copy into your DAGs folder.

Each step is its own task so a failure is visible where it happened and can be retried alone;
``nightly`` runs all four in one process when a single task is preferred.
"""

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

CAROUSEL_HOME = "/opt/carousel"  # where the repository is checked out and `make setup` ran
# A pool of one slot (Admin > Pools): the nightly run and the online updates never overlap (an
# update published while the nightly trains would make the nightly's gate call it stale).
TRAINING_POOL = "carousel_training"

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
        pool=TRAINING_POOL,
    )
    # Table upkeep after training has read `events`, whether or not training succeeded: settings,
    # age-based retention (--now: the slot's end, so a retry deletes the same rows), OPTIMIZE
    # (user_profiles clustered by user_id), deletion-vector purge, VACUUM. Exit 1 when a table
    # failed; the others are done.
    maintain = BashOperator(
        task_id="maintain_tables",
        bash_command=f"cd {CAROUSEL_HOME} && ./spark-submit.sh maintain --now '{{{{ data_interval_end }}}}'",
        trigger_rule="all_done",
        execution_timeout=timedelta(hours=2),
    )
    nightly >> maintain

# A batch campaign: the weekly email every Monday at 09:00. The run id is the schedule slot's
# logical date, so an Airflow retry (even after midnight) resumes the same run: chunks already
# in the topic are skipped and each user gets one payload. --as-of pins segment and ranking time.
with DAG(
    dag_id="carousel_weekly_email",
    schedule="0 9 * * 1",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5)},
    tags=["carousel"],
) as campaign_dag:
    weekly_email = BashOperator(
        task_id="campaign_weekly_email",
        bash_command=(
            f"cd {CAROUSEL_HOME} && ./spark-submit.sh campaign weekly-email "
            "--run-id 'weekly-email-{{ ds_nodash }}' --as-of '{{ data_interval_end }}'"
        ),
        execution_timeout=timedelta(hours=1),
    )

# Online model updates every 15 minutes between nightly runs: the live model warm-started on the
# events up to the slot's end. max_active_runs=1: an update never overlaps the last one; a
# skipped slot loses nothing while an update publishes within training.online.max_window_minutes
# (the next update reads from the live model's data end). A nightly retry after an update has
# published is judged by the gate as stale (it fixed its --end earlier): clear it and let the next
# night run, or retry with --force after a look at the logs.
with DAG(
    dag_id="carousel_online_updates",
    schedule="*/15 * * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 0},
    tags=["carousel"],
) as updates_dag:
    update_model = BashOperator(
        task_id="update_model",
        bash_command=(
            f"cd {CAROUSEL_HOME} && ./spark-submit.sh update-model --end '{{{{ data_interval_end }}}}'"
        ),
        execution_timeout=timedelta(minutes=14),
        pool=TRAINING_POOL,
    )
