"""Accuracy of the fused kernels against float64, next to PyTorch's own error in the same dtype.

    python bench/kernel_accuracy.py            # CUDA tensors when a GPU is present (compiled kernels),
                                               # else CPU tensors (Triton's interpreter)

For each kernel and storage dtype: the max abs error of the kernel and of the PyTorch reference sequence against
a float64 computation from the same stored inputs, over sizes that are not multiples of the block, and their
ratio (the tests require ≤ 2). Prints a markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.kernels import dpm_solver as kdpm  # noqa: E402
from engine.kernels import precond as kpre  # noqa: E402
from engine.schedules import logsnr_sigmas  # noqa: E402
from engine.solvers import dpm_solver_pp_coefficients  # noqa: E402

SIZES = [(1025,), (3, 3, 17, 13), (128, 3, 32, 32)]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def main(argv=None) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    rand = lambda shape, scale=1.0: (torch.randn(shape, generator=g) * scale).to(device)
    coef, orders = dpm_solver_pp_coefficients(logsnr_sigmas(16))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        worst = {}
        for shape in SIZES:
            sigma = torch.exp(torch.rand(shape[0], generator=g, dtype=torch.float64) * 10.6 - 6.2).float().to(device)
            x = rand(shape, 20).to(dtype)
            ms = [rand(shape).to(dtype) for _ in range(3)]
            for step in (0, 1, 6):
                k, c = orders[step], coef[step].tolist()
                truth = kdpm.update_reference(x.double(), [m.double() for m in ms[:k]], c)
                worst.setdefault(f"dpm_update order {k}", []).append(
                    (err(kdpm.update_triton(x, ms[:k], c), truth), err(kdpm.update_reference(x, ms[:k], c), truth)))
            xf = rand(shape, 40)
            truth = kpre.input_reference(xf.double(), sigma.double(), 0.5, torch.float64)
            worst.setdefault("precond input", []).append(
                (err(kpre.precond_input(xf, sigma, 0.5, dtype), truth),
                 err(kpre.input_reference(xf, sigma, 0.5, dtype), truth)))
            F = rand(shape).to(dtype)
            for boundary in (False, True):
                truth = kpre.output_reference(xf.double(), F.double(), sigma.double(), 0.5, 0.003, boundary)
                worst.setdefault(f"precond output{' (boundary)' if boundary else ''}", []).append(
                    (err(kpre.precond_output(xf, F, sigma, 0.5, 0.003, boundary), truth),
                     err(kpre.output_reference(xf, F, sigma, 0.5, 0.003, boundary), truth)))
        for kernel, pairs in worst.items():
            k_err, t_err = max(p[0] for p in pairs), max(p[1] for p in pairs)
            ratio = max(p[0] / max(p[1], 1e-300) for p in pairs)
            rows.append(dict(kernel=kernel, dtype=name, kernel_err=k_err, torch_err=t_err, worst_ratio=ratio))
    print(f"device: {device} ({'compiled' if device == 'cuda' else 'Triton interpreter'}); sizes {SIZES}\n")
    print("| kernel | storage | max error, kernel | max error, PyTorch | worst ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | {r['kernel_err']:.3g} | {r['torch_err']:.3g} | "
              f"{r['worst_ratio']:.2f} |")
    return rows


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
