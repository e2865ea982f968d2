"""Benchmarks: `headrace bench {latency,throughput,serve}`."""
