"""Per-iteration throughput of CMT mid-training against the consistency baselines, side by side in one process.

    python bench/throughput.py                                   # GPU: CIFAR-10 DDPM++, 128 pairs per iteration
    python bench/throughput.py --channels 32 --batch 64          # CPU: the same network at reduced width
    python bench/throughput.py ... --record                      # also append the tables to bench/RESULTS.md
    python bench/throughput.py --smoke                           # tiny, two repetitions: checks the script runs
    python bench/throughput.py --family dit                      # GPU: CMT-MF into XL/2 (B/4 teacher) vs MF vs FM
    python bench/throughput.py --family dit --student B/4 --trajectories 1        # CPU: 28 pairs, B/4 student

Methods (each one real training step, engine.training.loop.train_step: RAdam, bf16 autocast on CUDA, per-step RNG):
CMT (its 16-NFE DPM-Solver++ teacher trajectory included; eager teacher with the reference math, CUDA-graph
teacher with the kernels, trajectories read from a store), ECT (CT), ECD with an Euler and with a Heun teacher step
(CD-Euler, CD-Heun), sCT and sCD (TrigFlow, one JVP). `--family dit` compares the flow-map pipeline on a DiT
instead (docs/spec/mf.md §2.6): CMT-MF mid-training (a B/4 teacher's 8-step trajectories, 28 pairs each), Mean Flow
post-training (guidance folded in, dual-stream JVP) and plain flow matching, at the same pairs per iteration,
normalised to CMT-MF = 1; Adam, as those recipes. Per method: median
time per iteration after warm-up (device-synchronised), images/s (data images consumed), pairs/s (training pairs),
peak memory (CUDA), and on a GPU model FLOPs utilisation from FLOPs counted with torch.utils.flop_counter over one
step. Times are normalised to CMT = 1 in the layout of the paper's Table 10 (which reports CT 0.79, CD-Euler 0.98,
CD-Heun 1.17 on CIFAR-10). The PNG beside the JSON plots per-pair teacher NFE (bench/nfe_profile.py) and the
relative time per iteration.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import StepBench, kernel_mode, machine, peak_tflops, step_flags, sync, write_results  # noqa: E402

from engine.checks import positive_int_arg  # noqa: E402
from engine.data.sampler import TensorSource  # noqa: E402
from engine.networks import DiT, build_network  # noqa: E402
from engine.objectives import (CMT, ECD, ECT, SCD, SCT, CachedCMT, CMTMeanFlow, FlowMatching, MeanFlow,  # noqa: E402
                               perceptual, squared_l2)
from engine.perceptual.lpips import LPIPS  # noqa: E402
from engine.precond import CMPrecond, EDMPrecond  # noqa: E402
from engine.teacher import trajectory_cache as tc  # noqa: E402
from engine.training.compiled import CHOICES, compile_regions  # noqa: E402

PAPER_TABLE_10 = {"ect": 0.79, "ecd_euler": 0.98, "ecd_heun": 1.17}  # CIFAR-10, relative to CMT = 1


def methods(teacher, trajectories: int, store_spec, lpips=None) -> list[tuple]:
    """(name, label, objective factory, source kind, kernel mode). `lpips`: the CMT row with the paper's LPIPS
    distance (random VGG weights: the cost of the real ones), left out without it."""
    rows = [
        ("cmt", "CMT, eager teacher (reference math)",
         lambda: CMT(teacher, trajectories_per_batch=trajectories, distance=squared_l2, graphs=False),
         "images", "ref"),
        ("cmt_graph", "CMT, CUDA-graph teacher + kernels",
         lambda: CMT(teacher, trajectories_per_batch=trajectories, distance=squared_l2), "images", "auto"),
        ("cmt_cache", "CMT, trajectories from a store",
         lambda: CachedCMT(store_spec, trajectories_per_batch=trajectories, distance=squared_l2), "store", "auto"),
        ("ect", "ECT (CT)", lambda: ECT(q=4096), "images", "auto"),
        ("ecd_euler", "ECD, Euler teacher step (CD-Euler)", lambda: ECD(teacher, solver="euler"), "images", "auto"),
        ("ecd_heun", "ECD, Heun teacher step (CD-Heun)", lambda: ECD(teacher, solver="heun"), "images", "auto"),
        ("sct", "sCT (TrigFlow, torch.func.jvp)", lambda: SCT(), "images", "auto"),
        ("scd", "sCD (TrigFlow, torch.func.jvp)", lambda: SCD(teacher), "images", "auto"),
        ("sct_fd", "sCT (TrigFlow, central difference)", lambda: SCT(jvp="fd"), "images", "auto"),
        ("scd_fd", "sCD (TrigFlow, central difference)", lambda: SCD(teacher, jvp="fd"), "images", "auto"),
    ]
    if lpips is not None:
        rows.insert(2, ("cmt_graph_lpips", "CMT, CUDA-graph teacher + kernels, LPIPS (the paper's distance)",
                        lambda: CMT(teacher, trajectories_per_batch=trajectories, distance=perceptual(lpips)),
                        "images", "auto"))
    return rows


def count_flops(bench: StepBench) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        bench.step()
    return float(counter.get_total_flops())


def measure(bench: StepBench, name: str, label: str, a, device: torch.device, peak: float | None) -> dict:
    """One table row: median time per iteration, throughput, peak memory (CUDA) and MFU (when `peak` is known)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = bench.time(a.reps, a.warmup)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    flops = count_flops(bench) if peak else None
    sync(device)
    n_images = bench.objective.images_per_step(a.batch)
    return dict(method=name, label=label, ms=seconds * 1e3, images_per_s=n_images / seconds,
                pairs_per_s=a.batch / seconds, peak_mem_gib=mem, tflops=None if flops is None else flops / 1e12,
                mfu=None if flops is None else flops / seconds / (peak * 1e12),
                teacher_nfe_per_pair=bench.last.teacher_nfe / bench.last.pairs)


