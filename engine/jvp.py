"""The forward-mode derivatives the objectives take of the student, without gradients: the exact JVP and the
central finite difference beside it, and the precision the pass runs in. Mean Flow (du/dt along (ṽ, 0, 1)) and
sCT / sCD (dF⁻/dt along the trajectory) use these; which network module they run on is engine.dist.jvp_view.

Modes (an objective's `jvp` setting):

    exact   torch.func.jvp, or a network's own dual-stream JVP (the DiT, engine/networks/dit_jvp.py);
    'fd'    the central difference along the whole tangent direction p̂ = (ẋ, ṫ, …):
                J·p̂ ≈ (f(p + h·p̂) − f(p − h·p̂)) / 2h
            two ordinary forwards, so whatever runs a forward runs it — fused attention without a forward-AD
            rule, FSDP wrappers, compiled regions (NVlabs/FastGen and TiM offer it for that; docs/spec/mf.md §2.1 (4)).
            The step h is in units of the tangent: every input moves by h times its tangent, so sCM's t moves by
            h·cos t sin t and Mean Flow's t by h. The perturbed inputs are formed in float64 and rounded once to
            the input dtype, and the difference is taken in float64. Its error is O(h²) (truncation) plus
            O(ε·|f|/h) (rounding, ε the compute dtype's epsilon): tests/test_jvp.py measures both against the
            exact JVP in float64 (error ∝ h² down to rounding) and picks the default h = FD_STEP for float32.

Precision (an objective's `jvp_precision`):

    'fp32'      the pass computes in float32 whatever the step's mixed precision: the CPU's bf16 autocast is
                switched off around it, and on CUDA it runs under autocast(float32), which also up-casts the bf16
                parameters FSDP2 gathers (MixedPrecisionPolicy) and overrides EDM2's fp16 backbone — so the tangent
                and the time embedding it flows through are float32 (docs/spec/mf.md §2.7 (2): FastGen's
                `precision_amp_jvp = float32`; NVlabs/rcm#10 needed fp32 time embeddings). float64 stays float64
                (autocast never touches it). The default.
    'autocast'  the pass inherits the step's autocast: tangents in bf16 on CUDA — cheaper, and measurably less
                accurate (tests/test_jvp.py measures both against float64 under CPU bf16 autocast).
"""
from __future__ import annotations

import contextlib

import torch

from engine.errors import EngineError

JVP_PRECISIONS = ("fp32", "autocast")
FD_STEP = 5e-3     # measured float32 optimum on the test networks (tests/test_jvp.py): truncation ∝ h², rounding ∝ 1/h
_LOW = (torch.bfloat16, torch.float16)


def check_precision(value: str, where: str) -> str:
    if value not in JVP_PRECISIONS:
        raise EngineError(f"{where}: jvp_precision must be one of {JVP_PRECISIONS}, got {value!r}")
    return value


def check_fd_precision(mode: str, setting: str, where: str) -> None:
    """A finite difference of bf16 forwards is noise (tests/test_jvp.py measures a relative error above 100%), so
    jvp='fd' requires the float32 pass."""
    if mode == "fd" and setting != "fp32":
        raise EngineError(f"{where}: jvp='fd' needs jvp_precision='fp32': a central difference of bf16 forwards has "
                          f"a relative error above 100% at any usable step")


def check_step(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < 1:
        raise EngineError(f"{where}: the finite-difference step fd_step must be a number in (0, 1) (in units of the "
                          f"tangent), got {value!r}")
    return float(value)


@contextlib.contextmanager
def precision(setting: str, device: torch.device | str):
    """The region a JVP pass runs in under `setting` (module docstring)."""
    device = torch.device(device)
    if setting == "autocast":
        yield
    elif device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float32):
            yield
    elif device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            yield
    else:
        yield


def at_least_fp32(setting: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The JVP's inputs in the pass's precision: bf16 / fp16 inputs up-cast under 'fp32', others as they are."""
    if setting != "fp32":
        return tensors
    return tuple(t.float() if t.is_floating_point() and t.dtype in _LOW else t for t in tensors)


def central_difference(f, primals: tuple, tangents: tuple, h: float) -> torch.Tensor:
    """(f(p + h·ṗ) − f(p − h·ṗ)) / 2h, the perturbed inputs formed in float64 and rounded once to each primal's dtype,
    the difference taken in float64; returned in f's output dtype. `f` must draw the same random numbers (dropout
    masks) at both points: callers pin them (engine.networks.dropout.dropout_generator inside f)."""
    def moved(sign):
        return tuple((p.double() + sign * h * d.double()).to(p.dtype) for p, d in zip(primals, tangents))
    plus = f(*moved(1))
    minus = f(*moved(-1))
    return ((plus.double() - minus.double()) / (2 * h)).to(plus.dtype)
