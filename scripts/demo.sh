#!/usr/bin/env bash
# The end-to-end demo on the embedded default: a local Kafka broker, local Spark, Delta tables
# under ./data. Every stage of carousel runs once:
#   simulate -> ingest (events, profiles, quarantine) -> profile check -> catalog upload ->
#   nightly training (export, validate, train, publish) -> online store rebuild -> real-time
#   serving of the triggers -> outbox into Delta ->
#   a batch campaign with an A/B test -> simulated responses -> ingest -> report.
#   make demo                     (installs first)
#   DEMO_EVENTS=200000 make demo  (more traffic)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
events="${DEMO_EVENTS:-50000}"
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "starting the local Kafka broker and the local online store (Redis)"
./spark-submit.sh broker start
./spark-submit.sh broker topics
./spark-submit.sh online-store start

step "producing $events simulated events (with bad records and duplicates mixed in)"
./spark-submit.sh simulate --events "$events"

step "ingesting everything in the topic into Delta (events, user_profiles, events_quarantine)"
./spark-submit.sh ingest --available-now

step "checking the streamed profiles against a batch recomputation from the events table"
./spark-submit.sh rebuild-profiles --check

step "uploading the product catalog (the simulator's catalog.csv, validated by its suite)"
./spark-submit.sh upload-catalog data/simulator/catalog.csv

step "nightly training: export -> validate -> train -> publish the correlation matrix"
# The demo has far fewer than the production minimum of interactions: export what there is.
./spark-submit.sh nightly --set training.min_interactions=10000 --set training.lookback_days=30

step "filling the online store from Delta (profiles, events after them, recent sends): a first deployment"
./spark-submit.sh rebuild-online-store

step "serving: answering the trigger events already in the topic (push, in-app), then stopping"
# The simulated triggers are up to two weeks old: a live deployment skips triggers older than
# serving.max_trigger_age_seconds (10 minutes); the demo answers them all.
./spark-submit.sh serve --available-now --set serving.starting_offsets=earliest \
  --set serving.max_trigger_age_seconds=3000000

step "recording what serving sent: the outbox topic -> Delta sent_recommendations"
./spark-submit.sh record-sends --available-now

step "batch campaign 'weekly-email' (A/B: model vs trending, 10% control), as of 3 days ago"
as_of="$(date -u -d '3 days ago' +%Y-%m-%dT%H:%M:%SZ)"
./spark-submit.sh campaign weekly-email --as-of "$as_of" --run-id "demo-$(date -u +%Y%m%d%H%M%S)"

step "simulating the users' responses to the campaign, and ingesting them"
./spark-submit.sh simulate-responses --campaign weekly-email --seed 1
./spark-submit.sh ingest --available-now

step "report: attribution, CTR, conversion, lift over control, coverage, diversity"
./spark-submit.sh report --campaign weekly-email

step "what each stage produced"
./spark-submit.sh summary

step "done"
echo "Tables are under ./data/tables, reports under ./data/reports; the broker and the online store"
echo "keep running (./spark-submit.sh broker stop; ./spark-submit.sh online-store stop)."
echo "Payloads are on the recs.* topics, dead letters (if any) on recs.dead_letter."
