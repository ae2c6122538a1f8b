"""Benchmarks: performance is measured and printed here, never asserted (see bench/README.md)."""
