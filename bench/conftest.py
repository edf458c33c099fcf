"""Micro-benchmarks with pytest-benchmark (`python -m pytest -n0 bench/ --benchmark-only`): each run's JSON is saved
under bench/results/ (pytest-benchmark's storage), comparable across runs with `pytest-benchmark compare`. Without
pytest-benchmark installed the files here are skipped (they are not part of the unit tests: `testpaths = tests`)."""
import os

import pytest

pytest.importorskip("pytest_benchmark")
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    opt = config.option
    if hasattr(opt, "benchmark_autosave") and not getattr(opt, "benchmark_disable", False):
        opt.benchmark_autosave = True
        if str(getattr(opt, "benchmark_storage", "")).endswith(".benchmarks"):
            opt.benchmark_storage = "file://" + os.path.join(HERE, "results", "micro")
