"""Benchmarks behind the numbers in the README and docs/results: each prints a table and writes JSON."""
