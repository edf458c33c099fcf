import os

import pytest

# Under pytest-xdist (pytest.ini runs two workers) each worker gets its share of the cores, set before any test
# imports torch and handed to the processes tests start: two workers of two OpenMP threads each on a 2-core machine
# took 53 % more CPU time than one process and no less wall time (user 1,861 s against 1,217 s, bench/RESULTS.md).
# Every result a test compares is computed under the same setting, so the suite's outcomes do not depend on it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _threads = max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)


def pytest_collection_modifyitems(config, items):
    """Heavy tests run only with ENGINE_HEAVY_TESTS=1 so that CI on 2 cores stays well under its budget; every
    module keeps fast tests of the same code in the default run."""
    if os.environ.get("ENGINE_HEAVY_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="heavy test: set ENGINE_HEAVY_TESTS=1 to run it")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)