def run(a) -> dict:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kw = {} if a.channels is None else dict(model_channels=a.channels)
    torch.manual_seed(0)
    teacher_name = a.network + ("-teacher" if not a.network.startswith("digits") else "")
    teacher = EDMPrecond(build_network(teacher_name, **kw)).to(device).eval().requires_grad_(False)
    student_fn = lambda: CMPrecond(build_network(a.network, **kw))
    shape = (teacher.model.init_kwargs.get("in_channels", 3), teacher.model.img_resolution,
             teacher.model.img_resolution)
    images = TensorSource(torch.rand(4 * a.batch, *shape, device=device) * 2 - 1)
    peak = peak_tflops(device, a.peak_tflops)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        spec = tc.StoreSpec(num_trajectories=4 * a.trajectories, shape=list(shape), chunk=4 * a.trajectories,
                            teacher=f"{teacher_name} (random weights)")
        tc.write_store(store, spec, teacher, TensorSource(torch.rand(64, *shape) * 2 - 1), device,
                       batch=a.trajectories, progress=False)
        sources = dict(images=images, store=tc.TrajectorySource(store))
        # LPIPS compares 224² RGB images: minutes per step on a CPU, and not defined for 1-channel smoke images
        lpips = LPIPS.random(0).to(device) if device.type == "cuda" and shape[0] == 3 else None
        chosen = methods(teacher, a.trajectories, sources["store"].spec, lpips)
        unknown = set(a.methods or ()) - {m[0] for m in chosen}
        if unknown:
            raise SystemExit(f"--methods: {sorted(unknown)} not among {[m[0] for m in chosen]} on this device")
        for name, label, make, source, mode in chosen:
            if a.methods and name not in a.methods:
                continue
            with kernel_mode(mode if device.type == "cuda" else "ref"):
                torch.manual_seed(0)
                objective = make()
                bench = StepBench(student_fn(), objective, sources[source], a.batch, device)
                if a.compile:   # as the loop's --compile: every block of the student and of the frozen networks
                    for module in (bench.net, *objective.frozen_networks()):
                        compile_regions(module, a.compile)
                    label += f" (compiled, {a.compile})"
                rows.append(measure(bench, name, label, a, device, peak))
    base = next((r for r in rows if r["method"] == "cmt"), rows[0])
    for r in rows:
        r["relative_to_cmt"] = r["ms"] / base["ms"]
    width = "full width" if a.channels is None else f"model_channels={a.channels}"
    return dict(date=datetime.date.today().isoformat(), machine=machine(device), device=device.type,
                command="python bench/throughput.py " + " ".join(a.argv), network=f"{a.network} ({width})",
                batch=a.batch, trajectories=a.trajectories, rows=rows, paper_table_10=PAPER_TABLE_10,
                compile=a.compile, baseline=base["method"])


