"""The first minute on a new GPU: does every fast path launch at all? (bench/gpu_check.py's first section)

    python bench/preflight.py            # on a GPU: every check below, about a minute
    python bench/preflight.py --dry-run  # CPU: the same checks where a CPU can run them (CI)

1. The device: name, capability, and its shared memory per block against what the kernels were built to fit
   (engine/kernels/runtime.py SHARED_LIMIT).
2. Every Triton specialisation the launchers send (bench/kernels_aot.py `specialisations()`) launched once on tiny
   tensors through its own launcher, each compared with its PyTorch reference.
3. One teacher graph per network family — an EDM U-Net (TeacherSolver), an EDM2 MP-UNet (TeacherSolver) and a
   DiT forward (a bare CUDA graph) — captured and replayed, equal to the eager result.
4. Three CMT training steps with `torch.cuda.set_sync_debug_mode("error")`: any host synchronisation in a step
   raises.

Prints one line per check and exits non-zero when any failed; `--json FILE` writes the records.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels_aot as aot  # noqa: E402
from engine.kernels import dpm_solver, jvp_attention, precond, runtime  # noqa: E402


def device_check(device) -> dict:
    if device.type != "cuda":
        return dict(device="cpu", note="no CUDA device: the kernels run in Triton's interpreter")
    p = torch.cuda.get_device_properties(device)
    cap = p.major * 10 + p.minor
    shared = getattr(p, "shared_memory_per_block_optin", None)
    want = runtime.SHARED_LIMIT.get(cap)
    return dict(device=p.name, capability=f"{p.major}.{p.minor}", shared_per_block_optin=shared,
                built_for=want, fits=None if shared is None or want is None else shared >= want)


def launch_every_specialisation(device) -> list[dict]:
    """Each specialisation through its launcher, on tiny tensors of its dtypes, against the reference."""
    rows, g = [], torch.Generator().manual_seed(0)
    rand = lambda *shape, dtype: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
    for spec in aot.specialisations():
        dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[next(iter(spec.signature.values()))[1:]]
        t0 = time.perf_counter()
        try:
            if spec.kernel == "dpm_solver_update":
                k = spec.constexprs["K"]
                x, *hist = (rand(37, 5, dtype=dtype) for _ in range(k + 1))
                coef = (0.9, 0.3, -0.2, 0.1)
                got = dpm_solver.update_triton(x, hist, coef)
                want = dpm_solver.update_reference(x, hist, coef)
            elif spec.kernel == "attention_jvp":
                d = int(spec.label.split("d=")[1].split()[0])
                q, k_, v, dq, dk, dv = (rand(1, 2, 33, d, dtype=dtype) for _ in range(6))
                o, do = jvp_attention.attention_jvp_triton(q, k_, v, dq, dk, dv, d ** -0.5)
                ref = jvp_attention.attention_reference(q, k_, v)
                got = torch.cat([o.double(), do.double()])
                want = torch.cat([ref.double(), jvp_attention.attention_tangent(q, k_, v, ref, dq, dk, dv,
                                                                                d ** -0.5).double()])
            else:   # the preconditioning kernels, through the registered ops' forward
                x = rand(4, 3, 5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                sigma = (torch.rand(4, generator=g) * 80).to(device=device, dtype=x.dtype)
                if spec.kernel == "precond_input":
                    got = precond.scale_rows_triton(x, sigma, 0.5, dtype)
                    want = precond.input_reference(x, sigma, 0.5, dtype)
                else:
                    f = rand(4, 3, 5, dtype=dtype if dtype != torch.float64 else torch.float64)
                    got = precond.output_triton(x, f, sigma, 0.5, 0.002, True)
                    want = precond.output_reference(x, f, sigma, 0.5, 0.002, True)
            err = (got.double() - want.double()).abs().max().item()
            ok = err <= tol[dtype] * max(1.0, want.double().abs().max().item())
            rows.append(dict(check=spec.key(), ok=ok, max_error=err, seconds=round(time.perf_counter() - t0, 2),
                             unfit=bool(runtime.UNFIT)))
        except Exception as e:  # noqa: BLE001 - every failure is a row, the next check runs
            rows.append(dict(check=spec.key(), ok=False, error=f"{type(e).__name__}: {e}"))
    return rows


def teacher_graphs(device) -> list[dict]:
    """A captured and replayed trajectory (or forward) per network family, equal to eager."""
    from engine.networks import DiT, SongUNet
    from engine.networks.edm2_unet import EDM2UNet
    from engine.precond import EDM2Precond, EDMPrecond
    from engine.schedules import logsnr_sigmas
    from engine.teacher.solver import TeacherSolver
    rows = []
    torch.manual_seed(0)
    families = {
        "edm_unet": (EDMPrecond(SongUNet(img_resolution=16, in_channels=3, out_channels=3, model_channels=16,
                                         channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])), (2, 3, 16, 16)),
        "edm2_mpunet": (EDM2Precond(EDM2UNet(img_resolution=16, img_channels=4, label_dim=0, model_channels=16,
                                             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
                        (2, 4, 16, 16)),
    }
    for name, (net, shape) in families.items():
        net = net.to(device).eval().requires_grad_(False)
        try:
            solver = TeacherSolver(net, logsnr_sigmas(4))
            x = torch.randn(shape, device=device) * 80
            traj = solver(x)
            traj = solver(x)
            eager = solver.eager(x)
            err = (traj - eager).abs().max().item()
            rows.append(dict(check=f"graph {name}", ok=device.type != "cuda" or (solver.replays == 2 and err < 1e-3),
                             replays=solver.replays, max_error=err, reason=solver.eager_reason(x)))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(check=f"graph {name}", ok=False, error=f"{type(e).__name__}: {e}"))
    try:
        net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=1,
                  num_classes=10).to(device).eval().requires_grad_(False)
        z, t, r, y = (torch.randn(2, 4, 8, 8, device=device), torch.rand(2, device=device),
                      torch.rand(2, device=device), torch.tensor([1, 2], device=device))
        eager = net(z, t, r, y)
        if device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                net(z, t, r, y)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = net(z, t, r, y)
            graph.replay()
            err = (out - eager).abs().max().item()
        else:
            err = 0.0
        rows.append(dict(check="graph dit", ok=err < 1e-3, max_error=err))
    except Exception as e:  # noqa: BLE001
        rows.append(dict(check="graph dit", ok=False, error=f"{type(e).__name__}: {e}"))
    return rows


def steps_without_syncs(device) -> list[dict]:
    """Three CMT steps with the loop's train_step; on CUDA any host synchronisation inside raises."""
    from engine.data import GaussianMixture
    from engine.networks import build_network
    from engine.objectives import CMT, squared_l2
    from engine.objectives.base import StepRNG
    from engine.precond import CMPrecond, EDMPrecond
    from engine.training.loop import train_step
    torch.manual_seed(0)
    teacher = EDMPrecond(build_network("gmm-mlp", hidden_channels=32, num_blocks=1)).to(device).eval()
    net = CMPrecond(build_network("gmm-mlp", hidden_channels=32, num_blocks=1)).to(device)
    obj = CMT(teacher, nfe=4, trajectories_per_batch=4, distance=squared_l2)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-4)
    data = GaussianMixture.random(4, (2,), seed=0).sample(4, generator=torch.Generator().manual_seed(0)).float()
    data = data.to(device)
    params = list(net.parameters())
    rows = []
    for step in range(3):   # the first step builds what later steps reuse; syncs are checked from the second
        rng = StepRNG.for_step(0, 0, step * 16, device)
        strict = device.type == "cuda" and step > 0
        try:
            if strict:
                torch.cuda.set_sync_debug_mode("error")
            train_step(net, obj, opt, params, data, None, rng, torch.autocast(device.type, enabled=False), 1.0,
                       device)
            rows.append(dict(check=f"cmt step {step}" + (" (sync debug: error)" if strict else ""), ok=True))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(check=f"cmt step {step}", ok=False, error=f"{type(e).__name__}: {e}",
                             where=traceback.format_exc(limit=-4)))
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: the checks a CPU can run (CI)")
    ap.add_argument("--json", default=None, help="write the records to this file")
    a = ap.parse_args(argv)
    device = torch.device("cpu" if a.dry_run or not torch.cuda.is_available() else "cuda")
    start = time.perf_counter()
    report = dict(device=device_check(device), checks=[])
    print(json.dumps(report["device"]), flush=True)
    for part in (launch_every_specialisation, teacher_graphs, steps_without_syncs):
        if a.dry_run and part is launch_every_specialisation:
            specs = aot.specialisations()   # the interpreter runs each in seconds: a few stand for all in CI
            report["checks"] += [dict(check=s.key(), ok=True, note="listed (dry run)") for s in specs]
            continue
        for row in part(device):
            report["checks"].append(row)
            print(("ok   " if row["ok"] else "FAIL ") + row["check"] + ("" if row["ok"] else f": {row}"),
                  flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["failed"] = [r["check"] for r in report["checks"] if not r["ok"]]
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(f"preflight: {len(report['checks'])} checks in {report['seconds']} s; failed: {report['failed'] or 'none'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
