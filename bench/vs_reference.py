"""Our CMT and ECT training steps against the CMT authors' own code, side by side in one process on CPU.

    python bench/vs_reference.py --ref /path/to/sony-cmt                 # sizes 16:64 and 32:128, eager + compiled
    python bench/vs_reference.py --ref DIR --sizes 16:64 --json           # records on stdout
    python bench/vs_reference.py --ref DIR --record                       # also append the table to RESULTS.md

`--ref` is a local copy of github.com/sony/cmt (never committed here). Its code is imported as it is, with these
run-time patches and nothing else, each printed when applied: the `lpips` package is replaced by a stub (the
squared-L2 metric, the reference's 'MSE', is timed; LPIPS construction would download VGG weights);
`torch.cuda.get_rng_state` / `set_rng_state` (ECMLoss's shared-dropout trick) act on the CPU generator;
`DPM_Solver.get_time_steps(device='cuda')` (DPMSolverLoss) builds its grid on the images' device.

Both sides get the same DDPM++ network (the reference's `SongUNet` configuration of `run_cmt.py --arch=ddpmpp`, at
`--channels` width; ours is the engine's SongUNet with the same state dict), the same teacher weights, RAdam at lr
2e-4, dropout 0.2, float32, one step per call: CMT (16-NFE DPM-Solver++ teacher solve of pairs/16 trajectories,
`pairs` student pairs, squared L2) and ECT (q = 2, c = 0). The methods are interleaved round by round (every
round times each step once, in a rotated order), after `--warmup` untimed rounds; the table gives the median and
the spread (max − min over median). Ours compiled: `engine/training/compiled.py` (inductor, every block of student and
teacher); its compile time — the first compiled steps minus steady state — is reported separately.

The reference is timed twice: as its authors run it, in a spawned process of its own whose C allocator is glibc's
untouched (driven step by step through a pipe, so the two processes never run at once), and in this process under
the engine's host allocator policy (engine/training/host_memory.py: freed memory is kept and reused instead of being
page-faulted in again every step), which our steps run under as the loop does. The first is what a user of their
code gets; the second isolates what our code does from what the allocator policy does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import StepBench, machine, write_results  # noqa: E402

from engine.checks import positive_int_arg  # noqa: E402

PATCHES = []


def say(msg: str) -> None:
    PATCHES.append(msg)
    print(f"[vs_reference] patch: {msg}", file=sys.stderr, flush=True)


class _LPIPSStub:
    """What the reference's DPMSolverLoss constructs as `lpips.LPIPS(net='vgg', lpips=True).cuda()`."""

    def __init__(self, **kw):
        pass

    def cuda(self):
        return self

    def __call__(self, *a):
        raise RuntimeError("the lpips stub is not a metric: time loss_metric='MSE'")


_LPIPSStub.__module__, _LPIPSStub.__qualname__, _LPIPSStub.__name__ = "lpips", "LPIPS", "LPIPS"


@contextlib.contextmanager
def reference_code(ref_dir: str):
    """Import the authors' `training` package from `ref_dir` with the patches of the module docstring."""
    if not os.path.isfile(os.path.join(ref_dir, "training", "loss.py")):
        raise SystemExit(f"--ref {ref_dir}: not a copy of sony/cmt (no training/loss.py)")
    stub = types.ModuleType("lpips")
    stub.LPIPS = _LPIPSStub           # importable as lpips.LPIPS: the reference's persistence check pickles it
    saved = dict(lpips=sys.modules.get("lpips"), get=torch.cuda.get_rng_state, set=torch.cuda.set_rng_state)
    sys.modules["lpips"] = stub
    say("lpips → a stub (the squared-L2 metric is timed)")
    torch.cuda.get_rng_state, torch.cuda.set_rng_state = torch.get_rng_state, torch.set_rng_state
    say("torch.cuda.get_rng_state / set_rng_state → the CPU generator's")
    sys.path.insert(0, ref_dir)
    try:
        from training import dpm_solver, loss, networks
        original = dpm_solver.DPM_Solver.get_time_steps

        def get_time_steps(self, skip_type, t_T, t_0, N, device):
            return original(self, skip_type, t_T, t_0, N, t_T.device if torch.is_tensor(t_T) else "cpu")
        dpm_solver.DPM_Solver.get_time_steps = get_time_steps
        say("DPM_Solver.get_time_steps(device='cuda') → the images' device")
        yield loss, networks
    finally:
        sys.path.remove(ref_dir)
        torch.cuda.get_rng_state, torch.cuda.set_rng_state = saved["get"], saved["set"]
        if saved["lpips"] is None:
            sys.modules.pop("lpips", None)
        else:
            sys.modules["lpips"] = saved["lpips"]


