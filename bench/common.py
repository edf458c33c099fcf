"""What the benchmark scripts share: timing (median of device-synchronised repetitions after warm-up), the kernel
switch, a machine description, and timing one real training step (engine.training.loop.train_step) of an objective."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.objectives import StepRNG  # noqa: E402
from engine.training import host_memory  # noqa: E402
from engine.training.loop import train_step  # noqa: E402
from engine.training.optimizers import make_optimizer  # noqa: E402
from engine.training.stage_config import StageConfig  # noqa: E402


@contextlib.contextmanager
def kernel_mode(mode: str):
    """ENGINE_KERNELS set to `mode` inside the block (engine/ops.py reads it at every call)."""
    old = os.environ.get("ENGINE_KERNELS")
    os.environ["ENGINE_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ENGINE_KERNELS", None)
        else:
            os.environ["ENGINE_KERNELS"] = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median seconds of `fn()` over `reps` timed calls after `warmup` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, per the vendor


def peak_tflops(device: torch.device, override: float | None, precision: str = "bf16") -> float | None:
    """The device's dense peak for MFU: `override`, else the vendor's figure for a known GPU, else None.
    precision 'tf32' (a float32 run with TF32 tensor cores, as CMT's 512 code): half the bf16 rate on these
    GPUs (H100/H200 SXM 494.7, A100 156, L40S 181 dense TFLOP/s in the vendors' data sheets)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    bf16 = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return None if bf16 is None else bf16 / (2 if precision == "tf32" else 1)


def step_flags(p, reps: int, warmup: int, smoke_help: str, out: str) -> None:
    """The flags of the scripts that time training steps: repetitions, device, peak, smoke, record, output."""
    from engine.checks import nonneg_int_arg, positive_float_arg, positive_int_arg
    p.add_argument("--reps", type=positive_int_arg, default=reps)
    p.add_argument("--warmup", type=nonneg_int_arg, default=warmup)
    p.add_argument("--device", default=None)
    p.add_argument("--peak-tflops", type=positive_float_arg, default=None, help="the device's peak (for MFU)")
    p.add_argument("--smoke", action="store_true", help=smoke_help)
    p.add_argument("--record", action="store_true", help="append the tables to bench/RESULTS.md")
    p.add_argument("--out", default=out)


def machine(device: torch.device) -> str:
    try:
        import triton
        tri = f"triton {triton.__version__}"
    except ImportError:
        tri = "no triton"
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    return f"{what}; torch {torch.__version__}; {tri}; {torch.get_num_threads()} torch threads"


def write_results(res: dict, text: str, out: str, name: str, smoke: bool, record: bool,
                  markdown: bool = False) -> str:
    """`<out>/<name>-<stamp>[-smoke].json` (and `.md` with `markdown`); with `record`, the table appended to
    bench/RESULTS.md. Returns the path without extension (for files a script adds beside, e.g. a plot)."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}{'-smoke' if smoke else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    if markdown:
        with open(stem + ".md", "w") as f:
            f.write(text)
    if record:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"), "a") as f:
            f.write("\n" + text)
    return stem


class StepBench:
    """One objective's real training step on a fresh student: RAdam (or `optimizer`), bf16 autocast on CUDA (unless
    bf16=False), the
    loop's per-step RNG. `step()` runs one iteration; `time(reps, warmup)` its median seconds."""

    def __init__(self, student: torch.nn.Module, objective, data, batch: int, device: torch.device, lr=1e-4,
                 optimizer: str = "radam", bf16: bool = True):
        host_memory.apply()     # as the loop does (engine/training/loop.py train_stage)
        self.net = student.to(device).train()
        self.objective = objective.to(device)
        self.params = [p for p in self.net.parameters() if p.requires_grad] + list(objective.parameters())
        cfg = StageConfig(name="bench", total_kimg=1, batch_size=batch, lr=lr, optimizer=optimizer)
        self.opt = make_optimizer(cfg, self.params, device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16)
        self.data, self.batch, self.device, self.nimg = data, batch, device, 0
        self.last = None

    def step(self):
        n = self.objective.images_per_step(self.batch)
        idx = torch.arange(self.nimg, self.nimg + n) % len(self.data)
        x, y = self.data.batch(idx, self.device)
        rng = StepRNG.for_step(0, 0, self.nimg, self.device)
        self.last, _, _ = train_step(self.net, self.objective, self.opt, self.params, x, y, rng, self.autocast,
                                     None, self.device)
        self.nimg += self.batch

    def time(self, reps: int, warmup: int) -> float:
        return median_time(self.step, self.device, reps, warmup)


def measure_step(name: str, bench: "StepBench", pairs: int, device: torch.device, peak: float | None, reps: int,
                 warmup: int) -> dict:
    """One row of the EDM2 step benchmarks (bench/edm2.py, bench/imagenet512.py): the step's counted FLOPs
    (torch.utils.flop_counter, one step), then its median time with forced weight normalisation after each step as
    the loop does, pairs/s, MFU against `peak`, peak memory on CUDA and teacher NFE per pair."""
    from torch.utils.flop_counter import FlopCounterMode

    from engine.networks.edm2_unet import force_weight_normalization

    def step():
        bench.step()
        force_weight_normalization(bench.net)     # the loop's step → EMA → normalise
    with FlopCounterMode(display=False) as counter:
        bench.step()
    total = float(counter.get_total_flops())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_time(step, device, reps, warmup)
    sync(device)
    return dict(method=name, seconds=seconds, pairs_per_s=pairs / seconds, tflop_per_iter=total / 1e12,
                mfu=None if not peak else total / seconds / (peak * 1e12),
                peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
                teacher_nfe_per_pair=bench.last.teacher_nfe / max(bench.last.pairs, 1))
