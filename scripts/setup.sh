#!/usr/bin/env bash
# Installs everything carousel needs, idempotently, from the project's own files:
#   - a Python 3.11 virtualenv (.venv) with the pinned packages of pyproject.toml (incl. dev tools);
#   - the JVM jars, resolved by Maven from jvm/pom.xml (Maven Central only, jvm/settings.xml):
#       .jars/spark  Delta Lake + the Spark Kafka connector + S3A (loaded by every SparkSession;
#                    hadoop-aws checked against the Hadoop pyspark bundles)
#       .jars/kafka  the Apache Kafka broker (KRaft) used by the demo and the tests;
#       .jars/spark-log4j  log4j for Spark, put in place of the one pyspark bundles;
#   - checks that the pip delta-spark and the delta-spark jar are one version;
#   - redis-server for the embedded online store (apt-get when run as root, else the command to run).
# Re-running is cheap: each step is skipped while the file it depends on is unchanged.
#
# For an image (the Dockerfile: AWS Batch training), two switches:
#   CAROUSEL_SETUP_EXTRAS   the pip extras installed beside the package (default: dev,bench; empty: none)
#   CAROUSEL_SETUP_ONLINE_STORE=skip   no redis-server (an image that only trains needs none)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
digest() { sha256sum "$@" | sha256sum | cut -c1-16; }

PYTHON="${CAROUSEL_PYTHON:-$(command -v python3.11 || true)}"
[[ -n "$PYTHON" ]] || die "Python 3.11 is required (set CAROUSEL_PYTHON to its path)"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
  || die "$PYTHON is not Python 3.11"
command -v java >/dev/null || die "Java 17+ is required (Spark 4 and Kafka 4 need it)"
java_major="$(java -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}')"
[[ "${java_major%%.*}" -ge 17 ]] || die "Java 17+ is required, found $java_major"
command -v mvn >/dev/null || die "Apache Maven is required to resolve the JVM jars"

# --- Python ----------------------------------------------------------------------------------
extras="${CAROUSEL_SETUP_EXTRAS-dev,bench}"
[[ "$extras" =~ ^[a-z,]*$ ]] || die "CAROUSEL_SETUP_EXTRAS must be a comma-separated list of extras, got '$extras'"
py_stamp=".venv/.carousel-deps-$(digest pyproject.toml)"
[[ "$extras" == "dev,bench" ]] || py_stamp="$py_stamp-extras-${extras//,/-}"
if [[ ! -f "$py_stamp" ]]; then
  say "creating the virtualenv and installing the pinned Python packages${extras:+ (with $extras)}"
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
  rm -f .venv/.carousel-deps-*
  touch "$py_stamp"
else
  say "Python packages up to date"
fi

# --- JVM jars ---------------------------------------------------------------------------------
jar_stamp=".jars/.carousel-jars-$(digest jvm/pom.xml jvm/settings.xml)"
if [[ ! -f "$jar_stamp" ]]; then
  say "resolving the JVM jars with Maven (Delta, Spark Kafka connector, Kafka broker)"
  rm -rf .jars
  for profile in spark-jars kafka-broker; do
    mvn --batch-mode --quiet --settings jvm/settings.xml --file jvm/pom.xml -P "$profile" package \
      || die "Maven could not resolve profile $profile (see the output above)"
  done
  touch "$jar_stamp"
else
  say "JVM jars up to date"
fi
ls .jars/spark/delta-spark_*.jar .jars/spark/spark-sql-kafka-*.jar .jars/kafka/kafka_2.13-*.jar >/dev/null \
  || die "expected jars are missing from .jars/"

