"""The Fréchet distance at Inception's 2,048 dimensions: engine/metrics/frechet.py (the r × r eigenproblem of a
pivoted Cholesky factor of the lower-rank covariance) beside the two D × D eigendecompositions it replaced
(Σ₁^½ by `eigh`, then the eigenvalues of Σ₁^½ Σ₂ Σ₁^½), for a few sample counts against a 4,000-sample reference,
with the samples' statistics first as the engine's callers pass them. Both are float64; the table gives the
median seconds of each and their relative difference.

    python bench/frechet.py                     # D = 2048; 8, 1000 and 5000 samples
    python bench/frechet.py --smoke             # D = 64 (CI)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from engine.checks import positive_int_arg  # noqa: E402
from engine.metrics.frechet import _psd_eigvals, feature_statistics, frechet_distance  # noqa: E402


def by_eigendecomposition(mu1, s1, mu2, s2) -> float:
    """The previous formula: Σ₁^½ from `eigh`, then `eigvalsh` of Σ₁^½ Σ₂ Σ₁^½, eigenvalues at rounding level
    set to 0 as the engine sets them (`_psd_eigvals`)."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(_psd_eigvals(w))) @ v.T
    m = root @ s2 @ root
    tr = np.sqrt(_psd_eigvals(np.linalg.eigvalsh(0.5 * (m + m.T)))).sum()
    d = mu1 - mu2
    return float(max(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr, 0.0))


def features(n: int, dim: int, rng, shift: float = 0.0) -> np.ndarray:
    return rng.normal(size=(n, dim)) @ (rng.normal(size=(dim, dim)) / np.sqrt(dim)) + shift


def median_seconds(fn, reps: int) -> tuple[float, float]:
    times, value = [], None
    for _ in range(reps):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=positive_int_arg, default=2048)
    p.add_argument("--samples", default="8,1000,5000", help="sample counts, comma-separated")
    p.add_argument("--reps", type=positive_int_arg, default=3)
    p.add_argument("--smoke", action="store_true", help="64 dimensions, 8 and 200 samples, one repetition")
    a = p.parse_args(argv)
    dim, counts, reps = (64, [8, 200], 1) if a.smoke else (a.dim, [int(c) for c in a.samples.split(",")], a.reps)
    rng = np.random.default_rng(0)
    ref = feature_statistics(features(max(4000, 2 * dim), dim, rng))
    rows = []
    print("| samples | D | engine s | D × D eigh s | ratio | relative difference |\n|---|---|---|---|---|---|")
    for n in counts:
        gen = feature_statistics(features(n, dim, rng, shift=0.1))
        t_new, fd_new = median_seconds(lambda: frechet_distance(*gen, *ref), reps)
        t_old, fd_old = median_seconds(lambda: by_eigendecomposition(*gen, *ref), reps)
        row = dict(samples=n, dim=dim, engine_s=t_new, eigh_s=t_old, fd=fd_new,
                   relative_difference=abs(fd_new - fd_old) / abs(fd_old))
        rows.append(row)
        print(f"| {n} | {dim} | {t_new:.3f} | {t_old:.3f} | {t_new / t_old:.2f} | {row['relative_difference']:.1e} |",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
