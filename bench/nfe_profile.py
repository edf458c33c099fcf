"""Per-pair cost of every training method, measured by the loop's own counters beside the closed form.

    python bench/nfe_profile.py            # a table
    python bench/nfe_profile.py --json     # a JSON list of records (method, config, *_per_pair, closed form)

Each method runs its real training step — `engine.training.loop.train_stage` for two steps, on a small MLP student and
the
analytic Gaussian-mixture teacher (the counts do not depend on the network) — and the loop's counters give teacher
NFE, student forward and student backward passes per training pair. Beside them: the paper's accounting
(Appendix C.2): a trajectory of N steps of a k-step multistep solver whose k − 1 bootstrap steps cost c teacher
calls each gives N pairs for N + (k − 1)(c − 1) teacher calls. Our DPM-Solver++ bootstraps with its own
lower-order multistep updates (c = 1), so CMT pays exactly 1 teacher call per pair at any N and order; the
others: Slow CMT Σ_{j<N}(N − j)/N = (N + 1)/2 (each pair re-solves from its own level, levels stratified),
KD N (one pair per trajectory), CD-Euler 1, CD-Heun 2, CT, sCT and Mean Flow 0, sCD 1, CMT from the trajectory
cache 0 (its teacher calls were paid once, when the store was written: 1 per stored pair). Mean Flow runs on a tiny
DiT (it needs the flow-map signature net(z, t, r, labels)).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data import GaussianMixture  # noqa: E402
from engine.data.sampler import TensorSource  # noqa: E402
from engine.networks import DiT, build_network  # noqa: E402
from engine.objectives import CMT, ECD, ECT, KD, SCD, SCT, CachedCMT, MeanFlow, SlowCMT, squared_l2  # noqa: E402
from engine.precond import CMPrecond  # noqa: E402
from engine.teacher import trajectory_cache as tc  # noqa: E402
from engine.training.loop import train_stage  # noqa: E402
from engine.training.stage_config import StageConfig  # noqa: E402

STEPS = 2
TRAJECTORIES = 2   # per CMT step
BATCH = 32         # pairs per step for the one-pair-per-image methods


def closed_form_cmt(N: int, k: int, c: int = 1) -> float:
    """Appendix C.2: N pairs from N + (k − 1)(c − 1) teacher calls."""
    return (N + (k - 1) * (c - 1)) / N


def configurations(teacher, store_spec=None) -> list[dict]:
    """Every (method, config): the objective, the stage batch (pairs per step) and the closed-form teacher NFE."""
    out = []
    for N in (8, 16, 32):
        for k in (1, 2, 3):
            out.append(dict(method="cmt", config=f"N={N}, order={k}, c=1", batch=TRAJECTORIES * N,
                            make=lambda N=N, k=k: CMT(teacher, nfe=N, order=k, trajectories_per_batch=TRAJECTORIES,
                                                      distance=squared_l2),
                            closed=closed_form_cmt(N, k)))
    out += [
        dict(method="slow_cmt", config="N=16, order=3", batch=BATCH,
             make=lambda: SlowCMT(teacher, nfe=16, distance=squared_l2), closed=(16 + 1) / 2),
        dict(method="kd", config="N=16, order=3", batch=BATCH,
             make=lambda: KD(teacher, nfe=16, distance=squared_l2), closed=16.0),
        dict(method="cd_euler", config="ECD, Euler step", batch=BATCH,
             make=lambda: ECD(teacher, solver="euler"), closed=1.0),
        dict(method="cd_heun", config="ECD, Heun step", batch=BATCH,
             make=lambda: ECD(teacher, solver="heun"), closed=2.0),
        dict(method="ct", config="ECT", batch=BATCH, make=lambda: ECT(), closed=0.0),
        dict(method="sct", config="sCT, TrigFlow", batch=BATCH, make=lambda: SCT(), closed=0.0),
        dict(method="scd", config="sCD, TrigFlow", batch=BATCH, make=lambda: SCD(teacher), closed=1.0),
        # Mean Flow: no teacher; its student passes are a forward with gradient, the JVP on the 25% of rows with
        # r ≠ t, and (with guidance, not here) the no-grad CFG evaluations
        dict(method="mf", config="Mean Flow, 75% r = t, no guidance", batch=BATCH,
             make=lambda: MeanFlow(label_dropout=0.0), closed=0.0),
    ]
    if store_spec is not None:
        out.append(dict(method="cmt_cache", config=f"N={store_spec.nfe}, from a trajectory store",
                        batch=TRAJECTORIES * store_spec.nfe,
                        make=lambda: CachedCMT(store_spec, trajectories_per_batch=TRAJECTORIES, distance=squared_l2),
                        closed=0.0, cache=True))
    return out


def profile() -> list[dict]:
    gm = GaussianMixture.random(4, (2,), std=0.2, seed=0)
    images = TensorSource(gm.sample(512, generator=torch.Generator().manual_seed(0)).float())
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        tc.write_store(store, tc.StoreSpec(num_trajectories=16, shape=[2], nfe=16, chunk=16, teacher="gmm"),
                       gm.denoise, images, progress=False)
        source = tc.TrajectorySource(store)
        latents = TensorSource(torch.randn(256, 2, 4, 4), torch.randint(0, 10, (256,)))
        for i, c in enumerate(configurations(gm.denoise, source.spec)):
            torch.manual_seed(0)
            net = (DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2,
                       num_classes=10) if c["method"] == "mf" else
                   CMPrecond(build_network("gmm-mlp", hidden_channels=16, num_blocks=1)))
            cfg = StageConfig(name=f"s{i}", total_kimg=STEPS * c["batch"] / 1000, batch_size=c["batch"], lr=1e-4,
                              ema_beta=None, ema_std=0.1, log_kimg=None, ckpt_kimg=None, seed=0)
            data = source if c.get("cache") else latents if c["method"] == "mf" else images
            res = train_stage(cfg, net, c["make"](), data, os.path.join(tmp, "run"))
            n = res.counters
            records.append(dict(method=c["method"], config=c["config"],
                                teacher_nfe_per_pair=n["teacher_nfe"] / n["pairs"],
                                student_forward_per_pair=n["student_forward"] / n["pairs"],
                                student_backward_per_pair=n["student_backward"] / n["pairs"],
                                closed_form_teacher_nfe_per_pair=c["closed"],
                                pairs=n["pairs"], images=n["images"], steps=n["steps"]))
    return records


def table(records: list[dict]) -> str:
    lines = ["| method | config | teacher NFE / pair | closed form | student fwd / pair | student bwd / pair |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['method']} | {r['config']} | {r['teacher_nfe_per_pair']:.4g} | "
                     f"{r['closed_form_teacher_nfe_per_pair']:.4g} | {r['student_forward_per_pair']:.4g} | "
                     f"{r['student_backward_per_pair']:.4g} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    a = p.parse_args(argv)
    records = profile()
    print(json.dumps(records, indent=1) if a.json else table(records))
    return records


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
