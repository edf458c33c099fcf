"""Learning-rate schedules as functions of images seen (never of iterations), docs/spec/cm.md §3.4 and EDM2.

All take `nimg`, the image count *before* the step the rate is used for (the reference sets the rate from the
counter before each step: the first step uses exactly lr_0)."""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "inv_sqrt", "step")


def learning_rate(schedule: str, nimg: int, *, lr: float, total_nimg: int, ref_nimg: float = 0.0,
                  rampup_nimg: float = 0.0, step_nimg: float = 0.0, gamma: float = 0.1) -> float:
    """constant: lr.
    linear: lr·(1 − nimg/total_nimg), CMT's unconditional linear decay (last step lr/total_steps, never 0).
    inv_sqrt: EDM2's lr/√max(nimg/ref_nimg, 1), ref_nimg = ref_batches·batch_size (EDM2 `learning_rate_schedule`).
    step: lr·gamma^⌊nimg/step_nimg⌋, torchvision's ImageNet recipe (×0.1 every 30 epochs) in images.
    Any schedule is multiplied by min(nimg/rampup_nimg, 1) when rampup_nimg > 0 (EDM2's warm-up)."""
    if schedule == "constant":
        out = lr
    elif schedule == "linear":
        out = lr * (1.0 - nimg / total_nimg)
    elif schedule == "step":
        if step_nimg <= 0:
            raise ValueError("the step schedule needs step_nimg > 0")
        out = lr * gamma ** (nimg // step_nimg)
    elif schedule == "inv_sqrt":
        if ref_nimg <= 0:
            raise ValueError("the inv_sqrt schedule needs ref_nimg > 0 (EDM2: ref_batches × batch size)")
        out = lr / math.sqrt(max(nimg / ref_nimg, 1.0))
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected one of {SCHEDULES}")
    if rampup_nimg > 0:
        out *= min(nimg / rampup_nimg, 1.0)
    return out
