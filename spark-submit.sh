#!/usr/bin/env bash
# The one entry point for every carousel job.
#
#   ./spark-submit.sh --help                          list the jobs
#   ./spark-submit.sh <job> [job options]             run a job (Spark jobs: local[*] by default)
#   ./spark-submit.sh --master spark://host:7077 <job> [job options]
#                                                     any spark-submit option before the job name
#                                                     passes through (cluster, YARN, Kubernetes...)
#
# Spark jobs run through pyspark's spark-submit with the project's code zipped and shipped to the
# executors (--py-files) and the Delta/Kafka jars from .jars/spark (--jars); nothing is downloaded
# at start. Plain Python jobs (broker, simulate) run in the project's virtualenv directly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${CAROUSEL_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
  echo "carousel is not set up: run 'make setup' first (no virtualenv at $VENV)" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CAROUSEL_HOME="$ROOT"

# The launcher reads the words as typed: how many are spark-submit options before the job (read as
# spark-submit's own parser reads them; an unknown one is refused), the session settings from config,
# the job's arguments, and the code zip for the executors (and a cluster-mode driver): the project's
# packages and conf/, plus in cluster mode the --config files and template folders given here; and
# where the driver runs (CAROUSEL_DEPLOY_MODE: client, the default, or cluster on YARN or Kubernetes),
# read from the spark-submit options as spark-submit reads them: --deploy-mode, --conf,
# --properties-file, spark-defaults.conf, DEPLOY_MODE (carousel/launch.py).
info="$("$PY" -m carousel.cli --launch-info --code-dir "$ROOT/dist" "$@")"
eval "$info"
spark_args=("${@:1:$CAROUSEL_SPARK_ARG_COUNT}")
shift "$CAROUSEL_SPARK_ARG_COUNT"
case "$CAROUSEL_JOB_KIND" in
  help)    exec "$PY" -m carousel.cli --help ;;
  unknown) exec "$PY" -m carousel.cli "$@" ;;   # prints the usage and fails
  python)  exec "$PY" -m carousel.cli "$@" ;;
esac
deploy_mode="$CAROUSEL_DEPLOY_MODE"
# pyspark's spark-submit looks for its Spark with PYSPARK_DRIVER_PYTHON or python3, which may not
# have pyspark (nothing sets them in cluster mode): the project's interpreter's Spark.
export SPARK_HOME="${SPARK_HOME:-$CAROUSEL_SPARK_HOME}"

defaults=()
[[ $CAROUSEL_MASTER_GIVEN -eq 0 ]] && defaults+=(--master "$CAROUSEL_MASTER")
driver_options=()
if [[ "$deploy_mode" == client ]]; then
  # Executors on this machine (local, standalone) use the project's interpreter unless told otherwise.
  export PYSPARK_PYTHON="${PYSPARK_PYTHON:-$PY}"
  export PYSPARK_DRIVER_PYTHON="${PYSPARK_DRIVER_PYTHON:-$PY}"
  driver_options+=(--conf "spark.driver.extraJavaOptions=-Dlog4j2.configurationFile=file:$ROOT/conf/log4j2.properties")
fi
# In cluster mode the cluster's Python (spark.pyspark.python, the image) and log4j set-up apply, and
# the job's arguments are the launcher's (pointing at the files it shipped); here they are as typed.
job_args=("$@")
[[ "$deploy_mode" == client ]] || job_args=("${CAROUSEL_JOB_ARGS[@]}")

# The deploy mode the launcher prepared for, said outright: spark-submit also reads DEPLOY_MODE from
# a spark-env.sh, which the launcher does not see.
exec "$VENV/bin/spark-submit" \
  "${defaults[@]+"${defaults[@]}"}" \
  --deploy-mode "$deploy_mode" \
  --driver-memory "$CAROUSEL_DRIVER_MEMORY" \
  --jars "$CAROUSEL_JARS" \
  --py-files "$CAROUSEL_CODE_ZIP" \
  --conf "spark.ui.showConsoleProgress=false" \
  "${driver_options[@]+"${driver_options[@]}"}" \
  "${spark_args[@]+"${spark_args[@]}"}" \
  "$ROOT/carousel/cli.py" "${job_args[@]}"
