"""Ahead-of-time builds of every Triton specialisation the engine launches, for a real GPU target, without a GPU.

A first launch on a device fails with `OutOfResources` when a kernel needs more shared memory per block than the
chip has (232,448 B on sm_90, 166,912 B on sm_80), and a kernel that spills or misses the tensor cores is slow.
Triton's compiler, with the ptxas shipped in its wheel, shows all of that on any machine: this module compiles the
exact specialisations the launchers would send (each kernel module's `specialisations()`, derived from the same
`launch_config` its launcher uses, so a new configuration cannot slip past) and reports, per target:

  shared      bytes of shared memory per block (`metadata.shared`), against the target's limit
  tensor      whether the PTX uses the tensor cores (`wgmma`, or `mma.sync` as on sm_80 and for fp64) where the
              path means to
  registers / stack    from `cuobjdump --dump-resource-usage` of the cubin (a large STACK: registers spilled)

tests/test_kernels_aot.py compiles a representative subset in CI; `python bench/kernels_aot.py` compiles the full
matrix and prints the table that bench/RESULTS.md records.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.kernels import runtime  # noqa: E402
from engine.kernels.runtime import SHARED_LIMIT, Specialisation  # noqa: E402


def shipped_head_dims() -> list[int]:
    """Head dims of the shipped attention networks (engine/networks/dit.py, mmdit.py CONFIGS): hidden / heads."""
    from engine.networks import dit, mmdit
    dims = {cfg[1] // cfg[2] for cfg in dit.CONFIGS.values()} | {cfg[1] // cfg[2] for cfg in mmdit.CONFIGS.values()}
    return sorted(dims)


def specialisations() -> list[Specialisation]:
    """Every specialisation of every kernel, from the kernel modules' own launch configurations."""
    runtime.require()
    from engine.kernels import dpm_solver, jvp_attention, precond
    return [*dpm_solver.specialisations(), *precond.specialisations(),
            *jvp_attention.specialisations(shipped_head_dims())]


def _resources(cubin: bytes) -> dict:
    """Registers, stack and local bytes per thread from the cubin, read by the cuobjdump in Triton's wheel (ptxas
    spills registers to the stack frame: a large STACK is spilling)."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60)
    m = re.search(r"REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", out.stdout)
    return dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)), local_bytes=int(m.group(3))) if m else {}


def compile_for(spec: Specialisation, capability: int) -> dict:
    """Compile `spec` for sm_<capability> and report shared memory, tensor-core use, registers and spills."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    src = ASTSource(spec.fn, spec.signature, spec.constexprs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=dict(spec.options))
    seconds = time.perf_counter() - start
    ptx = compiled.asm.get("ptx", "")
    shared = int(compiled.metadata.shared)
    return dict(kernel=spec.kernel, label=spec.label, capability=capability, shared=shared,
                shared_limit=SHARED_LIMIT[capability], fits=shared <= SHARED_LIMIT[capability],
                tensor_cores=bool(re.search(r"\bwgmma\.|\bmma\.sync\.", ptx)),
                wants_tensor_cores=spec.tensor_cores, seconds=round(seconds, 1), **_resources(compiled.asm["cubin"]),
                options=dict(spec.options))


def table(rows: list[dict]) -> str:
    lines = ["| kernel | specialisation | sm | shared B / limit | fits | tensor cores (wanted) | registers | "
             "stack B | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tc = ("yes" if r["tensor_cores"] else "no") + (" (yes)" if r["wants_tensor_cores"] else " (no)")
        lines.append(f"| {r['kernel']} | {r['label']} | {r['capability']} | {r['shared']:,} / "
                     f"{r['shared_limit']:,} | {'yes' if r['fits'] else '**no**'} | {tc} | "
                     f"{r.get('registers', '–')} | {r.get('stack_bytes', '–')} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sm", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT),
                    help="compute capabilities to build for (default 90 80)")
    ap.add_argument("--only", default=None, help="only specialisations whose 'kernel label' contains this text")
    a = ap.parse_args(argv)
    rows = []
    for spec in specialisations():
        if a.only and a.only not in spec.key():
            continue
        for sm in a.sm:
            rows.append(compile_for(spec, sm))
            r = rows[-1]
            print(f"{spec.key():50s} sm_{sm}: shared {r['shared']:>7,} B, fits {r['fits']}, tensor cores "
                  f"{r['tensor_cores']}, regs {r.get('registers')}, local {r.get('local_bytes')} B, "
                  f"stack {r.get('stack_bytes')} B, {r['seconds']} s", flush=True)
    print()
    print(table(rows))
    if not all(r["fits"] for r in rows):
        raise SystemExit("some specialisations do not fit their target's shared memory")


if __name__ == "__main__":
    main()
