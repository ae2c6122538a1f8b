# carousel: the two commands a fresh machine needs are `make demo` and `make test`.
.PHONY: setup demo test lint bench-ingest broker-start broker-stop clean

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

broker-start: setup
	@./spark-submit.sh broker start && ./spark-submit.sh broker topics

broker-stop:
	@./spark-submit.sh broker stop

clean:          ## remove runtime state (tables, checkpoints, broker data); keeps the install
	@./spark-submit.sh broker stop || true
	rm -rf data .state dist
