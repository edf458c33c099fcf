"""Checks of user-given values at the engine's public entry points — constructors, solvers, command lines — each
failing with one line that names the value, what it must be, and what it was (an `EngineError`). They run once,
where a value enters, never inside a step: nothing here synchronises with a device.

    positive_int("nfe", nfe, "CMT")          # CMT: nfe must be a positive integer, got 0
    finite("sigma_data", s, "EDMPrecond", low=0, strict=True)

`arg(check)` turns any of them into an argparse `type=`, so a bad flag gives argparse's one-line usage error.
"""
from __future__ import annotations

import argparse
import math
import numbers

from engine.errors import EngineError

__all__ = ["positive_int", "nonneg_int", "finite", "probability", "one_of", "arg", "positive_float_arg",
           "positive_int_arg", "nonneg_int_arg", "SEED_LIMIT", "seed", "seed_arg"]

# torch's generators take 64-bit seeds: torch.manual_seed(2**64) raises "Overflow when unpacking long long"
SEED_LIMIT = 2 ** 64


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def positive_int(name: str, value, where: str = "") -> int:
    if not _is_int(value) or value < 1:
        raise EngineError(f"{_prefix(where)}{name} must be a positive integer, got {value!r}")
    return int(value)


def nonneg_int(name: str, value, where: str = "") -> int:
    if not _is_int(value) or value < 0:
        raise EngineError(f"{_prefix(where)}{name} must be a non-negative integer, got {value!r}")
    return int(value)


def seed(name: str, value, where: str = "") -> int:
    """A random seed torch's generators accept: an integer in [0, 2**64 − 1]."""
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise EngineError(f"{_prefix(where)}{name} must be an integer in [0, 2**64 − 1] (a 64-bit seed), "
                          f"got {value!r}")
    return int(value)


def finite(name: str, value, where: str = "", low: float | None = None, high: float | None = None,
           strict: bool = False) -> float:
    """A finite real number, optionally bounded below by `low` (exclusive with `strict`) and above by `high`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '≥'} {low:g}"
        bound += "" if high is None else (" and" if bound else "") + f" ≤ {high:g}"
        raise EngineError(f"{_prefix(where)}{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def probability(name: str, value, where: str = "", below_one: bool = True) -> float:
    """A probability in [0, 1) (dropout rates), or [0, 1] with below_one=False."""
    v = finite(name, value, where, low=0.0, high=1.0)
    if below_one and v >= 1.0:
        raise EngineError(f"{_prefix(where)}{name} must be in [0, 1), got {value!r}")
    return v


def one_of(name: str, value, choices, where: str = ""):
    if value not in choices:
        raise EngineError(f"{_prefix(where)}{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def arg(check):
    """An argparse `type=` from a function of the flag's text that raises EngineError or ValueError."""
    def parse(text):
        try:
            return check(text)
        except (EngineError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise EngineError(f"{text!r} is not a number") from None


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise EngineError(f"{text!r} is not an integer") from None


positive_float_arg = arg(lambda t: finite("the value", _number(t), low=0.0, strict=True))
positive_int_arg = arg(lambda t: positive_int("the value", _integer(t)))
nonneg_int_arg = arg(lambda t: nonneg_int("the value", _integer(t)))
seed_arg = arg(lambda t: seed("the seed", _integer(t)))
