"""Where a stage's numbers go: JSONL (always), TensorBoard (when installed), and a progress bar on stderr.

The JSONL file is appended line by line and flushed, so a killed run keeps everything it logged; on resume,
lines beyond the resumed image count are dropped first so the log reads as one uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from tqdm import tqdm


def truncate_jsonl(path: str, max_kimg: float) -> None:
    """Keep only records with kimg ≤ max_kimg (and no half-written last line), rewritten atomically."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is suspect
            if rec.get("kimg", 0) <= max_kimg + 1e-9:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class TrainLog:
    """`total_nimg` and `start_nimg` count images (pairs), as the loop does. The progress bar counts them as integers
    and shows kimg (tqdm's unit_scale): summing per-step kimg as floats went past the total (0.016 × 600 > 9.6), and
    tqdm then warned "clamping frac to range [0, 1]" and showed a negative remaining time; and a last step that
    passes the budget (a budget that is not a whole number of batches) stops the bar at its total."""

    def __init__(self, run_dir: str, total_nimg: int, start_nimg: int, desc: str, progress: bool = True):
        self.path = os.path.join(run_dir, "log.jsonl")
        truncate_jsonl(self.path, start_nimg / 1000)
        self.file = open(self.path, "a")
        self.tb = None
        try:  # optional: TensorBoard only when the package is installed
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=int(start_nimg))
        except ImportError:
            pass
        self.total = int(total_nimg)
        self.bar = tqdm(total=self.total, initial=min(int(start_nimg), self.total), desc=desc, unit="kimg",
                        unit_scale=1 / 1000, dynamic_ncols=True, disable=not progress, file=sys.stderr,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} kimg "
                                   "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")
        self.t0 = time.time()

    def advance(self, nimg: int) -> None:
        """The stage has reached `nimg` images (pairs)."""
        step = min(int(nimg), self.total) - self.bar.n
        if step > 0:
            self.bar.update(step)

    def write(self, record: dict) -> None:
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if "loss" in record and record["loss"] is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
        if self.tb is not None:
            step = int(round(record.get("kimg", 0) * 1000))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "kimg":
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
