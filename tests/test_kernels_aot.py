"""The Triton kernels, built ahead of time for real GPU targets on this CPU (bench/kernels_aot.py): every
specialisation the launchers send compiles for sm_90 and sm_80, fits the chip's shared memory, and uses the tensor
cores where its path means to; a launch that still cannot fit falls back to the reference instead of crashing;
launches run on the tensors' own device.

CI compiles a representative subset (the largest shipped head dimension of the attention kernel in each dtype,
and one form of each elementwise kernel: about a minute); the full matrix is the heavy test below and
`python bench/kernels_aot.py`, whose table bench/RESULTS.md records."""
import logging
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed: the kernels cannot be compiled")

from engine.kernels import jvp_attention, runtime  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import kernels_aot as aot  # noqa: E402

HEAVY = os.environ.get("ENGINE_HEAVY_TESTS") == "1"


def representative():
    """The attention kernel at its largest padded head dim in every dtype, and the first form of every other
    kernel."""
    specs = aot.specialisations()
    largest = max(s.constexprs["D"] for s in specs if s.kernel == "attention_jvp")
    chosen, seen = [], set()
    for s in specs:
        if s.kernel == "attention_jvp":
            if s.constexprs["D"] == largest:
                chosen.append(s)
        elif s.kernel not in seen:
            seen.add(s.kernel)
            chosen.append(s)
    return chosen


def check(spec, capability):
    r = aot.compile_for(spec, capability)
    assert r["fits"], (f"{spec.key()} needs {r['shared']:,} B of shared memory; sm_{capability} has "
                       f"{r['shared_limit']:,}")
    if spec.tensor_cores:
        assert r["tensor_cores"], f"{spec.key()} does not use the tensor cores on sm_{capability}"
    return r


def test_the_matrix_covers_every_dtype_and_shipped_head_dim():
    specs = aot.specialisations()
    attention = {(str(s.constexprs["FP64"]), s.label.split()[0], s.label.split()[1]) for s in specs
                 if s.kernel == "attention_jvp"}
    dims = aot.shipped_head_dims()
    assert {32, 64, 72} <= set(dims)                     # MM-DiT, DiT B … L, DiT XL/2
    assert len(attention) == 4 * len(dims)              # bf16, fp16, fp32, fp64 at each
    assert {s.kernel for s in specs} == {"attention_jvp", "dpm_solver_update", "precond_input", "precond_output",
                                         "precond_output_backward"}
    # the launcher's options are the compiled ones: one stage and 32×32 tiles for fp32 / fp64
    for dtype in (torch.float32, torch.float64):
        cfg = jvp_attention.launch_config(dtype, 72, 72)
        assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"], cfg["D"]) == (32, 32, 1, 128)


@pytest.mark.parametrize("capability", [90, 80])
def test_representative_specialisations_compile_and_fit(capability):
    rows = [check(spec, capability) for spec in representative()]
    assert len(rows) >= 8


@pytest.mark.heavy
@pytest.mark.skipif(not HEAVY, reason="the full matrix takes minutes; ENGINE_HEAVY_TESTS=1")
@pytest.mark.parametrize("capability", [90, 80])
def test_every_specialisation_compiles_and_fits(capability):
    for spec in aot.specialisations():
        check(spec, capability)


def test_a_launch_that_does_not_fit_falls_back_to_the_reference(monkeypatch, caplog):
    """OutOfResources at launch (what a chip with less shared memory raises) gives the reference result, logged
    once, and later calls of that shape go straight to the reference."""
    calls = []

    class Refusing:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                calls.append(meta)
                raise runtime.OutOfResources(360_704, 232_448, "shared memory")
            return launch

    monkeypatch.setattr(jvp_attention, "_k_attention_jvp", Refusing())
    monkeypatch.setattr(runtime, "UNFIT", {})
    monkeypatch.setattr(runtime, "interpreter_runs_loops", lambda: True)   # the launcher is a stand-in here
    g = torch.Generator().manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 5, 72, generator=g, dtype=torch.float64) for _ in range(6))
    with caplog.at_level(logging.WARNING, logger="engine.kernels.runtime"):
        o, do = jvp_attention.attention_jvp_triton(q, k, v, dq, dk, dv, 72 ** -0.5)
        jvp_attention.attention_jvp_triton(q, k, v, dq, dk, dv, 72 ** -0.5)
    assert len(calls) == 1                                   # the second call did not try again
    assert sum("does not fit" in r.message for r in caplog.records) == 1
    ref_o = jvp_attention.attention_reference(q, k, v)
    ref_do = jvp_attention.attention_tangent(q, k, v, ref_o, dq, dk, dv, 72 ** -0.5)
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(do, ref_do, rtol=1e-12, atol=1e-12)


