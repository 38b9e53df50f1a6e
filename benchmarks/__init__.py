"""Benchmarks and the reliability suite.

Each script runs as ``python benchmarks/<name>.py``; this package lets the tests import the
reliability suite's helpers by name (``from benchmarks.reliability_processes import Run``)
rather than load its files by path. It is not shipped with byol_flax.
"""
