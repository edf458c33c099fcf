"""Fast-teacher benchmarks: the fused DPM-Solver++ update, the CUDA-graph teacher, the trajectory cache, and the
CMT iteration against the ECT iteration.

    python bench/fast_teacher.py              # a GPU: every table; JSON to bench/results/, markdown to stdout
    python bench/fast_teacher.py --record     # the same, and the tables appended to bench/RESULTS.md
    python bench/fast_teacher.py --smoke      # CPU, tiny sizes, two repetitions: checks that the script runs

1. Fused update: effective bandwidth (the bytes the update must move: read x and k outputs, write one state)
   of the Triton kernel, of PyTorch's eager sequence for the same expanded update (4 kernels), of the upstream
   difference form (D1_0, D1_1, D1, D2 then the φ-sum, as LuChengTHU/dpm-solver and sony/cmt write it), and of a
   device-to-device copy of one state (the bandwidth ceiling).
2. Teacher trajectory, 16 NFE on the CIFAR-10 DDPM++ teacher at 8 trajectories: eager with the reference math,
   eager with the kernels, CUDA-graph replay, the teacher's blocks compiled (engine/training/compiled.py) run eagerly
   and
   captured in a CUDA graph — the loop keeps the graph teacher and compile off until this row says otherwise — and
   reading 8 stored trajectories from a trajectory store.
3. One training iteration (engine.training.loop.train_step, the same function training runs; RAdam, bf16 autocast) on
the
   CIFAR-10 DDPM++ student at 128 pairs: ECT (the post-training objective of recipes/cifar10_cmt_ect.py), CMT
   with the eager teacher, CMT with the graph teacher and kernels, and CMT on cached trajectories; each with the
   squared-L2 distance and with LPIPS (random VGG weights: same cost as the real ones).

Timings: warm-up iterations first (Triton compilation, cuDNN autotuning, graph capture), then the median of the
timed repetitions (CUDA events around each). Networks have random weights; speed does not depend on them.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import StepBench, kernel_mode, machine, median_time, sync, write_results  # noqa: E402

from engine import ops  # noqa: E402
from engine.checks import nonneg_int_arg, positive_int_arg  # noqa: E402
from engine.data.sampler import TensorSource  # noqa: E402
from engine.kernels import dpm_solver as kdpm  # noqa: E402
from engine.networks import build_network  # noqa: E402
from engine.objectives import CMT, ECT, CachedCMT, perceptual, squared_l2  # noqa: E402
from engine.perceptual.lpips import LPIPS  # noqa: E402
from engine.precond import CMPrecond, EDMPrecond  # noqa: E402
from engine.schedules import logsnr_sigmas  # noqa: E402
from engine.solvers import dpm_solver_pp_coefficients  # noqa: E402
from engine.teacher import trajectory_cache as tc  # noqa: E402
from engine.teacher.solver import TeacherSolver  # noqa: E402
from engine.training.compiled import compile_regions  # noqa: E402

# ---- 1. the fused update ----------------------------------------------------------------------------------------

def upstream_difference_form(x, m0, m1, m2, t, s0, s1, s2):
    """The third-order multistep update as the reference code writes it (docs/spec/cm.md §2.5): one kernel per op."""
    lam = lambda v: -math.log(v)
    h, h0, h1 = lam(t) - lam(s0), lam(s0) - lam(s1), lam(s1) - lam(s2)
    r0, r1 = h0 / h, h1 / h
    phi1 = math.expm1(-h)
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    d1_0 = (1.0 / r0) * (m0 - m1)
    d1_1 = (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return (t / s0) * x - phi1 * m0 + phi2 * d1 - phi3 * d2


def bench_update(device, sizes, dtypes, reps, warmup):
    sig = logsnr_sigmas(16)
    coef, _ = dpm_solver_pp_coefficients(sig)
    step = 6  # a third-order step
    c = coef[step].tolist()
    t, s0, s1, s2 = (sig[step + 1 - j].item() for j in range(4))
    rows = []
    for n in sizes:
        for dtype in dtypes:
            x, m0, m1, m2 = (torch.randn(n, device=device).to(dtype) for _ in range(4))
            out = torch.empty_like(x)
            useful = 5 * n * x.element_size()  # read x, M0, M1, M2; write x_next
            fused = median_time(lambda: kdpm.update_triton(x, [m0, m1, m2], c, out), device, reps, warmup)
            eager = median_time(lambda: kdpm.update_reference(x, [m0, m1, m2], c, out), device, reps, warmup)
            upstream = median_time(lambda: upstream_difference_form(x, m0, m1, m2, t, s0, s1, s2), device, reps,
                                   warmup)
            copy = median_time(lambda: out.copy_(x), device, reps, warmup)
            copy_bw = 2 * n * x.element_size() / copy
            # accuracy beside speed: each form against the float64 update of the same (rounded) inputs
            exact = kdpm.update_reference(x.double(), [m.double() for m in (m0, m1, m2)], c)
            err = lambda y: float((y.double() - exact).abs().max() / exact.abs().max())
            rows.append(dict(elements=n, dtype=str(dtype).replace("torch.", ""),
                             fused_rel_err=err(kdpm.update_triton(x, [m0, m1, m2], c)),
                             eager_rel_err=err(kdpm.update_reference(x, [m0, m1, m2], c)),
                             upstream_rel_err=err(upstream_difference_form(x, m0, m1, m2, t, s0, s1, s2)),
                             fused_us=fused * 1e6, eager_us=eager * 1e6, upstream_us=upstream * 1e6,
                             copy_us=copy * 1e6, fused_GBs=useful / fused / 1e9, eager_GBs=useful / eager / 1e9,
                             upstream_GBs=useful / upstream / 1e9, copy_GBs=copy_bw / 1e9,
                             fused_over_copy_bw=(useful / fused) / copy_bw,
                             speedup_vs_eager=eager / fused, speedup_vs_upstream=upstream / fused))
    return rows


# ---- 2. the teacher trajectory -----------------------------------------------------------------------------------

def bench_teacher(device, teacher, shape, trajectories, reps, warmup, store_dir):
    sig = logsnr_sigmas(16)
    x_T = torch.randn(trajectories, *shape, device=device) * 80
    rows = {}
    with kernel_mode("ref"):
        eager_ref = TeacherSolver(teacher, sig, graphs=False)
        rows["eager_reference_ms"] = median_time(lambda: eager_ref(x_T), device, reps, warmup) * 1e3
    with kernel_mode("auto" if device.type == "cuda" else "ref"):
        eager_k = TeacherSolver(teacher, sig, graphs=False)
        rows["eager_kernels_ms"] = median_time(lambda: eager_k(x_T), device, reps, warmup) * 1e3
        graph = TeacherSolver(teacher, sig)
        rows["graph_ms"] = median_time(lambda: graph(x_T), device, reps, warmup) * 1e3
        rows["graph_replays"] = graph.replays
        reference = eager_ref(x_T)   # the same trajectory from each path (CPU: bit for bit)
        rows["kernels_vs_reference_max_abs"] = float((eager_k(x_T) - reference).abs().max())
        rows["graph_vs_reference_max_abs"] = float((graph(x_T) - reference).abs().max())
        # the teacher's blocks compiled (engine/training/compiled.py; inductor on CUDA, aot_eager in the CPU smoke): run
        # eagerly block by block, and captured in a CUDA graph (compilation happens in the capture's warm-up)
        compiled_teacher = copy.deepcopy(teacher)
        compile_regions(compiled_teacher, "default" if device.type == "cuda" else "aot_eager")
        compiled = TeacherSolver(compiled_teacher, sig, graphs=False)
        t0 = time.perf_counter()
        compiled(x_T)
        sync(device)
        rows["compile_s"] = time.perf_counter() - t0
        rows["compiled_ms"] = median_time(lambda: compiled(x_T), device, reps, warmup) * 1e3
        graph_compiled = TeacherSolver(compiled_teacher, sig)
        rows["graph_compiled_ms"] = median_time(lambda: graph_compiled(x_T), device, reps, warmup) * 1e3
        rows["compiled_vs_reference_max_abs"] = float((compiled(x_T) - reference).abs().max())
        rows["graph_compiled_vs_reference_max_abs"] = float((graph_compiled(x_T) - reference).abs().max())
        fastest = min(("graph", "compiled", "graph_compiled"), key=lambda k: rows[f"{k}_ms"])
        rows["fastest"] = fastest
        # a store of 64 trajectories; each timed read takes 8 random ones to the device
        images = torch.rand(64, *shape) * 2 - 1
        spec = tc.StoreSpec(num_trajectories=64, shape=list(shape), chunk=32, teacher="bench (random weights)")
        tc.write_store(store_dir, spec, teacher, TensorSource(images), device, batch=trajectories, progress=False)
        source = tc.TrajectorySource(store_dir)
        g = torch.Generator().manual_seed(0)
        rows["cache_read_ms"] = median_time(
            lambda: source.batch(torch.randperm(64, generator=g)[:trajectories], device), device, reps, warmup) * 1e3
    rows["graph_speedup"] = rows["eager_kernels_ms"] / rows["graph_ms"]
    rows["graph_speedup_vs_reference"] = rows["eager_reference_ms"] / rows["graph_ms"]
    return rows, source


# ---- 3. iterations -----------------------------------------------------------------------------------------------

def bench_iterations(device, student_fn, teacher, shape, batch, trajectories, reps, warmup, source, lpips):
    images = TensorSource(torch.rand(1024, *shape, device=device) * 2 - 1)
    distances = {"l2": squared_l2}
    if lpips is not None:
        distances["lpips"] = perceptual(lpips)
    results = {}
    arms = [("ect", lambda d: ECT(q=4096, distance=d), images, "auto"),
            ("cmt_eager_teacher", lambda d: CMT(teacher, trajectories_per_batch=trajectories, distance=d,
                                                graphs=False), images, "ref"),
            ("cmt_graph_teacher", lambda d: CMT(teacher, trajectories_per_batch=trajectories, distance=d), images,
             "auto"),
            ("cmt_cached", lambda d: CachedCMT(source.spec, trajectories_per_batch=trajectories, distance=d), source,
             "auto")]
    for dname, dist in distances.items():
        for arm, make, data, mode in arms:
            with kernel_mode(mode if device.type == "cuda" else "ref"):
                torch.manual_seed(0)
                results[f"{arm}/{dname}"] = StepBench(student_fn(), make(dist), data, batch, device).time(
                    reps, warmup) * 1e3
        ect = results[f"ect/{dname}"]
        for arm, *_ in arms[1:]:
            results[f"{arm}/{dname}/over_ect"] = results[f"{arm}/{dname}"] / ect
    return results


# ---- report ------------------------------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    lines = [f"### Fast teacher — {res['date']}", "", f"Machine: {res['machine']}", "",
             f"Command: `{res['command']}`", ""]
    lines += ["Fused DPM-Solver++ update (order 3; GB/s = bytes the update must move / time):", "",
              "| elements | dtype | fused µs | eager µs | upstream µs | copy µs | fused GB/s | copy GB/s | "
              "fused / copy bw | × vs eager | × vs upstream | rel. error fused / eager / upstream |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["update"]:
        lines.append(f"| {r['elements']} | {r['dtype']} | {r['fused_us']:.1f} | {r['eager_us']:.1f} | "
                     f"{r['upstream_us']:.1f} | {r['copy_us']:.1f} | {r['fused_GBs']:.0f} | {r['copy_GBs']:.0f} | "
                     f"{r['fused_over_copy_bw']:.2f} | {r['speedup_vs_eager']:.2f} | {r['speedup_vs_upstream']:.2f} | "
                     f"{r['fused_rel_err']:.1e} / {r['eager_rel_err']:.1e} / {r['upstream_rel_err']:.1e} |")
    t = res["teacher"]
    lines += ["", f"Teacher trajectory (16 NFE, {res['trajectories']} trajectories, {res['network']}):", "",
              "| eager, reference math | eager, kernels | CUDA graph | compiled | graph of compiled | cache read | "
              "graph × vs eager kernels | graph × vs eager reference | fastest | compile s |",
              "|---|---|---|---|---|---|---|---|---|---|",
              f"| {t['eager_reference_ms']:.2f} ms | {t['eager_kernels_ms']:.2f} ms | {t['graph_ms']:.2f} ms | "
              f"{t['compiled_ms']:.2f} ms | {t['graph_compiled_ms']:.2f} ms | "
              f"{t['cache_read_ms']:.2f} ms | {t['graph_speedup']:.2f} | {t['graph_speedup_vs_reference']:.2f} | "
              f"{t['fastest'].replace('_', ' ')} | {t['compile_s']:.0f} |"]
    it = res["iterations"]
    lines += ["", f"Training iteration (train_step, {res['batch']} pairs, {res['network']}, RAdam, "
              f"bf16 autocast on CUDA), ms and ratio to ECT:", "",
              "| distance | ECT | CMT eager teacher | CMT graph teacher | CMT cached |", "|---|---|---|---|---|"]
    for d in [d for d in ("l2", "lpips") if f"ect/{d}" in it]:
        cells = [f"{it[f'ect/{d}']:.1f}"] + [f"{it[f'{a}/{d}']:.1f} ({it[f'{a}/{d}/over_ect']:.2f}×)"
                                             for a in ("cmt_eager_teacher", "cmt_graph_teacher", "cmt_cached")]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check that the script runs")
    p.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    p.add_argument("--reps", type=positive_int_arg, default=50)
    p.add_argument("--warmup", type=nonneg_int_arg, default=10)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    a = p.parse_args(argv)
    device = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.smoke:
        raise SystemExit("bench/fast_teacher.py measures GPU speed and needs CUDA; use --smoke to check it on a CPU")
    if a.smoke:
        reps, warmup, sizes, dtypes = 2, 1, [4099], [torch.float32, torch.bfloat16]
        net_name, net_kw, shape, batch, trajectories = "digits-ddpmpp", dict(model_channels=8), (1, 8, 8), 32, 2
    else:
        reps, warmup = a.reps, a.warmup
        sizes, dtypes = [8 * 3 * 32 * 32, 128 * 3 * 32 * 32, 1 << 26], [torch.float32, torch.bfloat16]
        net_name, net_kw, shape, batch, trajectories = "cifar10-ddpmpp", {}, (3, 32, 32), 128, 8
    torch.manual_seed(0)
    teacher = EDMPrecond(build_network(net_name + ("-teacher" if not a.smoke else ""), **net_kw))
    teacher = teacher.to(device).eval().requires_grad_(False)
    student_fn = lambda: CMPrecond(build_network(net_name, **net_kw))
    lpips = None if a.smoke else LPIPS.random(0).to(device)  # LPIPS at 224² is minutes per step on a CPU
    res = dict(date=datetime.date.today().isoformat(), machine=machine(device),
               command="python bench/fast_teacher.py" + (" --smoke" if a.smoke else ""), network=net_name,
               trajectories=trajectories, batch=batch, kernels=ops.backend_name(torch.zeros(1, device=device)))
    with kernel_mode("triton"):  # the fused kernel itself, also on CPU (interpreter) for the smoke run
        res["update"] = bench_update(device, sizes, dtypes, reps, warmup)
    with tempfile.TemporaryDirectory() as tmp:
        res["teacher"], source = bench_teacher(device, teacher, shape, trajectories, reps, warmup,
                                               os.path.join(tmp, "store"))
        res["iterations"] = bench_iterations(device, student_fn, teacher, shape, batch, trajectories,
                                             max(2, reps // 5), max(1, warmup // 2), source, lpips)
    text = markdown(res)
    print(text)
    write_results(res, text, a.out, "fast_teacher", a.smoke, a.record)
    return res


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
