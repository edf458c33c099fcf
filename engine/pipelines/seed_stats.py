"""Statistics over seeds for the validation recipes (docs/validation.md): the seeds a run repeats over, means with
standard errors, the 95% t-interval of a paired difference — an interval that contains 0 is reported as a tie — and
the table the recipes print of them."""
from __future__ import annotations

import math
from typing import Sequence


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / √n; nan for one value)."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("no values")
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return m, sd / math.sqrt(len(v))


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n − 1; nan for one value): the spread the paper's "mean ± std" tables give."""
    _, se = mean_se(values)
    return se * math.sqrt(len(values))


def paired_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """The t-interval of the mean of a_i − b_i over paired seeds: {mean, low, high, n, verdict}, verdict one of
    'a < b', 'a > b', 'tie' (the interval contains 0) or 'one seed' (no interval)."""
    from scipy import stats
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples need equal, non-zero lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    m, se = mean_se(d)
    if len(d) < 2:
        return dict(mean=m, low=None, high=None, n=1, verdict="one seed")
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * se
    low, high = m - half, m + half
    verdict = "tie" if low <= 0 <= high else ("a < b" if high < 0 else "a > b")
    return dict(mean=m, low=low, high=high, n=len(d), verdict=verdict)


def seeds(args, cfg) -> list[int]:
    """--seed … --seed + N − 1, N from --seeds or the recipe's `cfg.default_seeds`."""
    return list(range(args.seed, args.seed + (args.seeds or cfg.default_seeds)))


def interval_text(p: dict) -> str:
    """A paired interval (`paired_interval` of an arm against a reference arm) in a table."""
    said = {"a < b": "lower", "a > b": "higher", "tie": "tie"}.get(p["verdict"], p["verdict"])
    return said if p["low"] is None else f"{p['mean']:.3g} [{p['low']:.3g}, {p['high']:.3g}] ({said})"


def seed_table(summary: dict, arms, metrics: dict, spread: str, refs: list) -> str:
    """A markdown table: per arm, 'mean ± spread' of each metric (`metrics`: key → column header; `spread` 'std' or
    'stderr' of `summary[arm][key]`), then per reference one column of the paired intervals to it
    (`refs`: [(column header, reference arm, {arm: {key: paired_interval}})]; '–' in the reference's own row)."""
    head = ["arm", *metrics.values(), *(h for h, _, _ in refs)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in arms:
        cells = [f"{summary[a][k]['mean']:.4g} ± {summary[a][k][spread]:.2g}" for k in metrics]
        cells += ["–" if a == ref else "; ".join(f"{k}: {interval_text(q)}" for k, q in paired[a].items())
                  for _, ref, paired in refs]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