# --- Versions that must agree ------------------------------------------------------------------
# The Python half of Delta (pip delta-spark) drives the JVM half (the delta-spark jar) through
# py4j; a mismatched pair fails late and obscurely, so refuse it here, naming both versions.
pip_delta="$(.venv/bin/python -c 'from importlib.metadata import version; print(version("delta-spark"))')"
delta_jars=(.jars/spark/delta-spark_*.jar)
[[ ${#delta_jars[@]} -eq 1 ]] || die "expected one delta-spark jar in .jars/spark, found: ${delta_jars[*]}"
jar_delta="${delta_jars[0]##*-}"  # delta-spark_4.1_2.13-4.4.0.jar -> 4.4.0.jar
jar_delta="${jar_delta%.jar}"
[[ "$pip_delta" == "$jar_delta" ]] \
  || die "delta-spark drift: pip package $pip_delta (pyproject.toml) but jar $jar_delta (jvm/pom.xml delta.version); pin both to one version"

# S3A's hadoop-aws must be the Hadoop release pyspark bundles (hadoop-client-api): S3A uses that
# release's internal classes, and a mismatch fails only when a job first opens an s3a:// path.
pyspark_jars="$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("pyspark").submodule_search_locations[0])')/jars"
hadoop_api=("$pyspark_jars"/hadoop-client-api-*.jar)
aws_jars=(.jars/spark/hadoop-aws-*.jar)
[[ ${#hadoop_api[@]} -eq 1 && -f "${hadoop_api[0]}" ]] || die "expected one hadoop-client-api jar in $pyspark_jars"
[[ ${#aws_jars[@]} -eq 1 && -f "${aws_jars[0]}" ]] || die "expected one hadoop-aws jar in .jars/spark"
pyspark_hadoop="${hadoop_api[0]##*-}"; pyspark_hadoop="${pyspark_hadoop%.jar}"
jar_hadoop_aws="${aws_jars[0]##*-}"; jar_hadoop_aws="${jar_hadoop_aws%.jar}"
[[ "$pyspark_hadoop" == "$jar_hadoop_aws" ]] \
  || die "hadoop-aws drift: pyspark bundles Hadoop $pyspark_hadoop but jvm/pom.xml hadoop.version gives hadoop-aws $jar_hadoop_aws; set hadoop.version to $pyspark_hadoop"

# --- Spark's log4j -----------------------------------------------------------------------------
# pyspark's wheel bundles its own log4j in pyspark/jars (2.24.3 in pyspark 4.1.3, with known CVEs).
# Every Spark JVM started from this virtualenv (driver, local executors, standalone master and
# workers) loads pyspark/jars/*, so each bundled log4j jar is replaced by the same artifact at the
# pom's log4j2.version (.jars/spark-log4j): one log4j on the classpath, never two. Checked on every
# run, so a reinstalled pyspark is patched again.
for jar in "$pyspark_jars"/log4j-*.jar; do
  [[ -e "$jar" ]] || die "no log4j jars in $pyspark_jars: is pyspark installed?"
  name="$(basename "$jar")"
  [[ -f ".jars/spark-log4j/$name" ]] && continue  # already the pom's version
  artifact="${name%-*}"  # log4j-1.2-api-2.24.3.jar -> log4j-1.2-api
  replacement=(.jars/spark-log4j/"$artifact"-[0-9]*.jar)
  [[ -f "${replacement[0]}" ]] \
    || die "pyspark bundles $name but jvm/pom.xml (copy-spark-log4j) resolves no $artifact to replace it"
  say "Spark's log4j: replacing pyspark's $name with $(basename "${replacement[0]}") (jvm/pom.xml)"
  rm -f "$jar"
  cp "${replacement[0]}" "$pyspark_jars/"
done

# --- Online store server -----------------------------------------------------------------------
# The embedded online store (./spark-submit.sh online-store start, 127.0.0.1:6390) runs the
# distribution's redis-server (or valkey-server): it is neither a pip nor a Maven artifact.
find_redis_server() {
  local name dir
  for name in redis-server valkey-server; do
    command -v "$name" 2>/dev/null && return 0
  done
  for name in redis-server valkey-server; do
    for dir in /usr/bin /usr/sbin; do
      [[ -x "$dir/$name" ]] && { echo "$dir/$name"; return 0; }
    done
  done
  return 1
}
if [[ "${CAROUSEL_SETUP_ONLINE_STORE:-}" == skip ]]; then
  say "online store server: skipped (CAROUSEL_SETUP_ONLINE_STORE=skip)"
elif redis_server="$(find_redis_server)"; then
  say "online store server present: $redis_server"
elif [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
  say "installing redis-server (Debian package) for the embedded online store"
  apt_log="$(mktemp)"
  # A fresh image may have no package lists yet: update once and retry. The package may start a
  # system-wide server on 6379 (or fail to, without an init system); neither matters to us (we run
  # our own on online_store.port), so only a missing binary afterwards is an error.
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }
  } >"$apt_log" 2>&1 || say "apt-get reported an error (log: $apt_log); checking for the binary"
  redis_server="$(find_redis_server)" \
    || die "redis-server is still missing after apt-get (log: $apt_log); run: apt-get install -y redis-server"
  say "online store server installed: $redis_server"
else
  die "the online store needs redis-server; install it with: sudo apt-get install -y redis-server"
fi

say "ready: $(.venv/bin/python -c 'import pyspark; print("pyspark", pyspark.__version__)'), $(ls .jars/spark | wc -l) Spark jars, $(ls .jars/kafka | wc -l) broker jars"
