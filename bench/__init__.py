"""Kernel benchmarks: bench/common.py holds what they share; each other module is one script (run it as a file or
with ``python -m bench.NAME``)."""
