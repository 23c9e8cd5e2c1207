"""Benchmarks behind the numbers in the README and the issue notes: each prints a table and writes JSON."""
