"""Benchmarks of the scoring job (not timed tests): see bench/RESULTS.md for how to run them."""
