"""EDM2 networks: per-sample cost of every MP-UNet preset, and the per-iteration time of the ImageNet-64 recipe's
training steps (CMT mid-training, ECT and autoguided ECD-Heun post-training) side by side in one process.

    python bench/edm2.py                      # GPU: EDM2-XL at ImageNet-64 shapes, 128 pairs (8 trajectories × 16)
    python bench/edm2.py --device cpu         # CPU: the same topology at width 16, one trajectory (16 pairs)
    python bench/edm2.py ... --record         # also append the tables to bench/RESULTS.md
    python bench/edm2.py --smoke              # tiny MP-UNet, two repetitions: checks the script runs

Costs are counted with torch.utils.flop_counter on the meta device (no weights allocated), one sample: the
forward's convolution and matrix-product MACs — what EDM2's "Gflops" (`count_flops.py`) report, which counts one
multiply-accumulate as one flop (docs/spec/edm2_latent.md §9.1) — its FLOPs (2 × MAC), and forward + backward.
The step times are each one real training step (engine.training.loop.train_step: Adam (0.9, 0.99), bf16 autocast on
CUDA,
forced weight normalisation after it as in the loop), median of device-synchronised repetitions after warm-up,
normalised to CMT = 1, with pairs/s, model TFLOPs per iteration and, on a GPU, the FLOPs utilisation.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import StepBench, machine, measure_step, peak_tflops, step_flags, write_results  # noqa: E402

from engine.checks import positive_int_arg  # noqa: E402
from engine.data.sampler import TensorSource  # noqa: E402
from engine.guidance import GuidedDenoiser  # noqa: E402
from engine.networks.configs import CONFIGS  # noqa: E402
from engine.objectives import CMT, ECD, ECT, squared_l2  # noqa: E402
from engine.pipelines.edm2_presets import build_edm2_preset  # noqa: E402

PRESETS = [k for k, v in CONFIGS.items() if k.startswith("edm2-img")]
# docs/spec/edm2_latent.md §1.4 / §9.1: conv + matmul GMAC per sample at ImageNet-512, counted on the reference
SPEC_GMAC = {"xxs": 11.3, "xs": 45.0, "s": 100.8, "m": 179.0, "l": 279.4, "xl": 402.0, "xxl": 546.9}


def flops(fn) -> tuple[float, dict]:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops()), {str(k): float(v) for k, v in counter.get_flop_counts()["Global"].items()}


def preset_costs() -> list[dict]:
    """Per-sample forward MACs and forward + backward FLOPs of every preset (meta device)."""
    rows = []
    for name in PRESETS:
        with torch.device("meta"):
            net = build_edm2_preset(name, use_fp16=False)
            shape = (1, net.unet.img_channels, net.unet.img_resolution, net.unet.img_resolution)
            x, sigma, labels = torch.randn(shape), torch.ones(1), torch.zeros(1, net.label_dim)
            out = []
            fwd, parts = flops(lambda: out.append(net(x, sigma, labels)))
            bwd, _ = flops(lambda: out[0].sum().backward())   # the graph of the counted forward: no second one
            both = fwd + bwd
        rows.append(dict(preset=name, params=sum(p.numel() for p in net.parameters()), fwd_gmac=fwd / 2e9,
                         attention_gmac=parts.get("aten.bmm", 0.0) / 2e9, fwd_gflop=fwd / 1e9,
                         fwd_bwd_gflop=both / 1e9,
                         spec_gmac=SPEC_GMAC.get(name.split("-")[2]) if "img512" in name else None))
    return rows


def step_methods(a, device):
    """(name, student, objective, pairs) of the recipe's three steps on one shape."""
    over = {} if a.channels is None else dict(model_channels=a.channels)
    torch.manual_seed(0)
    teacher = build_edm2_preset(a.preset, **over).to(device).eval().requires_grad_(False)
    guide = build_edm2_preset(a.guide or a.preset, **over).to(device).eval().requires_grad_(False)

    def student():
        net = build_edm2_preset(a.preset, use_fp16=False, logvar_channels=None, dropout=0.5, dropout_res=16, **over)
        net.load_state_dict(teacher.state_dict(), strict=False)
        return net
    pairs = 16 * a.trajectories
    return teacher, [
        ("cmt", student(), CMT(teacher, nfe=16, trajectories_per_batch=a.trajectories, distance=squared_l2)),
        ("ect", student(), ECT(P_mean=-0.8, P_std=1.6, q=512, c=0.06, weighting="snrpk")),
        ("ecd_heun_guided", student(), ECD(GuidedDenoiser(teacher, guide, 1.7), solver="heun", P_mean=-0.8,
                                           P_std=1.6, q=256, c=0.06)),
    ], pairs