def networks(ref_nets, res: int, channels: int):
    """(ours student, ours teacher, reference student, reference teacher), equal weights."""
    from engine.networks.configs import build_network
    from engine.precond import CMPrecond, EDMPrecond
    kw = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
              channel_mult_noise=1, resample_filter=[1, 1], model_channels=channels, channel_mult=[2, 2, 2],
              dropout=0.2, use_fp16=False)
    torch.manual_seed(0)
    ref_student = ref_nets.ECMPrecond(img_resolution=res, img_channels=3, **kw)
    ref_teacher = ref_nets.EDMPrecond(img_resolution=res, img_channels=3, **kw).eval().requires_grad_(False)
    ours = lambda cls: cls(build_network("cifar10-ddpmpp", img_resolution=res, model_channels=channels,  # noqa: E731
                                         dropout=0.2), sigma_data=0.5)
    student, teacher = ours(CMPrecond), ours(EDMPrecond)
    student.load_state_dict(ref_student.state_dict())
    teacher.load_state_dict(ref_teacher.state_dict())
    return student, teacher.eval().requires_grad_(False), ref_student, ref_teacher


class ReferenceStep:
    """One step of the authors' loop: loss_fn(...).mean().backward(), RAdam step (their cmt/ct training loops)."""

    def __init__(self, net, loss_fn, images, net_ref=None):
        self.net, self.loss_fn, self.images, self.net_ref = net.train(), loss_fn, images, net_ref
        self.opt = torch.optim.RAdam(net.parameters(), lr=2e-4)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        kw = dict(net=self.net, images=self.images)
        if self.net_ref is not None:
            kw["net_ref"] = self.net_ref
        self.loss_fn(**kw).mean().backward()
        self.opt.step()


def interleaved(steps: dict, rounds: int, warmup: int) -> dict:
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            took = steps[k]()          # a step in another process answers its own time
            times[k].append(took if isinstance(took, float) else time.perf_counter() - t)
    return {k: dict(median=statistics.median(v), spread=(max(v) - min(v)) / statistics.median(v))
            for k, v in times.items()}


def reference_step(loss, nets, method: str, res: int, pairs: int, channels: int):
    """(the authors' step, the images, our student, our teacher) for one method and size; deterministic, so a
    worker process builds the same reference step as this one."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(pairs, 3, res, res, generator=g) * 2 - 1
    student, teacher, ref_student, ref_teacher = networks(nets, res, channels)
    if method == "cmt":
        ref = ReferenceStep(ref_student, loss.DPMSolverLoss(NFE=16, loss_metric="MSE"), images, ref_teacher)
    else:
        ref = ReferenceStep(ref_student, loss.ECMLoss(q=2, c=0.0), images)
    return ref, images, student, teacher


def _reference_worker(ref_dir: str, method: str, res: str, pairs: str, channels: str) -> None:
    """`vs_reference.py --reference-worker ...`: the authors' step in a process of its own, whose C allocator is
    glibc's as in their runs (the timing process's policy is the engine's, engine/training/host_memory.py, and glibc's
    untouched defaults cannot be restored in it). Each "step" line on stdin runs one step and answers its
    seconds on stdout; everything the reference prints goes to stderr."""
    reply = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    with reference_code(ref_dir) as (loss, nets):
        ref = reference_step(loss, nets, method, int(res), int(pairs), int(channels))[0]
        print("ready", file=reply)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            t = time.perf_counter()
            ref.step()
            print(repr(time.perf_counter() - t), file=reply)


class SeparateProcessStep:
    """A step run by `_reference_worker` in a process of its own; `step()` blocks until it is done, so the two
    processes never compete for the cores, and returns the worker's own time of the step."""

    def __init__(self, ref_dir: str, method: str, res: int, pairs: int, channels: int):
        import subprocess
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--reference-worker", ref_dir,
                                      method, str(res), str(pairs), str(channels)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the reference worker process did not start (exit {self.proc.wait()})")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


# what compilation cannot speed up: the convolutions (oneDNN, forward and backward) and attention's matmuls
DENSE_OPS = {"convolution": ("aten::mkldnn_convolution", "aten::convolution_backward"), "attention matmuls": (
    "aten::bmm",)}


