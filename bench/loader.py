"""Input throughput: images/s the stage's batch stream (engine/data/loader.py) delivers from a 64×64 PNG zip in EDM's
format, in the training process and with worker processes, beside the images/s a training step consumes (the
ImageNet-64 recipe's ECT step at width 16 on this machine, or the rate given with --consume).

    python bench/loader.py                      # 4096 images, batch 128, workers 0, 1, 2
    python bench/loader.py --record             # also append the table to bench/RESULTS.md
    python bench/loader.py --smoke              # 256 images (CI)

Each rate is the median over `--reps` passes of `--steps` batches after one warm-up pass, in a fresh stream per
pass (worker start-up included: a stage pays it once). The PNGs are random noise, which decodes like photographs of
the same size (zlib at level 0 in EDM's dataset tool: decoding is a copy plus the PNG filter pass).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from common import machine, write_results  # noqa: E402

from engine.checks import nonneg_int_arg, positive_float_arg, positive_int_arg  # noqa: E402
from engine.data import ImageDataset, write_image_dataset  # noqa: E402
from engine.data.loader import BatchStream  # noqa: E402
from engine.data.sampler import ImageDatasetSource, ResumableSampler  # noqa: E402


def rate(source, batch: int, steps: int, workers: int, reps: int) -> float:
    sampler = ResumableSampler(len(source), seed=0)
    times = []
    for rep in range(reps + 1):
        t = time.perf_counter()
        stream = BatchStream(source, sampler, rep * steps * batch, batch, 0, 1, steps, torch.device("cpu"), workers)
        for _ in range(steps):
            stream.next()
        stream.close()
        if rep:                                # the first pass warms the page cache
            times.append(time.perf_counter() - t)
    return steps * batch / statistics.median(times)


def step_consumption(images_per_step: int = 128) -> float:
    """Images/s of the ImageNet-64 recipe's ECT step (EDM2-XL topology at width 16) on this machine."""
    from common import StepBench

    from engine.data.sampler import TensorSource
    from engine.objectives import ECT
    from engine.pipelines.edm2_presets import build_edm2_preset
    torch.manual_seed(0)
    net = build_edm2_preset("edm2-img64-xl", use_fp16=False, logvar_channels=None, model_channels=16)
    data = TensorSource(torch.rand(256, 3, 64, 64) * 2 - 1, torch.randint(0, 1000, (256,)))
    bench = StepBench(net, ECT(P_mean=-0.8, P_std=1.6, q=512, c=0.06, weighting="snrpk"), data, images_per_step,
                      torch.device("cpu"), optimizer="adam")
    return images_per_step / bench.time(3, 1)


def main(argv=None) -> dict:
    import datetime
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=positive_int_arg, default=4096)
    p.add_argument("--batch", type=positive_int_arg, default=128)
    p.add_argument("--steps", type=positive_int_arg, default=16)
    p.add_argument("--reps", type=positive_int_arg, default=3)
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--consume", type=positive_float_arg, default=None, help="a step's images/s (default: measured)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--record", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.batch, a.steps, a.reps, a.workers = 256, 32, 4, 1, "0,1"
    workers = [nonneg_int_arg(w) for w in a.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(a.images, 64, 64, 3), dtype=np.uint8)
        path = write_image_dataset(os.path.join(tmp, "img64.zip"), images, np.arange(a.images) % 1000)
        source = ImageDatasetSource(ImageDataset(str(path), use_labels=True))
        rows = [dict(workers=w, images_per_s=rate(source, a.batch, a.steps, w, a.reps)) for w in workers]
    consume = a.consume or (None if a.smoke else step_consumption(a.batch))
    res = dict(date=datetime.date.today().isoformat(), machine=machine(torch.device("cpu")),
               command="python bench/loader.py " + " ".join(argv), rows=rows, batch=a.batch,
               step_images_per_s=consume)
    lines = [f"## Input pipeline: 64×64 PNG zip — {res['date']}", "", f"Machine: {res['machine']}", "",
             f"Command: `{res['command']}`", "", f"Batch {a.batch}, {a.steps} batches per pass, median of {a.reps}:", "",
             "| workers | images/s | × a step's consumption |", "|---|---|---|"]
    for r in rows:
        ratio = "-" if not consume else f"{r['images_per_s'] / consume:.1f}"
        lines.append(f"| {r['workers']} | {r['images_per_s']:.0f} | {ratio} |")
    if consume:
        lines += ["", f"A step consumes {consume:.1f} images/s (ImageNet-64 ECT step, EDM2-XL topology at width 16, "
                      "batch 128, this machine)" if not a.consume else f"A step consumes {consume:g} images/s (given)."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_results(res, text, a.out, "loader", a.smoke, a.record, markdown=True)
    return res


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
