"""The main job's embedded default, for now: a short tour of the engine core on data that ships with it.

    python -m engine.pipelines.demo [--out runs/demo]

1. The CMT teacher solver (16-NFE multistep DPM-Solver++) on the analytic Gaussian-mixture teacher, against a
   float64 RK4 solution of the PF-ODE: endpoint error by order and NFE.
2. Teacher trajectories on digits: an exact Gaussian-mixture teacher whose components sit on real digits images,
   the 17 states of each trajectory written as a PNG grid, plus 1- and 2-step consistency samples.
3. The consistency parameterisation's boundary condition (eval mode only).
4. The named networks, their parameter totals, and a safetensors export/import round trip of the digits net.
5. The digits written in EDM's dataset format and read back.
Takes well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from engine.checkpoints.releases import export_safetensors, load_safetensors_network
from engine.data import GaussianMixture, ImageDataset, digits, digits_uint8, write_image_dataset
from engine.data.image_grid import save_image_grid
from engine.networks import CONFIGS, build_network
from engine.precond import CMPrecond
from engine.schedules import logsnr_sigmas
from engine.solvers import consistency_sampler, dpm_solver_pp, pf_ode_reference


def solver_accuracy() -> dict:
    gm = GaussianMixture.random(8, (2,), std=0.2, seed=1)
    x_T = 80 * torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = pf_ode_reference(gm, x_T, 80.0, 0.002, steps=2000)
    table = {}
    print("\n1. DPM-Solver++ endpoint RMS error vs a float64 RK4 solution (Gaussian mixture, σ 80 → 0.002)")
    print(f"   {'solver':<22}" + "".join(f"{f'NFE {n}':>12}" for n in (8, 16, 32)))
    for name, order, rule in [("order 1", 1, "upstream"), ("order 2", 2, "upstream"),
                              ("order 3 (CMT/upstream)", 3, "upstream"), ("order 3 (taylor)", 3, "taylor")]:
        errs = [(dpm_solver_pp(gm, x_T, logsnr_sigmas(n), order=order, third_order=rule)[-1] - ref)
                .pow(2).mean().sqrt().item() for n in (8, 16, 32)]
        table[name] = errs
        print(f"   {name:<22}" + "".join(f"{e:12.2e}" for e in errs))
    return table


def digits_trajectories(out: str) -> dict:
    images, labels = digits(resolution=16, split="train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:400]
    # An exact teacher concentrated on 400 real digits: each component is one image with a small pixel noise.
    teacher = GaussianMixture(images[pick].double(), stds=0.05, classes=labels[pick].tolist())
    g = torch.Generator().manual_seed(1)
    y = teacher.sample(8, generator=g).float()
    x_T = y + 80 * torch.randn(y.shape, generator=g)  # CMT's data-dependent prior, docs/spec/cm.md §3.1
    sig = logsnr_sigmas(16)
    traj = dpm_solver_pp(teacher, x_T, sig)  # [17, 8, 1, 16, 16]
    # Show c_in-scaled states so every column uses the same intensity range.
    shown = traj / torch.sqrt(sig.float() ** 2 + 0.25).reshape(-1, 1, 1, 1, 1) * 0.5
    path = save_image_grid(shown.transpose(0, 1).reshape(-1, 1, 16, 16), os.path.join(out, "trajectories.png"),
                           ncols=17)
    # Endpoints should land on the data: RMS distance to the nearest component ≈ its std (0.05) or less.
    d = (traj[-1].double().flatten(1)[:, None] - teacher.means.flatten(1)[None]).pow(2).mean(-1).sqrt()
    end_err = d.min(dim=1).values.max().item()
    print(f"\n2. 8 teacher trajectories on digits (17 states each) → {path}; worst endpoint's RMS distance "
          f"to its nearest training digit = {end_err:.3f} (component std 0.05)")
    # The ideal consistency function of this teacher is its ODE flow to σ_min; 1- and 2-step samples of it:
    flow = lambda x, s, labels=None: dpm_solver_pp(teacher, x, logsnr_sigmas(32, sigma_max=float(s[0])))[-1]
    z = torch.randn(16, 1, 16, 16, generator=g)
    one = consistency_sampler(flow, z)
    two = consistency_sampler(flow, z, mid_sigmas=(0.77569,), generator=g)
    save_image_grid(torch.cat([one, two]), os.path.join(out, "consistency_1_and_2_step.png"), ncols=16)
    return {"trajectory_endpoint_rms_to_nearest_digit": end_err}


def boundary_condition() -> None:
    net = CMPrecond(build_network("digits-ddpmpp"))
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    ev = (net(x, 0.003) - x).abs().max().item()
    net.train()
    tr = (net(x, 0.003) - x).abs().max().item()
    print(f"\n3. CMPrecond at σ_min = 0.003: max|f(x) − x| eval mode {ev:.1e}, train mode {tr:.1e}")


def networks(out: str) -> dict:
    print("\n4. Named networks (parameters counted on the meta device):")
    totals = {}
    for name in CONFIGS:
        with torch.device("meta"):
            n = sum(p.numel() for p in build_network(name).parameters())
        totals[name] = n
        print(f"   {name:<26}{n:>14,}")
    torch.manual_seed(0)
    net = CMPrecond(build_network("digits-ddpmpp")).eval()
    path = os.path.join(out, "digits-ddpmpp.safetensors")
    export_safetensors(net, path, metadata={"note": "engine demo, random init"})
    back = load_safetensors_network(path).eval()
    x, s = torch.randn(8, 1, 8, 8), torch.rand(8) * 10
    diff = (net(x, s) - back(x, s)).abs().max().item()
    print(f"   safetensors round trip of digits-ddpmpp: max |Δoutput| = {diff:.1e}")
    return totals


def dataset(out: str) -> int:
    u8, labels = digits_uint8(resolution=16)
    path = write_image_dataset(os.path.join(out, "digits-16x16.zip"), u8, labels, overwrite=True)
    ds = ImageDataset(path)
    print(f"\n5. EDM dataset format: wrote {path} and read back {len(ds)} images, "
          f"{ds.resolution}×{ds.resolution}×{ds.num_channels}, label_dim {ds.label_dim}")
    return len(ds)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    report = {"solver_rms_error": solver_accuracy(), **digits_trajectories(args.out)}
    boundary_condition()
    report["network_parameters"] = networks(args.out)
    report["dataset_images"] = dataset(args.out)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\ndone in {time.time() - t0:.1f}s; outputs in {args.out}/")


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
