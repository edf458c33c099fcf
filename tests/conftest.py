import os
import shutil
import subprocess
import sys

import pytest
from filelock import FileLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


# The files whose tests start 2-process torchrun jobs. They are collected first, so that pytest-xdist's worksteal
# (which hands each worker a contiguous half of the collection) gives them all to one worker: two such jobs at once
# would be four ranks on two cores, each collective waiting for a rank the scheduler has set aside.
MULTI_PROCESS_FILES = ("test_distributed.py", "test_reliability_dist.py")


def pytest_collection_modifyitems(config, items):
    """The multi-process files first (in their own order, then the rest in theirs). Heavy tests run only with
    ENGINE_HEAVY_TESTS=1 so that CI on 2 cores stays well under its budget; every module keeps fast tests of the
    same code in the default run."""
    items.sort(key=lambda item: item.path.name not in MULTI_PROCESS_FILES)   # stable: each file keeps its order
    if os.environ.get("ENGINE_HEAVY_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="heavy test: set ENGINE_HEAVY_TESTS=1 to run it")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def made_once(tmp_path_factory):
    """`made_once(name, make)`: the directory `make(path)` writes at `path`, made once per test session and shared
    by the pytest-xdist workers — the first to ask makes it while another waits on its lock, so that an expensive
    run several tests compare against costs one run. Tests only read it (or copy it to change it). A `make` that
    fails leaves nothing behind, and the next test to ask tries again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent          # the session's directory: each worker's own is beneath it

    def get(name: str, make):
        path, done = root / f"made-once-{name}", root / f"made-once-{name}.done"
        with FileLock(str(root / f"made-once-{name}.lock")):
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)
                try:
                    make(path)
                except BaseException:
                    shutil.rmtree(path, ignore_errors=True)
                    raise
                done.touch()
        return path
    return get


@pytest.fixture(scope="session")
def gmm_smoke(made_once):
    """A finished `python recipes/gmm_cmt_ect.py --smoke --device cpu` run, in a process of its own (nothing an
    earlier test did in this one can touch it). Read-only: copy it to resume or damage it."""
    def make(path):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "gmm_cmt_ect.py"), "--smoke", "--out",
                               str(path), "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
    return made_once("gmm-smoke", make)