def test_launches_run_on_the_tensors_device(monkeypatch):
    """A compiled launch is wrapped in the tensors' device, so tensors on cuda:1 are not read by a kernel on the
    current device (shown here with a stand-in launcher and device guard: no GPU needed)."""
    entered, launched = [], []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("exit")

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(list(entered))

    kernel = runtime.Kernel.__new__(runtime.Kernel)
    kernel.compiled, kernel.interpreted = Launcher(), None
    monkeypatch.setattr(torch.cuda, "device", Guard)
    x = torch.empty(4, device="meta")
    kernel[(1,)](x, 4, BLOCK=4)
    assert launched == [[x.device]] and entered == [x.device, "exit"]


def test_fp64_kernels_keep_their_scalars_as_the_compiler_types_them(monkeypatch):
    """A compiled kernel receives every Python float argument as fp32. Emulated here in the interpreter (each
    float argument rounded to fp32 before the launch), the fp64 kernels still equal their fp64 references to
    rounding: their scalars travel as three fp32 parts (runtime.f64_parts), where one fp32 scalar gave errors
    of about 1e-8."""
    import numpy as np

    from engine.kernels import dpm_solver, precond

    real = runtime.Kernel.__getitem__

    def as_compiled(self, grid):
        launch = real(self, grid)
        return lambda *args, **meta: launch(*[float(np.float32(a)) if isinstance(a, float) else a for a in args],
                                           **meta)

    monkeypatch.setattr(runtime.Kernel, "__getitem__", as_compiled)
    parts = runtime.f64_parts(1 / 3)
    assert sum(parts) == 1 / 3 and all(float(np.float32(p)) == p for p in parts)
    g = torch.Generator().manual_seed(0)
    x, m0, m1, m2 = (torch.randn(1000, generator=g, dtype=torch.float64) for _ in range(4))
    coef = (1 / 3, -2 / 7, 0.1234567890123, 0.987654321)
    torch.testing.assert_close(dpm_solver.update_triton(x, [m0, m1, m2], coef),
                               dpm_solver.update_reference(x, [m0, m1, m2], coef), rtol=1e-14, atol=1e-14)
    sigma = torch.rand(10, generator=g, dtype=torch.float64) * 80
    xs, fs = (torch.randn(10, 3, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(precond.scale_rows_triton(xs, sigma, 0.5 ** 0.5, torch.float64),
                               precond.input_reference(xs, sigma, 0.5 ** 0.5, torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(precond.output_triton(xs, fs, sigma, 0.5 ** 0.5, 0.002, True),
                               precond.output_reference(xs, fs, sigma, 0.5 ** 0.5, 0.002, True), rtol=1e-14,
                               atol=1e-14)
    if not runtime.interpreter_runs_loops():   # Triton 3.6 with NumPy 2.4: the attention kernel cannot be interpreted
        return
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 5, 72, generator=g, dtype=torch.float64) for _ in range(6))
    o, do = jvp_attention.attention_jvp_triton(q, k, v, dq, dk, dv, 72 ** -0.5)
    ref_o = jvp_attention.attention_reference(q, k, v)
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(do, jvp_attention.attention_tangent(q, k, v, ref_o, dq, dk, dv, 72 ** -0.5),
                               rtol=1e-12, atol=1e-12)
