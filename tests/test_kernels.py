"""The fused kernels (kernels/) against their PyTorch references, run in Triton's interpreter on CPU.

Accuracy criterion (STYLE.md): on fresh random inputs of sizes that are not multiples of the block, the kernel's
max error against a float64 computation from the same stored inputs is at most twice PyTorch's own error for
that dtype (the reference sequence run in that dtype). Gradients: gradcheck in float64 through the reference and
through the kernels, and kernel gradients equal to the reference's in fp32/bf16.
"""
import pytest
import torch
import triton  # noqa: F401  (a test dependency: the kernels must be exercised in CI, not skipped)
from devices import DEVICES

from engine import ops
from engine.data import GaussianMixture
from engine.kernels import dpm_solver as kdpm
from engine.kernels import precond as kpre
from engine.kernels import runtime
from engine.networks import build_network
from engine.precond import CMPrecond, EDMPrecond
from engine.schedules import logsnr_sigmas
from engine.solvers import dpm_solver_pp, dpm_solver_pp_coefficients

SIZES = [(1,), (1025,), (3, 3, 17, 13), (2, 4, 33, 7)]  # 1, block + 1, 1989, 1848 elements


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "triton")


@pytest.fixture
def ref_mode(monkeypatch):
    monkeypatch.setenv("ENGINE_KERNELS", "ref")


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---- the dispatch point ---------------------------------------------------------------------------------------

def test_mode_switch(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv("ENGINE_KERNELS", raising=False)
    assert ops.kernel_mode() == "auto" and ops.backend_name(x) == "ref"  # auto: kernels only for CUDA tensors
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    assert ops.backend_name(x) == "triton-interpreter"
    monkeypatch.setenv("ENGINE_KERNELS", "ref")
    assert ops.backend_name(x) == "ref"
    monkeypatch.setenv("ENGINE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="ENGINE_KERNELS='cuda' is not one of"):
        ops.kernel_mode()
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    monkeypatch.setattr(runtime, "triton", None)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        ops.dpm_solver_update(x, [x], [1, 0, 0, 0])


# ---- fused DPM-Solver++ update ----------------------------------------------------------------------------------

def grid_coefficients():
    coef, orders = dpm_solver_pp_coefficients(logsnr_sigmas(16), order=3)
    return coef.tolist(), orders


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SIZES)
def test_update_within_twice_pytorch_error(dtype, shape, device):
    coefs, orders = grid_coefficients()
    g = torch.Generator().manual_seed(hash(shape) % 2 ** 31)
    x = (torch.randn(shape, generator=g) * 20).to(device, dtype)       # a σ ≈ 20 state: values well away from 0
    ms = [torch.randn(shape, generator=g).to(device, dtype) for _ in range(3)]
    for step in (0, 1, 5, 15):                                 # orders 1, 2, 3 and the final first-order step
        k = orders[step]
        coef = coefs[step]
        truth = kdpm.update_reference(x.double(), [m.double() for m in ms[:k]], coef)
        torch_err = max_err(kdpm.update_reference(x, ms[:k], coef), truth)
        kernel = kdpm.update_triton(x, ms[:k], coef)
        assert kernel.dtype == dtype and kernel.shape == x.shape
        assert max_err(kernel, truth) <= 2 * torch_err + 1e-30, (step, k, max_err(kernel, truth), torch_err)


@pytest.mark.parametrize("device", DEVICES)
def test_update_writes_only_its_trajectory_slot(triton_mode, device):
    coefs, orders = grid_coefficients()
    buf = torch.randn(5, 3, 2, 9, 9, device=device)
    before = buf.clone()
    hist = [torch.randn(3, 2, 9, 9, device=device) for _ in range(3)]
    ops.dpm_solver_update(buf[1], hist, coefs[4], out=buf[2])
    torch.testing.assert_close(buf[2], kdpm.update_reference(before[1], hist, coefs[4]), rtol=1e-6, atol=1e-6)
    for i in (0, 1, 3, 4):
        assert torch.equal(buf[i], before[i])


def test_update_rejects_mismatched_operands():
    x = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="history\\[1\\] is \\(4, 3\\)"):
        kdpm.update_triton(x, [x, torch.zeros(4, 3)], [1, 0, 0, 0])
    with pytest.raises(ValueError, match="1 to 3 denoiser outputs"):
        kdpm.update_triton(x, [], [1, 0, 0, 0])
    with pytest.raises(ValueError, match="contiguous"):
        kdpm.update_triton(x.t(), [x], [1, 0, 0, 0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_trajectory_through_dispatcher_equals_reference(monkeypatch, dtype, device):
    """A whole 16-step CMT teacher trajectory (orders 1, 2, 3×12, 2, 1) on the analytic teacher: the fused path
    equals the reference path to the rounding of the storage dtype, at every state."""
    gm = GaussianMixture.random(4, (3, 5, 5), std=0.3, seed=1)
    teacher = lambda x, s, labels=None: gm.denoise(x.double(), s.double()).to(x.device, x.dtype)
    x_T = (torch.randn(6, 3, 5, 5, generator=torch.Generator().manual_seed(3)) * 80).to(device, dtype)
    sig = logsnr_sigmas(16)
    monkeypatch.setenv("ENGINE_KERNELS", "ref")
    ref = dpm_solver_pp(teacher, x_T, sig)
    monkeypatch.setenv("ENGINE_KERNELS", "triton")
    fused = dpm_solver_pp(teacher, x_T, sig)
    assert fused.shape == (17, 6, 3, 5, 5) and fused.dtype == dtype
    truth = dpm_solver_pp(teacher, x_T.double(), sig)  # float64 trajectory from the same start
    for i in range(17):
        # at every state the fused path is no further from float64 than PyTorch's own sequence (bf16: it rounds
        # once per update where the sequence rounds after every operation) …
        assert max_err(fused[i], truth[i]) <= 2 * max_err(ref[i], truth[i]) + 1e-7, i
        # … and in fp32 the two paths agree to rounding
        if dtype == torch.float32:
            assert max_err(fused[i], ref[i]) <= 2e-6 * truth[i].abs().max().item(), i


# ---- fused preconditioning ------------------------------------------------------------------------------------

def random_sigma(batch, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.rand(batch, generator=g, dtype=torch.float64) * 10.6 - 6.2).to(dtype)  # 0.002 … 80


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SIZES[1:])
def test_input_side_within_twice_pytorch_error(shape, out_dtype, device):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device) * 40
    sigma = random_sigma(shape[0]).to(device)
    truth = kpre.input_reference(x.double(), sigma.double(), 0.5, torch.float64)
    torch_err = max_err(kpre.input_reference(x, sigma, 0.5, out_dtype), truth)
    kernel = kpre.precond_input(x, sigma, 0.5, out_dtype)
    assert kernel.dtype == out_dtype
    assert max_err(kernel, truth) <= 2 * torch_err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("boundary", [False, True])