def dit(name: str, smoke: bool) -> DiT:
    if smoke:
        return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=1000)
    return DiT.from_name(name, input_size=32, in_channels=4, num_classes=1000)


def run_dit(a) -> dict:
    """CMT-MF vs Mean Flow vs flow matching on one DiT, `trajectories × 28` pairs per iteration."""
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    teacher = dit(a.teacher, a.smoke).to(device).eval().requires_grad_(False)
    size = 8 if a.smoke else 32
    data = TensorSource(torch.randn(4 * a.batch, 4, size, size, device=device),
                        torch.randint(0, 1000, (4 * a.batch,), device=device))
    guidance = dict(omega=0.2, kappa=0.92, t_end=0.75)  # the XL/2 settings (docs/spec/mf.md §1.6)
    methods_ = [("cmt_mf", f"CMT-MF mid-training ({a.teacher} teacher, 8 steps, nonadjacent28)",
                 lambda: CMTMeanFlow(teacher, trajectories_per_batch=a.trajectories)),
                ("mf", "Mean Flow (guidance folded in, dual-stream JVP)", lambda: MeanFlow(**guidance)),
                ("fm", "flow matching (SiT)", lambda: FlowMatching())]
    peak = peak_tflops(device, a.peak_tflops)
    rows = []
    for name, label, make in methods_:
        torch.manual_seed(0)
        bench = StepBench(dit(a.student, a.smoke), make(), data, a.batch, device, optimizer="adam")
        rows.append(measure(bench, name, label, a, device, peak))
    for r in rows:
        r["relative_to_cmt"] = r["ms"] / rows[0]["ms"]
    return dict(date=datetime.date.today().isoformat(), machine=machine(device), device=device.type,
                command="python bench/throughput.py " + " ".join(a.argv), family="dit",
                network="tiny DiT" if a.smoke else f"DiT-{a.student} (teacher DiT-{a.teacher})", batch=a.batch,
                trajectories=a.trajectories, rows=rows, paper_table_10={})


