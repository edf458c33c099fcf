"""Where a training step's time goes: `--profile-steps N` (every recipe), `train_stage(profile_steps=N)`.

The first N steps of each stage after its first (which pays once for compilation, graph capture and the allocator's
warm-up) are timed phase by phase, and their mean milliseconds per step go into the stage's log.jsonl as one
record, `{"event": "profile", "steps": N, "ms_per_step": {...}}`, and onto the terminal:

    data        the batch (engine/data/loader.py BatchStream.next)
    teacher     the teacher's work inside the objective: CMT's trajectory solve, ECD's and sCD's teacher calls,
                CMT-MF's teacher velocities
    forward     the objective's forward less the teacher's part: the student's forward(s) and the loss
    backward    loss.backward()
    optimizer   gradient clipping and the optimizer step
    ema         the EMA updates (the stage's and the tracked power EMAs)

Phases nest (the teacher runs inside the objective's forward); each is timed exclusive of the phases opened inside
it, so together they add up to the step. On CPU a phase is a wall clock (`time.perf_counter`): the CPU runs the
ops as they are issued. On CUDA it is a pair of events recorded on the current stream, read once after the window
with a single synchronisation, so the profiled steps keep their asynchrony. With N = 0 (the default) nothing is
timed and `phase` costs one attribute test. `phase` lives in engine/objectives/base.py, beside the other step context
objectives see (StepRNG), so that objectives mark their teacher's work without importing the training folder."""
from __future__ import annotations

import contextlib
import time

import torch

from engine.objectives import base as _marks
from engine.objectives.base import phase

__all__ = ["StepProfile", "phase", "describe", "PHASES"]

PHASES = ("data", "teacher", "forward", "backward", "optimizer", "ema")


class StepProfile:
    """Times steps `skip` … `skip + steps − 1` of a stage (counted from this process's first step)."""

    def __init__(self, steps: int, device: torch.device, skip: int = 1):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"profile steps must be an integer >= 0, got {steps!r}")
        self.steps, self.skip, self.cuda = steps, skip, torch.device(device).type == "cuda"
        self._seen = 0
        self._records: list[list] = []     # [name, start, end, parent index]
        self._stack: list[int] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _open(self, name: str) -> int:
        parent = self._stack[-1] if self._stack else -1
        self._records.append([name, self._mark(), None, parent])
        self._stack.append(len(self._records) - 1)
        return self._stack[-1]

    def _close(self, index: int) -> None:
        self._records[index][2] = self._mark()
        self._stack.pop()

    @contextlib.contextmanager
    def step(self):
        """One training step: timed when it falls in the window."""
        timed = self.skip <= self._seen < self.skip + self.steps
        if timed:
            _marks.step_profile = self      # what `phase` times, in the loop and in the objectives
        try:
            yield
        finally:
            _marks.step_profile = None
            self._seen += 1

    def done(self) -> bool:
        """Whether the window has just been completed (the record is due)."""
        return self.steps > 0 and self._seen == self.skip + self.steps

    def record(self) -> dict:
        """The window's mean milliseconds per step by phase, exclusive of nested phases (one synchronisation on
        CUDA, here and only here)."""
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = [s.elapsed_time(e) if self.cuda else (e - s) * 1000 for _, s, e, _ in self._records]
        exclusive = list(elapsed)
        for i, (_, _, _, parent) in enumerate(self._records):
            if parent >= 0:
                exclusive[parent] -= elapsed[i]
        ms = {name: 0.0 for name in PHASES}
        for (name, *_), t in zip(self._records, exclusive):
            ms[name] = ms.get(name, 0.0) + t / self.steps
        ms = {k: round(v, 3) for k, v in ms.items()}
        return {"event": "profile", "steps": self.steps, "after_steps": self.skip,
                "clock": "cuda events" if self.cuda else "wall clock", "ms_per_step": ms,
                "step_ms": round(sum(ms.values()), 3)}


def describe(record: dict, stage: str) -> str:
    """One line for the terminal."""
    parts = ", ".join(f"{k} {v:.1f}" for k, v in record["ms_per_step"].items())
    return (f"stage {stage!r}: profile of {record['steps']} steps ({record['clock']}), ms per step: {parts}; "
            f"total {record['step_ms']:.1f}")
