"""Benchmarks of userproxy side by side with HAProxy, nginx stream and a direct path.

Run on purpose with ``bench/run`` (see docs/benchmarks.md); never part of the tests.
"""
