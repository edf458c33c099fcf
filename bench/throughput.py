"""Per-iteration throughput of CMT mid-training against the consistency baselines, side by side in one process.

    python bench/throughput.py                                   # GPU: CIFAR-10 DDPM++, 128 pairs per iteration
    python bench/throughput.py --channels 32 --batch 64          # CPU: the same network at reduced width
    python bench/throughput.py ... --record                      # also append the tables to bench/RESULTS.md
    python bench/throughput.py --smoke                           # tiny, two repetitions: checks the script runs

Methods (each one real training step, engine.loop.train_step: RAdam, bf16 autocast on CUDA, per-step RNG):
CMT (its 16-NFE DPM-Solver++ teacher trajectory included; eager teacher with the reference math, CUDA-graph
teacher with the kernels, trajectories read from a store), ECT (CT), ECD with an Euler and with a Heun teacher step
(CD-Euler, CD-Heun), sCT and sCD (TrigFlow, one JVP). Mean Flow joins when the engine has it. Per method: median
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

from common import StepBench, kernel_mode, machine, sync, write_results  # noqa: E402
from engine import trajectory_cache as tc  # noqa: E402
from engine.data.sampler import TensorSource  # noqa: E402
from engine.networks import build_network  # noqa: E402
from engine.objectives import CMT, ECD, ECT, SCD, SCT, CachedCMT, squared_l2  # noqa: E402
from engine.precond import CMPrecond, EDMPrecond  # noqa: E402

PAPER_TABLE_10 = {"ect": 0.79, "ecd_euler": 0.98, "ecd_heun": 1.17}  # CIFAR-10, relative to CMT = 1
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, per the vendor


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def methods(teacher, trajectories: int, store_spec) -> list[tuple]:
    """(name, label, objective factory, source kind, kernel mode)."""
    return [
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
    ]


def count_flops(bench: StepBench) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        bench.step()
    return float(counter.get_total_flops())


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
        for name, label, make, source, mode in methods(teacher, a.trajectories, sources["store"].spec):
            with kernel_mode(mode if device.type == "cuda" else "ref"):
                torch.manual_seed(0)
                bench = StepBench(student_fn(), make(), sources[source], a.batch, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = bench.time(a.reps, a.warmup)
                mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
                flops = count_flops(bench) if peak else None
                sync(device)
            n_images = bench.objective.images_per_step(a.batch)
            rows.append(dict(method=name, label=label, ms=seconds * 1e3, images_per_s=n_images / seconds,
                             pairs_per_s=a.batch / seconds, peak_mem_gib=mem,
                             tflops=None if flops is None else flops / 1e12,
                             mfu=None if flops is None else flops / seconds / (peak * 1e12),
                             teacher_nfe_per_pair=bench.last.teacher_nfe / bench.last.pairs))
    cmt = next(r["ms"] for r in rows if r["method"] == "cmt")
    for r in rows:
        r["relative_to_cmt"] = r["ms"] / cmt
    width = "full width" if a.channels is None else f"model_channels={a.channels}"
    return dict(date=datetime.date.today().isoformat(), machine=machine(device), device=device.type,
                command="python bench/throughput.py " + " ".join(a.argv), network=f"{a.network} ({width})",
                batch=a.batch, trajectories=a.trajectories, rows=rows, paper_table_10=PAPER_TABLE_10)


def markdown(res: dict) -> str:
    lines = [f"### Throughput — {res['date']}", "", f"Machine: {res['machine']}", "",
             f"Command: `{res['command']}`", "",
             f"Network {res['network']}, {res['batch']} pairs per iteration ({res['trajectories']} CMT trajectories "
             f"× 16), squared-L2 distances, median of repeated iterations after warm-up:", "",
             "| method | ms / iteration | relative to CMT (paper's Table 10) | images/s | pairs/s | teacher NFE / pair "
             "| peak GiB | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        paper = res["paper_table_10"].get(r["method"])
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
    p.add_argument("--network", default="cifar10-ddpmpp")
    p.add_argument("--channels", type=int, default=None, help="model_channels override (reduced width)")
    p.add_argument("--batch", type=int, default=128, help="training pairs per iteration")
    p.add_argument("--trajectories", type=int, default=None, help="CMT trajectories per iteration (batch / 16)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak (for MFU)")
    p.add_argument("--smoke", action="store_true", help="tiny network, two repetitions (CPU)")
    p.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    a.argv = argv
    if a.smoke:
        a.network, a.channels, a.batch, a.reps, a.warmup, a.device = "digits-ddpmpp", 8, 32, 2, 1, "cpu"
    if a.trajectories is None:
        a.trajectories = a.batch // 16
    if a.trajectories * 16 != a.batch:
        raise SystemExit(f"--batch {a.batch} must be 16 × --trajectories (CMT's 16-NFE trajectories give 16 pairs each)")
    res = run(a)
    import nfe_profile
    res["nfe_profile"] = nfe_profile.profile()
    text = markdown(res)
    print(text)
    stem = write_results(res, text, a.out, "throughput", a.smoke, a.record, markdown=True)
    plot(res, res["nfe_profile"], stem + ".png")
    return res


if __name__ == "__main__":
    main()
