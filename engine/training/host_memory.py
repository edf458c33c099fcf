"""The process's host (CPU) allocator policy: keep freed memory for reuse instead of returning it to the OS.

PyTorch's CPU allocator has no cache: every CPU tensor is a `posix_memalign` and every free a `free`. With glibc's
defaults, blocks above the dynamic mmap threshold (up to 32 MiB) are fresh `mmap`s and the top of the heap is
trimmed back to the OS whenever more than the trim threshold lies free there. A training step frees and reallocates
its activations every step, so each step page-faults its working set in again: the kernel zeroes every 4 KiB page
on first touch. Measured (bench/vs_reference.py, ECT at 32² / 128 pairs, 2 CPU cores): about 5 million minor faults
and 10 s of system time in a 14 s step, and a per-round spread that depends on the allocation history — the
"spread above 100%" of issue 18. Under `retain` the same step has no faults and takes 7.6 s.

    retain   mallopt(M_MMAP_MAX = 0): no block is an mmap of its own; mallopt(M_TRIM_THRESHOLD = 2³¹ − 1 B, the
             largest value mallopt takes): the heap is trimmed only when 2 GiB lie free at its top. Freed memory
             stays in the process and is reused, so its resident size stays near its peak (as with jemalloc or
             tcmalloc, which torch.backends.xeon.run_cpu can preload for the same reason).
    system   glibc's allocator left as it is. After `retain` in the same process, glibc's default values are put
             back, but its dynamic mmap threshold stays off (glibc turns it off at any explicit setting): a
             comparison against untouched defaults needs a process of its own (bench/vs_reference.py does that).

With glibc before 2.38, a freed block cannot serve a new 64-byte-aligned request of its own size (PyTorch's) until
its neighbours have merged with it, so the heap grows for the first few steps and then settles (a 48 MiB tensor
reallocated: 7 blocks more, then no faults and no growth; tests/test_host_memory.py).

The cost is resident memory: our ECT step at 32² / 128 pairs (DDPM++ width 32, 8 steps) peaked at 8.7 GiB under
`retain` against 6.2 GiB under glibc's defaults, and took 7.9 s a step against 12 s. ENGINE_HOST_MEMORY=system is
the choice for a CPU run that is short of memory.

The policy changes no number (allocation addresses only: tests/test_host_memory.py). It is process-wide, so it is set
once, where the loop starts (engine/training/loop.py `train_stage`) and the step benchmarks (bench/common.py); the
environment variable ENGINE_HOST_MEMORY=system opts out. Where the C library is not glibc, nothing is changed and
`apply` says why.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

POLICIES = ("retain", "system")
ENV = "ENGINE_HOST_MEMORY"

# glibc's mallopt parameters (malloc.h) and its defaults (malloc/malloc.c: DEFAULT_TRIM_THRESHOLD,
# DEFAULT_MMAP_MAX; the mmap threshold's dynamic adjustment is off as soon as either is set explicitly).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
_RETAIN = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2 ** 31 - 1))
_SYSTEM = ((M_MMAP_MAX, 65536), (M_TRIM_THRESHOLD, 128 * 1024), (M_MMAP_THRESHOLD, 128 * 1024))

_state = {"policy": "system"}


@functools.lru_cache(maxsize=1)
def _glibc():
    """The process's C library when it is glibc (it has gnu_get_libc_version and mallopt), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def _mallopt(libc, param: int, value: int) -> None:
    if libc.mallopt(param, value) != 1:
        raise RuntimeError(f"mallopt({param}, {value}) failed")


def apply(policy: str | None = None) -> str:
    """Set the host allocator policy (`policy`, else ENGINE_HOST_MEMORY, else 'retain'); returns what is in effect
    ('retain', 'system', or 'system (why)' when the policy cannot be set here)."""
    policy = policy or os.environ.get(ENV) or "retain"
    if policy not in POLICIES:
        raise ValueError(f"host memory policy must be one of {POLICIES} (from {ENV} or the caller), got {policy!r}")
    libc = _glibc()
    if libc is None:
        return "system (the C library is not glibc: its allocator is left as it is)"
    if policy != _state["policy"]:
        for param, value in (_RETAIN if policy == "retain" else _SYSTEM):
            _mallopt(libc, param, value)
        _state["policy"] = policy
    return policy


def current() -> str:
    """The policy this process last set through `apply` ('system' when it never did)."""
    return _state["policy"]
