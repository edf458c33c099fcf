"""One Mean Flow training iteration with the engine's JVP paths against `torch.func.jvp` through explicit math
attention (what public Mean Flow code falls back to), and against a plain flow-matching iteration of the same
network and batch:

    mf_dual            the default: the DiT's dual-stream JVP (primal and tangent batched through each linear
                       layer; attention (O, Ȯ) from the one-pass kernel: the C++ block on CPU, Triton on CUDA)
    mf_forward_ad      torch.func.jvp through the attention op's forward-AD rule (same kernels for the tangent)
    mf_math_attention  torch.func.jvp through explicit attention
    mf_fd              the central difference (two ordinary forwards, step engine.jvp.FD_STEP)
    mf_dual_autocast   (CUDA only) the dual-stream JVP under the step's bf16 autocast instead of the default
                       float32 pass (jvp_precision='autocast'; on a CPU there is no autocast, so it would equal mf_dual)
    flow_matching      the plain flow-matching iteration

Besides the whole iteration, each Mean Flow variant times its JVP alone (no grad, the whole batch, under the
step's autocast) and measures that JVP's relative error (‖d − d₆₄‖/‖d₆₄‖) against torch.func.jvp of a float64
copy of the network through explicit attention: what each path costs and what it gives.

    python bench/jvp.py                       # CPU: DiT-B/4, batch 8;  GPU: DiT-XL/2, batch 32
    python bench/jvp.py --name B/4 --batch 8 --record
    python bench/jvp.py --smoke               # a tiny DiT, two repetitions: checks the script runs

Each variant runs in its own process, so peak memory is that variant's alone (CUDA: max_memory_allocated; CPU:
the process's peak resident set, which includes the interpreter and the weights). Times: median of repeated
iterations (engine.training.loop.train_step) after warm-up, device-synchronised.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import resource
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from engine.checks import nonneg_int_arg, positive_int_arg  # noqa: E402

VARIANTS = ("mf_dual", "mf_forward_ad", "mf_math_attention", "mf_fd", "mf_dual_autocast", "flow_matching")
CUDA_ONLY = ("mf_dual_autocast",)
MODES = dict(mf_dual=("dual", "fp32"), mf_forward_ad=("func", "fp32"), mf_math_attention=("func", "fp32"),
             mf_fd=("fd", "fp32"), mf_dual_autocast=("dual", "autocast"))


def run_variant(a) -> dict:
    from common import StepBench, median_time

    from engine import ops
    from engine.data.sampler import TensorSource
    from engine.kernels.jvp_attention import attention_reference
    from engine.networks import DiT
    from engine.objectives import FlowMatching, MeanFlow
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.variant == "mf_math_attention":
        ops.attention = lambda q, k, v, scale=None: attention_reference(q, k, v, scale)
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2) if a.smoke else \
        DiT.from_name(a.name, input_size=32, in_channels=4, num_classes=1000)
    objective = FlowMatching() if a.variant == "flow_matching" else \
        MeanFlow(omega=1.0, kappa=0.5, jvp=MODES[a.variant][0], jvp_precision=MODES[a.variant][1])
    size = 8 if a.smoke else 32
    data = TensorSource(torch.randn(4 * a.batch, 4, size, size, device=device),
                        torch.randint(0, 1000, (4 * a.batch,), device=device))
    bench = StepBench(net, objective, data, a.batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = bench.time(a.reps, a.warmup)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    jvp_ms = jvp_err = None
    if a.variant != "flow_matching":  # the JVP alone, whole batch, after the iteration's peak was read
        g = torch.Generator(device).manual_seed(5)
        z, v = torch.randn(2, a.batch, 4, size, size, device=device, generator=g)
        t = torch.rand(a.batch, device=device, generator=g)
        r, y = t * 0.5, torch.randint(0, 1000, (a.batch,), device=device, generator=g)

        def jvp():
            with bench.autocast:
                return objective.time_derivative(net, z, r, t, y, v)
        jvp_ms = 1e3 * median_time(jvp, device, a.reps, a.warmup)
        got = jvp().double()
        ops.attention = lambda q, k, v, scale=None: attention_reference(q, k, v, scale)
        net64 = copy.deepcopy(net).double()
        ref = MeanFlow(jvp="func").time_derivative(net64, z.double(), r.double(), t.double(), y, v.double())
        jvp_err = float((got - ref).norm() / ref.norm())
    return dict(variant=a.variant, ms=seconds * 1e3, jvp_ms=jvp_ms, jvp_rel_err=jvp_err, peak_gib=peak / 2 ** 30,
                device=device.type)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=None, help="DiT configuration (default B/4 on CPU, XL/2 on a GPU)")
    p.add_argument("--batch", type=positive_int_arg, default=None)
    p.add_argument("--reps", type=positive_int_arg, default=5)
    p.add_argument("--warmup", type=nonneg_int_arg, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--record", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    a.name = a.name or ("XL/2" if gpu else "B/4")
    a.batch = a.batch or (32 if gpu else 8)
    if a.smoke:
        a.reps, a.warmup, a.batch = 2, 1, 4
    if a.variant:  # a child process: one variant, result as JSON on the last line
        print(json.dumps(run_variant(a)))
        return {}
    rows = []
    for variant in (v for v in VARIANTS if gpu or v not in CUDA_ONLY):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--name", a.name, "--batch",
               str(a.batch), "--reps", str(a.reps), "--warmup", str(a.warmup)] + (["--smoke"] if a.smoke else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    by = {r["variant"]: r for r in rows}
    from common import machine
    res = dict(date=datetime.date.today().isoformat(), machine=machine(torch.device("cuda" if gpu else "cpu")),
               command="python bench/jvp.py " + " ".join(argv), network="tiny DiT" if a.smoke else f"DiT-{a.name}",
               batch=a.batch, rows=rows,
               dual_over_math=by["mf_dual"]["ms"] / by["mf_math_attention"]["ms"],
               dual_jvp_over_math_jvp=by["mf_dual"]["jvp_ms"] / by["mf_math_attention"]["jvp_ms"],
               mf_over_fm=by["mf_dual"]["ms"] / by["flow_matching"]["ms"],
               fd_over_dual=by["mf_fd"]["ms"] / by["mf_dual"]["ms"],
               fd_jvp_over_dual_jvp=by["mf_fd"]["jvp_ms"] / by["mf_dual"]["jvp_ms"])
    jvp = lambda r: "–" if r["jvp_ms"] is None else f"{r['jvp_ms']:.1f}"
    err = lambda r: "–" if r["jvp_rel_err"] is None else f"{r['jvp_rel_err']:.1e}"
    text = "\n".join([
        f"### Mean Flow JVP — {res['date']}", "", f"Machine: {res['machine']}", "", f"Command: `{res['command']}`",
        "", f"{res['network']}, batch {a.batch}, Mean Flow with guidance (ω 1, κ 0.5), 25% of rows with r ≠ t:", "",
        "| variant | ms / iteration | ms / JVP alone (whole batch) | JVP relative error vs float64 | peak memory GiB |",
        "|---|---|---|---|---|",
        *[f"| {r['variant']} | {r['ms']:.1f} | {jvp(r)} | {err(r)} | {r['peak_gib']:.2f} |" for r in rows], "",
        f"Mean Flow iteration, dual-stream JVP / math-attention torch.func.jvp: {res['dual_over_math']:.2f}×; "
        f"the JVP alone: {res['dual_jvp_over_math_jvp']:.2f}×; Mean Flow (dual) / flow matching: "
        f"{res['mf_over_fm']:.2f}× (goal on a GPU: ≤ 1.4×). Central difference / dual-stream: "
        f"{res['fd_over_dual']:.2f}× per iteration, {res['fd_jvp_over_dual_jvp']:.2f}× for the JVP alone.", ""])
    print(text)
    from common import write_results
    write_results(res, text, a.out, "jvp", a.smoke, a.record)
    return res


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