def op_shares(step) -> dict:
    """Shares of one step's CPU time (torch.profiler, self time) spent in DENSE_OPS' classes: the floor below
    which fusing the rest cannot take the step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    table = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(table.values())
    return {k: sum(table.get(n, 0.0) for n in names) / total for k, names in DENSE_OPS.items()}


def run_size(loss, nets, res: int, pairs: int, a) -> list[dict]:
    from engine.data.sampler import TensorSource
    from engine.objectives import CMT, ECT, squared_l2
    from engine.training.compiled import compile_regions
    m = pairs // 16
    out = []
    for method in ("cmt", "ect"):
        ref, images, student, teacher = reference_step(loss, nets, method, res, pairs, a.channels)
        data = TensorSource(images)
        if method == "cmt":
            objective = lambda t: CMT(t, nfe=16, trajectories_per_batch=m, distance=squared_l2)  # noqa: E731
        else:
            objective = lambda t: ECT(q=2)                                                        # noqa: E731
        # StepBench sets the engine's host allocator policy in this process (engine/training/host_memory.py)
        eager = StepBench(student, objective(teacher), data, pairs, torch.device("cpu"), lr=2e-4)
        shipped = SeparateProcessStep(os.path.abspath(a.ref), method, res, pairs, a.channels)
        steps = {"reference": shipped.step, "reference_retain": ref.step, "ours_eager": eager.step}
        compile_s = None
        if a.compiled:
            import copy
            s2, t2 = copy.deepcopy(student), copy.deepcopy(teacher)
            compile_regions(s2, "default")
            compile_regions(t2, "default")
            compiled = StepBench(s2, objective(t2), data, pairs, torch.device("cpu"), lr=2e-4)
            t0 = time.perf_counter()
            compiled.step()
            compiled.step()
            first_two = time.perf_counter() - t0
            steps["ours_compiled"] = compiled.step
        try:
            res_t = interleaved(steps, a.rounds, a.warmup)
        finally:
            shipped.close()
        if a.compiled:
            compile_s = first_two - 2 * res_t["ours_compiled"]["median"]
        shares = op_shares(eager.step)
        ms = {k: v["median"] * 1e3 for k, v in res_t.items()}
        out.append(dict(method=method, resolution=res, pairs=pairs, reference_ms=ms["reference"],
                        reference_retain_ms=ms["reference_retain"], ours_eager_ms=ms["ours_eager"],
                        ours_compiled_ms=ms.get("ours_compiled"), compile_s=compile_s,
                        spread={k: v["spread"] for k, v in res_t.items()}, ours_eager_op_shares=shares))
    return out


def markdown(res: dict) -> str:
    lines = [f"## Ours vs the authors' code (CPU) — {res['date']}", "", f"Machine: {res['machine']}", "",
             f"Command: `{res['command']}`", "", f"DDPM++ at width {res['channels']}, RAdam, dropout 0.2, float32; "
             f"{res['rounds']} interleaved rounds after {res['warmup']} (median; spread = (max − min)/median). "
             f"Patches to the reference: {'; '.join(res['patches'])}. \"reference\" runs in a process of its own "
             "with glibc's allocator as the authors run it; \"reference, retain\" runs in ours, under the engine's "
             "host allocator policy (engine/training/host_memory.py). Ratios are to \"reference\" and, in brackets, to "
             "\"reference, retain\".", "",
             "| method | size / pairs | reference ms | reference, retain ms | ours eager ms (ratio) | "
             "ours compiled ms (ratio) | compile s | spreads (ref / ref retain / eager / compiled) | eager step in "
             "convolutions / attention matmuls |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["records"]:
        c, ref, ret = r["ours_compiled_ms"], r["reference_ms"], r["reference_retain_ms"]
        sp = " / ".join(f"{100 * r['spread'][k]:.0f}%" for k in ("reference", "reference_retain", "ours_eager",
                                                                 "ours_compiled") if k in r["spread"])

        def cell(ms):
            return "-" if ms is None else f"{ms:.0f} ({ms / ref:.2f} [{ms / ret:.2f}])"
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        dense = " / ".join(f"{100 * v:.0f}%" for v in r["ours_eager_op_shares"].values())
        lines.append(f"| {r['method']} | {r['resolution']}² / {r['pairs']} | {ref:.0f} | {ret:.0f} | "
                     f"{cell(r['ours_eager_ms'])} | {cell(c)} | {compile_s} | {sp} | {dense} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    import datetime
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, help="a local copy of github.com/sony/cmt")
    p.add_argument("--sizes", default="16:64,32:128", help="resolution:pairs, comma-separated")
    p.add_argument("--channels", type=positive_int_arg, default=32, help="DDPM++ model_channels (paper: 128)")
    p.add_argument("--rounds", type=positive_int_arg, default=7)
    p.add_argument("--warmup", type=positive_int_arg, default=2)
    p.add_argument("--no-compiled", dest="compiled", action="store_false", help="skip our compiled steps")
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.add_argument("--record", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    sizes = []
    for item in a.sizes.split(","):
        r, n = (int(v) for v in item.split(":"))
        if n % 16:
            p.error(f"--sizes {item}: pairs must be a multiple of 16 (one CMT trajectory is 16 pairs)")
        sizes.append((r, n))
    records = []
    with reference_code(os.path.abspath(a.ref)) as (loss, nets):
        for r, n in sizes:
            records += run_size(loss, nets, r, n, a)
    res = dict(date=datetime.date.today().isoformat(), machine=machine(torch.device("cpu")),
               command="python bench/vs_reference.py " + " ".join(argv), records=records, channels=a.channels,
               rounds=a.rounds, warmup=a.warmup, patches=PATCHES)
    if a.json:
        print(json.dumps([{k: v for k, v in r.items() if k not in ("spread", "ours_eager_op_shares")}
                          for r in records]))
    else:
        text = markdown(res)
        print(text)
        write_results(res, text, a.out, "vs_reference", False, a.record, markdown=True)
    return records


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reference-worker"]:
        _reference_worker(*sys.argv[2:])
    else:
        from engine.cli import run_main
        run_main(main)
