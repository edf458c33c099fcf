"""The one dispatch point between the PyTorch reference math and the fused kernels in kernels/.

    ENGINE_KERNELS=auto     (default) Triton kernels for CUDA tensors (not float64) when Triton is installed,
                            the reference otherwise;
    ENGINE_KERNELS=triton   always the kernels; on CPU tensors they run in Triton's interpreter (this is how
                            CI checks them without a GPU); an error if Triton is not installed;
    ENGINE_KERNELS=ref      always the reference.

The variable is read at every call, so a test can switch it with monkeypatch. `engine.solvers.dpm_solver_pp` and
the preconditioning wrappers (`engine.precond`) call these functions and nothing else for the fused math.

Under `torch.compile` the kernel path goes through the registered ops (`torch.ops.engine.*`, which have fake
implementations); in eager mode it launches the kernels directly, saving the custom-op wrapper's host overhead
on what is a launch-bound path.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch

from engine.kernels import dpm_solver as _dpm
from engine.kernels import jvp_attention as _attn
from engine.kernels import precond as _pre
from engine.kernels import runtime

MODES = ("auto", "triton", "ref")


def autocast_off(device: torch.device | str):
    """A region where the loop's autocast is switched off on `device` (teacher solves and LPIPS heads run in
    fp32). A device type without autocast (the meta device the host-traffic tests run on) has nothing to switch
    off."""
    device_type = torch.device(device).type
    if device_type in ("cuda", "cpu", "xpu", "mps", "hpu"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def kernel_mode() -> str:
    mode = os.environ.get("ENGINE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"ENGINE_KERNELS={mode!r} is not one of {MODES}")
    return mode


def use_kernels(x: torch.Tensor) -> bool:
    """Whether calls on `x` take the Triton path."""
    mode = kernel_mode()
    if mode == "ref":
        return False
    if mode == "triton":
        runtime.require()
        return x.device.type in ("cuda", "cpu")
    # float64 stays on the reference here: it is for references (ENGINE_KERNELS=triton runs the fp64 kernels, whose
    # scalars keep their precision: kernels/runtime.py f64_parts)
    return x.device.type == "cuda" and x.dtype != torch.float64 and runtime.triton is not None


def backend_name(x: torch.Tensor) -> str:
    """'triton' (compiled, CUDA), 'triton-interpreter' (CPU) or 'ref', for logs and benchmark tables."""
    if not use_kernels(x):
        return "ref"
    return "triton" if x.device.type == "cuda" else "triton-interpreter"


def dpm_solver_update(x: torch.Tensor, history: Sequence[torch.Tensor], coef: Sequence[float],
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """x_next = a·x + b0·M0 + b1·M1 + b2·M2 (history newest first, docs/spec/cm.md §2.5), written into `out` when
    given (a slot of the trajectory buffer)."""
    if not use_kernels(x):
        return _dpm.update_reference(x, history, coef, out)
    history = [m.contiguous() for m in history]
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    coef = [float(c) for c in coef]
    if torch.compiler.is_compiling():
        torch.ops.engine.dpm_solver_update(x, history, coef, out)
    else:
        _dpm.update_triton(x, history, coef, out)
    return out


def precond_input(x: torch.Tensor, sigma: torch.Tensor, sigma_data: float,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """c_in·x with c_in = 1/√(σ² + σ_d²) per sample (docs/spec/cm.md §1.2), in `out_dtype` (default x's dtype):
    the network's input, already in its compute dtype. `sigma`: [B] or [1]. Differentiable in x and σ."""
    out_dtype = out_dtype or x.dtype
    if not use_kernels(x):
        return _pre.input_reference(x, sigma, sigma_data, out_dtype)
    return _pre.precond_input(x, sigma, sigma_data, out_dtype)


def precond_output(x: torch.Tensor, F: torch.Tensor, sigma: torch.Tensor, sigma_data: float,
                   sigma_min: float = 0.0, boundary: bool = False) -> torch.Tensor:
    """D = c_skip·x + c_out·F in x's dtype (fp32 for training; docs/spec/cm.md §1.2–1.3). EDM: c_skip = σ_d²/(σ²+σ_d²),
    c_out = σσ_d/√(σ²+σ_d²); with `boundary` (consistency model, eval mode) σ − σ_min replaces σ in c_skip and in
    c_out's numerator, so D(x, σ_min) = x. Differentiable in x, F and σ."""
    if not use_kernels(x):
        return _pre.output_reference(x, F, sigma, sigma_data, sigma_min, boundary)
    return _pre.precond_output(x, F, sigma, sigma_data, sigma_min, boundary)


def attention_backend(q: torch.Tensor) -> str:
    """Where the attention tangent (and the dual path's (O, Ȯ)) comes from for tensors like `q`: 'triton' for CUDA
    tensors with Triton (and for CPU tensors under ENGINE_KERNELS=triton: the interpreter), 'cpp' for CPU tensors
    when the C++ extension is built, 'ref' otherwise or under ENGINE_KERNELS=ref."""
    if use_kernels(q) and (q.device.type == "cuda" or kernel_mode() == "triton"):
        return "triton"
    if q.device.type == "cpu" and kernel_mode() != "ref" and _attn.extension() is not None:
        return "cpp"
    return "ref"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(QKᵀ/√d)V for [batch, heads, seq, head_dim], under autograd and under `torch.func.jvp` (forward AD):
    the primal and its backward are PyTorch's fused attention, the tangent comes from the op's own rule
    (kernels/jvp_attention.py; docs/spec/mf.md §2.3) from `attention_backend(q)`. float64 included.
    Inside a compiled region (engine/training/compiled.py) it is PyTorch's fused attention itself — the same primal and
    backward — because dynamo cannot trace an autograd.Function with a custom jvp; forward-mode AD through a
    compiled block is not supported (Mean Flow's JVP runs the dual-stream path on the weights, dit_jvp.py)."""
    if torch.compiler.is_compiling():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return _attn.attention(q, k, v, scale, attention_backend(q))


def attention_jvp(q, k, v, dq, dk, dv, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, Ȯ) in one call for explicit tangents (None = zero): the manual dual-stream JVP of the DiT
    (engine/networks/dit_jvp.py) calls this instead of going through forward AD. No autograd."""
    import math
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _attn.attention_jvp(q, k, v, dq, dk, dv, scale, attention_backend(q))
