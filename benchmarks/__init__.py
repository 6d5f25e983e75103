"""Benchmarks: timings, memory and achieved FLOP/s of the real training code (see benchmarks/README.md)."""