def run_steps(a) -> list[dict]:
    device = torch.device(a.device)
    teacher, methods, pairs = step_methods(a, device)
    C, R = teacher.unet.img_channels, teacher.unet.img_resolution
    g = torch.Generator().manual_seed(0)
    data = TensorSource(torch.rand(max(pairs, 64), C, R, R, generator=g) * 2 - 1,
                        torch.randint(0, teacher.label_dim, (max(pairs, 64),), generator=g))
    peak = peak_tflops(device, a.peak_tflops)
    rows = []
    for name, student, objective in methods:
        bench = StepBench(student, objective, data, pairs, device, lr=1e-4, optimizer="adam")
        rows.append(measure_step(name, bench, pairs, device, peak, a.reps, a.warmup))
    base = rows[0]["seconds"]
    for r in rows:
        r["relative"] = r["seconds"] / base
    return rows


def markdown(res: dict) -> str:
    lines = [f"## EDM2 networks and steps — {res['date']}", "", f"Machine: {res['machine']}", "",
             f"Command: `{res['command']}`", "", "Per sample (meta device; MAC = EDM2's \"Gflops\"):", "",
             "| preset | params | fwd GMAC | of which attention | spec GMAC (512) | fwd GFLOP | fwd+bwd GFLOP |",
             "|---|---|---|---|---|---|---|"]
    for r in res["presets"]:
        spec = "-" if r["spec_gmac"] is None else f"{r['spec_gmac']:.1f}"
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f} M | {r['fwd_gmac']:.1f} | {r['attention_gmac']:.2f} "
                     f"| {spec} | {r['fwd_gflop']:.1f} | {r['fwd_bwd_gflop']:.1f} |")
    lines += ["", f"Training steps: {res['shape']}, {res['pairs']} pairs per iteration, {res['reps']} reps "
              f"(median):", "", "| method | s / iter | relative to CMT | pairs/s | TFLOP / iter | MFU | peak GiB | "
              "teacher NFE / pair |", "|---|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['relative']:.2f} | {r['pairs_per_s']:.1f} | "
                     f"{r['tflop_per_iter']:.3f} | {mfu} | {mem} | {r['teacher_nfe_per_pair']:g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import datetime
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="edm2-img64-xl", choices=[*PRESETS, "edm2-tiny"])
    p.add_argument("--guide", default=None, help="the guide's preset (default: the same as --preset)")
    p.add_argument("--channels", type=positive_int_arg, default=None, help="model_channels override")
    p.add_argument("--trajectories", type=positive_int_arg, default=None, help="CMT trajectories (16 pairs each)")
    step_flags(p, reps=10, warmup=3, smoke_help="tiny MP-UNet, two repetitions (CPU)", out=os.path.join(HERE, "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.smoke:
        a.preset, a.channels, a.trajectories, a.reps, a.warmup, a.device = "edm2-tiny", None, 1, 2, 1, "cpu"
    elif a.device == "cpu":   # the XL shapes are for a GPU; on CPU the same topology at a width that runs
        a.channels = a.channels or 16
        a.trajectories = a.trajectories or 1
    a.trajectories = a.trajectories or 8
    steps = run_steps(a)
    net = CONFIGS[a.preset].kwargs
    res = dict(date=datetime.date.today().isoformat(), machine=machine(torch.device(a.device)),
               command="python bench/edm2.py " + " ".join(argv), presets=preset_costs(), steps=steps,
               shape=f"{a.preset}" + (f" at width {a.channels}" if a.channels else "")
               + f" ({net['img_channels']}×{net['img_resolution']}²)", pairs=16 * a.trajectories, reps=a.reps)
    text = markdown(res)
    print(text)
    write_results(res, text, a.out, "edm2", a.smoke, a.record, markdown=True)
    return res


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
