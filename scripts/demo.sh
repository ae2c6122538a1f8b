#!/usr/bin/env bash
# The end-to-end demo on the embedded default: a local Kafka broker, local Spark, Delta tables
# under ./data. Produces simulated traffic, ingests it into events + profiles (+ quarantine), and
# checks the streamed profiles against a batch recomputation.
#   make demo                     (installs first)
#   DEMO_EVENTS=200000 make demo  (more traffic)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
events="${DEMO_EVENTS:-50000}"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "starting the local Kafka broker"
./spark-submit.sh broker start
./spark-submit.sh broker topics

step "producing $events simulated events (with bad records and duplicates mixed in)"
./spark-submit.sh simulate --events "$events"

step "ingesting everything in the topic into Delta (events, user_profiles, events_quarantine)"
./spark-submit.sh ingest --available-now

step "checking the streamed profiles against a batch recomputation from the events table"
./spark-submit.sh rebuild-profiles --check

step "done"
echo "Tables are under ./data/tables; the broker keeps running (./spark-submit.sh broker stop)."