@pytest.mark.parametrize("shape", SIZES[1:])
def test_output_side_within_twice_pytorch_error(shape, boundary, f_dtype, device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g).to(device) * 40
    F = torch.randn(shape, generator=g).to(device, f_dtype)
    sigma = random_sigma(shape[0], seed=3).to(device)
    truth = kpre.output_reference(x.double(), F.double(), sigma.double(), 0.5, 0.003, boundary)
    torch_err = max_err(kpre.output_reference(x, F, sigma, 0.5, 0.003, boundary), truth)
    kernel = kpre.precond_output(x, F, sigma, 0.5, 0.003, boundary)
    assert kernel.dtype == torch.float32
    assert max_err(kernel, truth) <= 2 * torch_err


def test_boundary_condition_is_exact_in_the_kernel():
    x = torch.randn(3, 2, 4, 4)
    out = kpre.precond_output(x, torch.randn_like(x), torch.full((3,), 0.003), 0.5, 0.003, True)
    assert torch.equal(out, x)  # c_skip = 1, c_out = 0 at σ = σ_min


def _grad_inputs(dtype=torch.float64, batch=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, 2, 3, 5, generator=g, dtype=dtype) * 3).requires_grad_()
    F = torch.randn(batch, 2, 3, 5, generator=g, dtype=dtype).requires_grad_()
    sigma = random_sigma(batch, dtype, seed).requires_grad_()
    return x, F, sigma


@pytest.mark.parametrize("mode", ["ref", "triton"])
@pytest.mark.parametrize("boundary", [False, True])
def test_precond_gradcheck_float64(monkeypatch, mode, boundary):
    monkeypatch.setenv("ENGINE_KERNELS", mode)
    x, F, sigma = _grad_inputs()
    assert torch.autograd.gradcheck(lambda x, s: ops.precond_input(x, s, 0.5, torch.float64), (x, sigma))
    assert torch.autograd.gradcheck(lambda x, F, s: ops.precond_output(x, F, s, 0.5, 0.003, boundary),
                                    (x, F, sigma))
    one = sigma[:1].detach().clone().requires_grad_()  # one σ broadcast over the batch
    assert torch.autograd.gradcheck(lambda x, F, s: ops.precond_output(x, F, s, 0.5, 0.003, boundary),
                                    (x, F, one))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("f_dtype", [torch.float32, torch.bfloat16])