def markdown(res: dict) -> str:
    if res.get("family") == "dit":
        head = (f"Network {res['network']}, {res['batch']} pairs per iteration ({res['trajectories']} CMT-MF "
                f"trajectories × 28), Adam, median of repeated iterations after warm-up:")
        rel = "relative to CMT-MF"
    else:
        head = (f"Network {res['network']}, {res['batch']} pairs per iteration ({res['trajectories']} CMT "
                f"trajectories × 16), squared-L2 distances, median of repeated iterations after warm-up:")
        rel = ("relative to CMT (paper's Table 10)" if res.get("baseline", "cmt") == "cmt"
               else f"relative to {res['baseline']}")
    lines = [f"### Throughput — {res['date']}", "", f"Machine: {res['machine']}", "",
             f"Command: `{res['command']}`", "", head, "",
             f"| method | ms / iteration | {rel} | images/s | pairs/s | teacher NFE / pair "
             "| peak GiB | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        paper = res["paper_table_10"].get(r["method"]) if res.get("baseline", "cmt") == "cmt" else None
        rel = f"{r['relative_to_cmt']:.2f}" + (f" ({paper:.2f})" if paper else "")
        mem = "–" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        lines.append(f"| {r['label']} | {r['ms']:.1f} | {rel} | {r['images_per_s']:.1f} | {r['pairs_per_s']:.1f} | "
                     f"{r['teacher_nfe_per_pair']:.3g} | {mem} | {mfu} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, profile: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [f"{p['method']}\n{p['config'].split(',')[0]}" if p["method"] == "cmt" else p["method"]
             for p in profile if p["method"] != "cmt" or "order=3" in p["config"]]
    vals = [p["teacher_nfe_per_pair"] for p in profile if p["method"] != "cmt" or "order=3" in p["config"]]
    ax1.bar(range(len(vals)), vals, color="tab:blue")
    ax1.set_xticks(range(len(vals)), names, rotation=60, ha="right", fontsize=8)
    ax1.set_ylabel("teacher NFE per training pair")
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_title("per-pair teacher cost (bench/nfe_profile.py)")
    rows = res["rows"]
    ax2.bar(range(len(rows)), [r["relative_to_cmt"] for r in rows], color="tab:orange")
    for i, r in enumerate(rows):
        if r["method"] in res["paper_table_10"]:
            ax2.plot(i, res["paper_table_10"][r["method"]], "k_", markersize=18, mew=2)
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax2.set_ylabel("time per iteration / CMT's")
    ax2.set_title(f"{res['network']}, {res['device']} (black: paper's Table 10)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["unet", "dit"], default="unet",
                   help="unet: CMT vs the consistency baselines; dit: CMT-MF vs Mean Flow vs flow matching")
    p.add_argument("--network", default="cifar10-ddpmpp")
    p.add_argument("--student", default="XL/2", help="--family dit: the student DiT")
    p.add_argument("--teacher", default="B/4", help="--family dit: the CMT-MF teacher DiT")
    p.add_argument("--channels", type=positive_int_arg, default=None, help="model_channels override (reduced width)")
    p.add_argument("--batch", type=positive_int_arg, default=None, help="training pairs per iteration (default: CMT's, "
                   "128 = 8 × 16 for unet, 112 = 4 × 28 for dit)")
    p.add_argument("--trajectories", type=positive_int_arg, default=None, help="CMT trajectories per iteration")
    p.add_argument("--methods", type=lambda v: v.split(","), default=None,
                   help="--family unet: comma-separated rows to run (default all), e.g. cmt_graph,ect")
    p.add_argument("--compile", choices=CHOICES, default=None,
                   help="--family unet: compile every block of the student and the teacher "
                        "(engine/training/compiled.py)")
    step_flags(p, reps=20, warmup=5, smoke_help="tiny network, two repetitions (CPU)",
               out=os.path.join(HERE, "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    a.argv = argv
    per = 28 if a.family == "dit" else 16   # pairs per trajectory
    if a.smoke:
        a.network, a.channels, a.reps, a.warmup, a.device = "digits-ddpmpp", 8, 2, 1, "cpu"
        a.batch, a.trajectories = 2 * per, 2
    if a.batch is None:
        a.trajectories = a.trajectories or (4 if a.family == "dit" else 8)
        a.batch = a.trajectories * per
    if a.trajectories is None:
        a.trajectories = a.batch // per
    if a.trajectories * per != a.batch:
        raise SystemExit(f"--batch {a.batch} must be {per} × --trajectories (CMT's trajectories give {per} pairs "
                         f"each)")
    res = run_dit(a) if a.family == "dit" else run(a)
    import nfe_profile
    res["nfe_profile"] = nfe_profile.profile()
    text = markdown(res)
    print(text)
    stem = write_results(res, text, a.out, "throughput" + ("-compiled" if a.compile else ""), a.smoke, a.record,
                         markdown=True)
    plot(res, res["nfe_profile"], stem + ".png")
    return res


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
