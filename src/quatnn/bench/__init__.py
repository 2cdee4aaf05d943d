"""Benchmarks run by ``quatnn bench NAME`` (each module has ``main(argv) -> int``).

They time quatnn against the real-valued torch equivalent side by side in one process
and report ratios; figures go in the README. They are never run as tests.
"""