def test_precond_kernel_gradients_match_reference(monkeypatch, f_dtype, device):
    grads = {}
    for mode in ("ref", "triton"):
        monkeypatch.setenv("ENGINE_KERNELS", mode)
        x, F, sigma = (t.detach().to(device).requires_grad_() for t in _grad_inputs(torch.float32, batch=5, seed=7))
        Fd = F.detach().to(f_dtype).requires_grad_()
        x_in = ops.precond_input(x, sigma, 0.5, f_dtype)
        D = ops.precond_output(x, Fd * x_in, sigma, 0.5, 0.003, True)   # a backbone-like product of the two sides
        (D.square().sum()).backward()
        grads[mode] = (x.grad, Fd.grad, sigma.grad)
        assert Fd.grad.dtype == f_dtype
    for r, k in zip(grads["ref"], grads["triton"]):
        tol = 1e-5 if f_dtype == torch.float32 else 2e-2
        torch.testing.assert_close(k.float(), r.float(), rtol=tol, atol=tol * r.abs().max().item())


def test_wrappers_equal_through_both_paths(monkeypatch):
    """EDMPrecond and CMPrecond (train and eval mode) give the same outputs and parameter gradients with the
    kernels as with the reference."""
    torch.manual_seed(0)
    backbone = build_network("gmm-mlp", hidden_channels=16, num_blocks=1)
    x = torch.randn(7, 2) * 5
    sigma = random_sigma(7, seed=9)
    for cls, train in ((EDMPrecond, False), (CMPrecond, True), (CMPrecond, False)):
        net = cls(backbone).train(train)
        outs = {}
        for mode in ("ref", "triton"):
            monkeypatch.setenv("ENGINE_KERNELS", mode)
            net.zero_grad()
            out = net(x, sigma)
            out.square().mean().backward()
            outs[mode] = (out.detach(), [p.grad.clone() for p in net.parameters()])
        torch.testing.assert_close(outs["triton"][0], outs["ref"][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(outs["triton"][1], outs["ref"][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- registered ops: schema, fake implementations, autograd registration, torch.compile ------------------------

def test_opcheck_registered_ops():
    x, F, sigma = _grad_inputs(torch.float32)
    torch.library.opcheck(torch.ops.engine.precond_input, (x, sigma, 0.5, torch.bfloat16))
    torch.library.opcheck(torch.ops.engine.precond_output, (x, F, sigma, 0.5, 0.003, True))
    torch.library.opcheck(torch.ops.engine.precond_output_backward,
                          (F.detach(), sigma.detach(), 0.5, 0.003, False, torch.float32, torch.bfloat16))
    xs = [torch.randn(4, 33) for _ in range(4)]
    torch.library.opcheck(torch.ops.engine.dpm_solver_update, (xs[0], xs[1:], [0.9, 0.2, -0.1, 0.01], xs[0].clone()))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_traces_through_the_kernels(triton_mode, device):
    """The registered ops trace without a graph break (their fake implementations); on CUDA inductor compiles
    the code around the launched kernels."""
    coefs, _ = grid_coefficients()

    def step(x, m0, m1, m2, sigma, F):
        nxt = ops.dpm_solver_update(x, [m0, m1, m2], coefs[6])
        return ops.precond_output(nxt, F, sigma, 0.5, 0.003, True)

    args = [t.to(device) for t in [torch.randn(3, 65) for _ in range(4)] + [random_sigma(3), torch.randn(3, 65)]]
    compiled = torch.compile(step, backend="aot_eager" if device == "cpu" else "inductor", fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_values_propagate(dtype, device):
    """A NaN or inf in the state reaches the output (the bf16 rounding must not turn a NaN into a number)."""
    x = torch.randn(1030).to(device, dtype)
    x[3], x[1027] = float("nan"), float("inf")
    out = kdpm.update_triton(x, [torch.randn(1030).to(device, dtype)], [0.5, 0.25, 0, 0])
    assert out[3].isnan() and out[1027].isinf() and out[1027] > 0
    assert torch.isfinite(out[[0, 1, 2, 4, 1029]]).all()
    y = kpre.precond_input(x.float().reshape(2, 515), torch.tensor([1.0, 2.0], device=device), 0.5,
                           dtype).reshape(-1)
    assert y[3].isnan() and y[1027].isinf()


def test_engine_works_without_triton():
    """A CPU install without Triton imports and runs on the references (Triton is only a test dependency)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\n"
            "from engine import ops\n"
            "from engine.data import GaussianMixture\n"
            "from engine.schedules import logsnr_sigmas\n"
            "from engine.solvers import dpm_solver_pp\n"
            "gm = GaussianMixture.random(3, (2,), seed=0)\n"
            "print(dpm_solver_pp(gm.denoise, torch.randn(4, 2) * 80, logsnr_sigmas(8)).shape, "
            "ops.backend_name(torch.zeros(1)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch.Size([9, 4, 2]) ref"
