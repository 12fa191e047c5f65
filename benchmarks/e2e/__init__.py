"""Helpers of benchmarks/bench_e2e.py: the workload and variants, one variant's process, the TRL
comparison's process, the numbers, and the tables and chart."""
