"""The ImageNet-512 headline's training steps side by side in one process (recipes/imagenet512_cmt_ecd.py):
CMT mid-training (16-NFE DPM-Solver++ trajectory of the unguided teacher from 80ε, E-LatentLPIPS on every pair)
against consistency training (ECT, pseudo-Huber) and consistency distillation of the autoguided teacher with an
Euler and a Heun step (ECD) — the four rows of the paper's runtime table at 512 (docs/spec/edm2_latent.md §7.3:
CT 0.68, CD-Euler 0.83, CD-Heun 0.98 of CMT, batch 16 on one H100).

    python bench/imagenet512.py                   # GPU: EDM2-XXL student and teacher, M guide, 16 pairs (the paper's)
    python bench/imagenet512.py --device cpu      # CPU: the same topologies at width 16 on 64² latents, 16 pairs
    python bench/imagenet512.py ... --record      # also append the table to bench/RESULTS.md
    python bench/imagenet512.py --smoke           # tiny MP-UNets on 32² latents, one repetition (CI)

Each row is one real training step (engine.training.loop.train_step, Adam, float32 with TF32 on a GPU as the CMT 512
code
— no bf16 autocast — then forced weight normalisation as the loop does), median of device-synchronised
repetitions after warm-up; random weights (the cost does not depend on them). Columns: seconds per iteration,
relative to CMT, the paper's relative cost, pairs/s, the model TFLOPs per iteration counted on the step
(torch.utils.flop_counter: 2 × MAC for convolutions and matrix products, the frozen networks' forwards and
E-LatentLPIPS included), the spec's count where the shapes are the paper's (§9.2: CMT 4.46 TFLOP per pair, ECD
7.28 per sample with Heun; EDM2's "Gflops" are MACs), and MFU against the TF32 peak.
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
from engine.networks.latent_vgg import LatentVGG  # noqa: E402
from engine.objectives import CMT, ECD, ECT, LatentPosterior, perceptual  # noqa: E402
from engine.perceptual.elatentlpips import ELatentLPIPS  # noqa: E402
from engine.pipelines.edm2_presets import build_edm2_preset  # noqa: E402

PAPER = {"cmt": 1.0, "ct": 0.68, "cd_euler": 0.83, "cd_heun": 0.98}     # spec §7.3 (one H100, batch 16)
SPEC_TFLOP = {"cmt": 4.46, "cd_heun": 7.28}                            # per pair / sample at XXL, spec §9.2


def methods(a, device):
    """(name, student factory, objective) of the four steps; students are built one at a time (at XXL each holds
    6 GB of weights and, once stepped, 18 GB of gradients and Adam moments)."""
    over = dict(img_resolution=a.resolution, img_channels=4, label_dim=a.classes)
    if a.channels:
        over["model_channels"] = a.channels
    torch.manual_seed(0)
    frozen = lambda preset: build_edm2_preset(preset, use_fp16=False, **over).to(device).eval().requires_grad_(False)  # noqa: E731
    teacher, guide = frozen(a.preset), frozen(a.guide)
    guide.use_fp16 = True                          # as the recipe: the guide computes in float16 on CUDA

    def student():
        net = build_edm2_preset(a.preset, use_fp16=False, logvar_channels=None, **over)
        net.load_state_dict(teacher.state_dict(), strict=False)
        return net
    lpips = ELatentLPIPS(vgg_state_dict=LatentVGG().state_dict()).to(device)
    ecd = lambda solver: ECD(teacher, solver=solver, guide=guide, guidance=2.05, P_mean=-0.8, P_std=1.6,  # noqa: E731
                             q=1024, c=0.06)
    return [
        ("cmt", student, LatentPosterior(CMT(teacher, nfe=16, trajectories_per_batch=a.pairs // 16, prior="noise",
                                               labels="uniform", num_classes=a.classes,
                                               distance=perceptual(lpips)), "edm2")),
        ("ct", student, LatentPosterior(ECT(P_mean=-0.8, P_std=1.6, q=1024, c=0.06, weighting="snrpk"), "edm2")),
        ("cd_euler", student, LatentPosterior(ecd("euler"), "edm2")),
        ("cd_heun", student, LatentPosterior(ecd("heun"), "edm2")),
    ]


def run(a) -> list[dict]:
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    g = torch.Generator().manual_seed(0)
    n = max(a.pairs, 64)
    moments = torch.cat([torch.randn(n, 4, a.resolution, a.resolution, generator=g) * 4,
                         torch.rand(n, 4, a.resolution, a.resolution, generator=g) + 0.1], dim=1)
    data = TensorSource(moments, torch.randint(0, a.classes, (n,), generator=g))
    peak = peak_tflops(device, a.peak_tflops, precision="tf32")
    rows = []
    for name, make_student, objective in methods(a, device):
        bench = StepBench(make_student(), objective, data, a.pairs, device, lr=1e-4, optimizer="adam", bf16=False)
        paper_shapes = a.preset == "edm2-img512-xxl" and a.channels is None and a.resolution == 64
        rows.append(dict(measure_step(name, bench, a.pairs, device, peak, a.reps, a.warmup),
                         spec_tflop_per_iter=SPEC_TFLOP[name] * a.pairs if paper_shapes and name in SPEC_TFLOP
                         else None, paper_relative=PAPER[name]))
        bench = None               # the student, its gradients and Adam moments go before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = rows[0]["seconds"]
    for r in rows:
        r["relative"] = r["seconds"] / base
    return rows


def markdown(res: dict) -> str:
    lines = [f"## ImageNet-512 headline steps — {res['date']}", "", f"Machine: {res['machine']}", "",
             f"Command: `{res['command']}`", "", f"{res['shape']}, {res['pairs']} pairs per iteration, {res['reps']} "
             "reps (median), float32 (TF32 on a GPU):", "",
             "| method | s / iter | relative to CMT | paper (H100) | pairs/s | TFLOP / iter | spec TFLOP / iter | MFU "
             "(TF32) | peak GiB | teacher NFE / pair |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["steps"]:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f}"
        spec = "-" if r["spec_tflop_per_iter"] is None else f"{r['spec_tflop_per_iter']:.1f}"
        lines.append(f"| {r['method']} | {r['seconds']:.3f} | {r['relative']:.2f} | {r['paper_relative']:.2f} | "
                     f"{r['pairs_per_s']:.1f} | {r['tflop_per_iter']:.3f} | {spec} | {mfu} | {mem} | "
                     f"{r['teacher_nfe_per_pair']:g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    import datetime
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="edm2-img512-xxl")
    p.add_argument("--guide", default="edm2-img512-m")
    p.add_argument("--channels", type=positive_int_arg, default=None, help="model_channels of both (CPU: 16)")
    p.add_argument("--pairs", type=positive_int_arg, default=16, help="pairs per iteration (a multiple of 16)")
    p.add_argument("--resolution", type=positive_int_arg, default=64, help="latent side")
    p.add_argument("--classes", type=positive_int_arg, default=1000)
    step_flags(p, reps=5, warmup=2, smoke_help="tiny MP-UNets on 32² latents, one repetition (CPU)",
               out=os.path.join(HERE, "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.smoke:
        a.preset = a.guide = "edm2-tiny"
        a.channels, a.resolution, a.classes, a.reps, a.warmup, a.device = None, 32, 10, 1, 0, "cpu"
    elif a.device == "cpu":        # the XXL shapes are for a GPU; on CPU the same topology at a width that runs
        a.channels = a.channels or 16
    if a.pairs % 16:
        p.error("--pairs must be a multiple of 16 (a CMT trajectory is 16 pairs)")
    steps = run(a)
    res = dict(date=datetime.date.today().isoformat(), machine=machine(torch.device(a.device)),
               command="python bench/imagenet512.py " + " ".join(argv), steps=steps, pairs=a.pairs, reps=a.reps,
               shape=f"student/teacher {a.preset}, guide {a.guide}" + (f" at width {a.channels}" if a.channels else "")
               + f" on 4×{a.resolution}² latents")
    text = markdown(res)
    print(text)
    write_results(res, text, a.out, "imagenet512", a.smoke, a.record, markdown=True)
    return res


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
