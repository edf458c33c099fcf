"""Regional compilation: `torch.compile` on each block of a network (the units FSDP2 shards, engine/dist.py
`fsdp_units`), in place (`nn.Module.compile`: names and state dicts unchanged, so checkpoints and releases do
not see it), rather than on the whole model. Compile time is bounded by the few distinct block shapes, the
compiled regions compose with FSDP2's per-block gathers (its hooks run outside them), and the code between blocks
(preconditioning, embeddings, skip bookkeeping) stays eager.

    StageConfig(compile="default")                 # inductor
    StageConfig(compile="max-autotune-no-cudagraphs")
    StageConfig(compile="aot_eager")               # capture and AOT autograd without code generation (tests)

Randomness: inductor would otherwise generate its own random numbers; `fallback_random` makes the compiled blocks
call the same generator ops as eager, so dropout masks — and hence training — equal the eager run's
(engine/networks/dropout.py). The student's forward has no graph break (tests/test_compiled.py)."""
from __future__ import annotations

from torch import nn

MODES = ("default", "max-autotune-no-cudagraphs")
BACKENDS = ("aot_eager", "eager")
CHOICES = MODES + BACKENDS


def compile_regions(module: nn.Module, how: str) -> list[nn.Module]:
    """Compile every block of `module` in place (the module itself when it has none); returns what was compiled."""
    from engine.dist import fsdp_units
    if how not in CHOICES:
        raise ValueError(f"compile must be one of {CHOICES}, got {how!r}")
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True
    units = fsdp_units(module) or [module]
    # One block class (a U-Net's UNetBlock) gets a compiled version per instance whose structure or shapes differ
    # (optional skip / attention submodules are guarded on), for the student and each teacher, in every stage;
    # dynamo stops compiling a code object after `recompile_limit` (8) versions and runs the rest eagerly. Allow
    # what a whole run can need.
    import torch._dynamo.config as dynamo_config
    for name, floor in (("recompile_limit", 64 + 8 * len(units)), ("cache_size_limit", 64 + 8 * len(units)),
                        ("accumulated_recompile_limit", 1024), ("accumulated_cache_size_limit", 1024)):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), floor))
    for unit in units:
        if how in BACKENDS:
            unit.compile(backend=how, dynamic=False)
        else:
            unit.compile(mode=None if how == "default" else how, dynamic=False)
    return units
