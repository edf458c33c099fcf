"""The one prepared GPU run: every CUDA test, then the GPU benchmarks at the paper's shapes, on one H100/H200 within a
deadline the script enforces itself, so that a rerun of what failed still fits a session's device time.

    python bench/gpu_check.py --out DIR                     # everything, within 360 s
    python bench/gpu_check.py --out DIR --only throughput,imagenet512
    python bench/gpu_check.py --out DIR --dry-run           # CPU, tiny sizes, the same sections and JSON (CI)

Each section is a subprocess with its own time limit (cut to what is left of the deadline), so one failure, hang or
out-of-memory costs one section. After each section DIR/gpu_check.json is rewritten (atomically) with every
section's command, exit code, seconds, the tail of its output and, for benchmarks, their JSON; DIR/<section>.md
holds each benchmark's tables as printed (what goes into bench/RESULTS.md). A section whose inputs are absent is
skipped with the reason printed. Sections, in order (the order is the priority when time runs short):

  install      pip install --no-deps --no-build-isolation -e . (the machine reaches no registry; builds the
               C++ extension against its torch) — skipped in --dry-run and when the engine already imports
  env          torch / CUDA / Triton versions, the device, whether the extension and Triton kernels load
  tests        pytest of the CUDA tests (-m gpu: the kernels compiled, the CUDA-graph teacher eager and compiled,
               a CMT stage in fp32 and bf16 against the CPU's, FSDP2 over NCCL in a one-GPU process group, the
               Mean Flow JVP paths; tests/devices.py)
  loop_bf16    the gmm recipe's --smoke on CUDA: the loop with bf16 autocast, the graph teacher, kernels
  headline_smoke  recipes/imagenet512_cmt_ecd.py --smoke on CUDA: float32 + TF32 stages, E-LatentLPIPS, VAE decoding
  coco_smoke   recipes/coco_t2i_cmt_mf.py --smoke on CUDA: the MM-DiT under bf16 autocast, REPA, the dual-stream JVP
  fast_teacher fused DPM-Solver++ update vs copy bandwidth, CUDA-graph teacher vs eager (bench/fast_teacher.py)
  throughput   CMT vs ECT / ECD / sCT / sCD at CIFAR-10 batch 128, eager and graph + kernels, CMT with LPIPS and
               squared L2 (bench/throughput.py)
  throughput_compiled  the CMT (L2, LPIPS) and ECT rows with every block compiled (--compile default)
  imagenet512  the headline's CMT / CT / CD-Euler / CD-Heun steps at EDM2-XXL, 16 pairs (bench/imagenet512.py)
  edm2         EDM2 presets and the ImageNet-64 XL steps (bench/edm2.py)
  jvp          Mean Flow JVP paths at DiT-XL/2 (bench/jvp.py): exact, dual-stream, central difference, bf16 tangent
  loader       the batch stream's images/s from a 64×64 PNG zip (bench/loader.py)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


def sections(out: str, dry: bool) -> list[tuple[str, list[str] | None, int, str | None]]:
    """(name, command or None, seconds, reason when skipped)."""
    smoke = ["--smoke"] if dry else []
    bench = lambda script, *extra: [PY, os.path.join(HERE, script), *(smoke or extra), "--out",  # noqa: E731
                                    os.path.join(out, "results")]
    recipe = lambda script, name: [PY, os.path.join(ROOT, "recipes", script), "--smoke", "--device", "cuda",  # noqa: E731
                                   "--out", os.path.join(out, name)]
    have_engine = subprocess.run([PY, "-c", "import engine"], cwd=ROOT, capture_output=True).returncode == 0
    install = [PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    tests = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"] + (
        ["--collect-only"] if dry else [])
    return [
        ("install", None if dry or have_engine else install, 150,
         "--dry-run" if dry else ("the engine imports already" if have_engine else None)),
        ("env", [PY, "-c", ENV_PROBE], 30, None),
        ("tests", tests, 150, None),
        ("loop_bf16", None if dry else recipe("gmm_cmt_ect.py", "loop_bf16"), 60, "needs a CUDA device" if dry else None),
        ("headline_smoke", None if dry else recipe("imagenet512_cmt_ecd.py", "headline_smoke"), 90,
         "needs a CUDA device" if dry else None),
        ("coco_smoke", None if dry else recipe("coco_t2i_cmt_mf.py", "coco_smoke"), 45,
         "needs a CUDA device" if dry else None),
        ("fast_teacher", bench("fast_teacher.py"), 60, None),
        ("throughput", bench("throughput.py"), 60, None),
        ("throughput_compiled", bench("throughput.py", "--compile", "default", "--methods",
                                      "cmt_graph,cmt_graph_lpips,ect", "--reps", "10", "--warmup", "3"), 120, None),
        ("imagenet512", bench("imagenet512.py", "--reps", "3", "--warmup", "1"), 75, None),
        ("edm2", bench("edm2.py", "--reps", "3", "--warmup", "1"), 60, None),
        ("jvp", bench("jvp.py"), 75, None),   # six variants at XL/2, each with a float64 reference JVP
        ("loader", bench("loader.py", "--images", "2048"), 30, None),
    ]


ENV_PROBE = r"""
import json, torch
info = dict(torch=torch.__version__, cuda=torch.version.cuda, available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
try:
    import triton
    info["triton"] = triton.__version__
except Exception as e:
    info["triton"] = f"absent ({type(e).__name__})"
from engine.kernels import jvp_attention
info["extension"] = "built" if jvp_attention.extension() is not None else "absent"
from engine import ops
info["kernels"] = ops.kernel_mode()
print(json.dumps(info))
"""


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run_section(name, cmd, limit, out) -> dict:
    t0 = time.time()
    before = set(glob.glob(os.path.join(out, "results", "*.json")))
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
        rc, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
               ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
    except Exception as e:   # noqa: BLE001 - a section that cannot even start is reported, the next one runs
        rc, text = f"error: {type(e).__name__}: {e}", ""
    rec = dict(section=name, command=cmd, rc=rc, seconds=round(time.time() - t0, 1), output_tail=text[-4000:])
    new = sorted(set(glob.glob(os.path.join(out, "results", "*.json"))) - before)
    if new:
        try:
            rec["results"] = json.load(open(new[-1]))
        except (OSError, ValueError):
            pass
    if name not in ("install", "tests", "env") and text:
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(text)
    if name == "env" and rc == 0:
        try:
            rec["env"] = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            pass
    return rec


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    p.add_argument("--deadline", type=float, default=360.0, help="seconds for the whole run (default 360)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script (CI)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(os.path.join(a.out, "results"), exist_ok=True)
    start = time.time()
    plan = sections(a.out, a.dry_run)
    names = [n for n, *_ in plan]
    only = None if a.only is None else [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        p.error(f"unknown section(s) {unknown}; sections: {', '.join(names)}")
    report = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), deadline_s=a.deadline, dry_run=a.dry_run,
                  sections=[])
    path = os.path.join(a.out, "gpu_check.json")
    for name, cmd, budget, reason in plan:
        if only is not None and name not in only:
            continue
        left = a.deadline - (time.time() - start)
        if cmd is None:
            rec = dict(section=name, skipped=reason)
        elif left < 5:
            rec = dict(section=name, skipped=f"deadline: {left:.0f} s left")
        else:
            print(f"[gpu_check] {name} (≤ {min(budget, left):.0f} s)", flush=True)
            rec = run_section(name, cmd, min(budget, left), a.out)
        print(f"[gpu_check] {name}: " + (f"skipped ({rec['skipped']})" if "skipped" in rec
                                          else f"rc {rec['rc']} in {rec['seconds']} s"), flush=True)
        report["sections"].append(rec)
        report["elapsed_s"] = round(time.time() - start, 1)
        _write_json(path, report)
    failed = [r["section"] for r in report["sections"] if "skipped" not in r and r["rc"] != 0]
    report["failed"] = failed
    _write_json(path, report)
    print(f"[gpu_check] done in {report.get('elapsed_s', 0)} s; failed: {failed or 'none'}; rerun with --only "
          f"{','.join(failed)}" if failed else f"[gpu_check] done in {report.get('elapsed_s', 0)} s; all passed",
          flush=True)
    return report


if __name__ == "__main__":
    main()
