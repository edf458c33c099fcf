"""The one prepared GPU run: a preflight, every CUDA test, then the GPU benchmarks at the paper's shapes, on one
H100/H200 within a deadline the script enforces itself (480 s: a 15-minute lease minus the machine's start leaves
room to rerun what failed).

    python bench/gpu_check.py --out DIR                     # everything, within 480 s
    python bench/gpu_check.py --out DIR --only throughput,imagenet512
    python bench/gpu_check.py --out DIR --dry-run           # CPU, tiny sizes, the same sections and JSON (CI);
                                                            # writes DIR/plan.json, fails if the budgets overrun

Each section is a subprocess in a process group of its own with its own time limit (cut to what is left of the
deadline); on timeout the whole group is killed, so torchrun and DataLoader grandchildren do not keep the GPU
busy, and one failure, hang or out-of-memory costs one section. The CUDA tests run one file per section with
`-rf --tb=line --junitxml`, so every failure's name comes back. After each section DIR/gpu_check.json is rewritten
(atomically) with every section's command, exit code, seconds, the tail of its output and, for benchmarks, their
JSON; DIR/<section>.md holds each benchmark's tables as printed (what goes into bench/RESULTS.md). A section whose
inputs are absent is skipped with the reason printed. Sections, in order (the order is the priority when time runs
short); `optional` ones run only when named in --only:

  install      pip install --no-deps --no-build-isolation -e . (the machine reaches no registry; builds the
               C++ extension against its torch) — skipped in --dry-run and when the engine already imports
  env          torch / CUDA / Triton versions, the device, whether the extension and Triton kernels load
  preflight    bench/preflight.py: the device's shared memory against what the kernels were built for, every
               Triton specialisation launched once against its reference, one teacher graph per network family
               (EDM U-Net, EDM2 MP-UNet, DiT), three CMT steps under torch.cuda.set_sync_debug_mode("error")
  tests:<file> pytest -m gpu of one test file (the kernels compiled, the CUDA-graph teacher eager and compiled,
               a CMT stage in fp32 and bf16 against the CPU's, FSDP2 over NCCL in a one-GPU process group, the
               Mean Flow JVP paths; tests/devices.py), with its JUnit XML in DIR
  loop_bf16    the gmm recipe's --smoke on CUDA: the loop with bf16 autocast, the graph teacher, kernels
  headline_smoke  recipes/imagenet512_cmt_ecd.py --smoke on CUDA: float32 + TF32 stages, E-LatentLPIPS, VAE decoding
  coco_smoke   recipes/coco_t2i_cmt_mf.py --smoke on CUDA: the MM-DiT under bf16 autocast, REPA, the dual-stream JVP
  fast_teacher fused DPM-Solver++ update vs copy bandwidth, CUDA-graph teacher vs eager (bench/fast_teacher.py)
  throughput   CMT vs ECT / ECD / sCT / sCD at CIFAR-10 batch 128, eager and graph + kernels, CMT with LPIPS and
               squared L2 (bench/throughput.py)
  throughput_compiled  (optional) the CMT (L2, LPIPS) and ECT rows with every block compiled (--compile default)
  imagenet512  the headline's CMT / CT / CD-Euler / CD-Heun steps at EDM2-XXL, 16 pairs (bench/imagenet512.py)
  edm2         (optional) EDM2 presets and the ImageNet-64 XL steps (bench/edm2.py)
  jvp          Mean Flow JVP paths at DiT-XL/2 (bench/jvp.py): exact, dual-stream, central difference, bf16 tangent
  loader       the batch stream's images/s from a 64×64 PNG zip (bench/loader.py)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable


DEADLINE_S = 480.0


def gpu_test_files() -> list[str]:
    """The test files with CUDA cases (the `gpu` mark, or the DEVICES parameter of tests/devices.py)."""
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        text = open(path, encoding="utf-8").read()
        if "mark.gpu" in text or "DEVICES" in text or "CUDA.marks" in text:
            files.append(os.path.basename(path))
    return files


def sections(out: str, dry: bool) -> list[dict]:
    """Each section: name, command (None: skipped, with `reason`), budget in seconds, and whether it is optional
    (run only when named in --only; not counted against the deadline)."""
    smoke = ["--smoke"] if dry else []
    bench = lambda script, *extra: [PY, os.path.join(HERE, script), *(smoke or extra), "--out",  # noqa: E731
                                    os.path.join(out, "results")]
    recipe = lambda script, name: [PY, os.path.join(ROOT, "recipes", script), "--smoke", "--device", "cuda",  # noqa: E731
                                   "--out", os.path.join(out, name)]
    on_gpu = lambda cmd: dict(cmd=None, reason="needs a CUDA device") if dry else dict(cmd=cmd)  # noqa: E731
    have_engine = subprocess.run([PY, "-c", "import engine"], cwd=ROOT, capture_output=True).returncode == 0
    install = [PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    files = gpu_test_files()
    plan = [
        dict(name="install", cmd=None if dry or have_engine else install, budget=90,
             reason="--dry-run" if dry else ("the engine imports already" if have_engine else None)),
        dict(name="env", cmd=[PY, "-c", ENV_PROBE], budget=15),
        dict(name="preflight", cmd=[PY, os.path.join(HERE, "preflight.py"), *(["--dry-run"] if dry else []),
                                    "--json", os.path.join(out, "preflight.json")], budget=60),
    ]
    for f in files:   # 120 s for the CUDA tests in all, shared by file
        # `-o addopts=…` replaces pytest.ini's, whose `-n 2` needs pytest-xdist: the GPU machine has no such plugin
        # (and no registry to install it from), and one process owns the one GPU anyway
        cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=--strict-markers", "-m", "gpu",
               "-rf", "--tb=line",
               "--junitxml", os.path.join(out, f"junit-{f[:-3]}.xml"), os.path.join("tests", f)]
        plan.append(dict(name=f"tests:{f}", cmd=cmd + (["--collect-only"] if dry else []),
                         budget=max(10, 120 // max(1, len(files)))))
    plan += [
        dict(name="loop_bf16", budget=25, **on_gpu(recipe("gmm_cmt_ect.py", "loop_bf16"))),
        dict(name="headline_smoke", budget=35, **on_gpu(recipe("imagenet512_cmt_ecd.py", "headline_smoke"))),
        dict(name="coco_smoke", budget=25, **on_gpu(recipe("coco_t2i_cmt_mf.py", "coco_smoke"))),
        dict(name="fast_teacher", cmd=bench("fast_teacher.py"), budget=20),
        dict(name="throughput", cmd=bench("throughput.py"), budget=25),
        dict(name="jvp", cmd=bench("jvp.py"), budget=25),   # six variants at XL/2, each with a float64 reference
        dict(name="imagenet512", cmd=bench("imagenet512.py", "--reps", "3", "--warmup", "1"), budget=20),
        dict(name="loader", cmd=bench("loader.py", "--images", "2048"), budget=10),
        dict(name="throughput_compiled", optional=True, budget=120,
             cmd=bench("throughput.py", "--compile", "default", "--methods", "cmt_graph,cmt_graph_lpips,ect",
                       "--reps", "10", "--warmup", "3")),
        dict(name="edm2", optional=True, cmd=bench("edm2.py", "--reps", "3", "--warmup", "1"), budget=60),
    ]
    for s in plan:
        s.setdefault("reason", None)
        s.setdefault("optional", False)
    return plan


def budget_total(plan: list[dict]) -> int:
    return sum(s["budget"] for s in plan if not s["optional"])


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
    """Run one section in its own process group; on timeout kill the whole group (torchrun's workers, DataLoader
    processes) so that nothing keeps the GPU busy for the next section."""
    t0 = time.time()
    before = set(glob.glob(os.path.join(out, "results", "*.json")))
    text = ""
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        try:
            text, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            text, _ = proc.communicate()
            rc = "timeout"
    except Exception as e:   # noqa: BLE001 - a section that cannot even start is reported, the next one runs
        rc, text = f"error: {type(e).__name__}: {e}", text or ""
    text = text or ""
    rec = dict(section=name, command=cmd, rc=rc, seconds=round(time.time() - t0, 1), output_tail=text[-4000:])
    new = sorted(set(glob.glob(os.path.join(out, "results", "*.json"))) - before)
    if new:
        try:
            rec["results"] = json.load(open(new[-1]))
        except (OSError, ValueError):
            pass
    if name not in ("install", "env", "preflight") and not name.startswith("tests:") and text:
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
    p.add_argument("--only", default=None, help="comma-separated sections to run (default: all but the optional; "
                                                "'tests' names every tests:<file> section)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help=f"seconds for the whole run (default "
                                                                       f"{DEADLINE_S:.0f})")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script and its plan (CI)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(os.path.join(a.out, "results"), exist_ok=True)
    start = time.time()
    plan = sections(a.out, a.dry_run)
    names = [s["name"] for s in plan]
    only = None if a.only is None else [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = sorted(set(only or ()) - set(names) - {"tests"})
    if unknown:
        p.error(f"unknown section(s) {unknown}; sections: {', '.join(names)}")
    selected = lambda s: (not s["optional"]) if only is None else (  # noqa: E731
        s["name"] in only or ("tests" in only and s["name"].startswith("tests:")))
    total = budget_total(plan)
    _write_json(os.path.join(a.out, "plan.json"), dict(deadline_s=a.deadline, budget_s=total, sections=[
        dict(name=s["name"], budget_s=s["budget"], optional=s["optional"]) for s in plan]))
    if a.dry_run and total > a.deadline:
        raise SystemExit(f"gpu_check: the sections' budgets add up to {total} s, over the {a.deadline:.0f} s "
                         f"deadline (DIR/plan.json)")
    report = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), deadline_s=a.deadline, budget_s=total,
                  dry_run=a.dry_run, sections=[])
    path = os.path.join(a.out, "gpu_check.json")
    for s in plan:
        name, cmd, budget, reason = s["name"], s["cmd"], s["budget"], s["reason"]
        if not selected(s):
            continue
        left = a.deadline - (time.time() - start)
        if cmd is None:
            rec = dict(section=name, skipped=reason)
        elif left < 5:
            rec = dict(section=name, skipped=f"deadline: {left:.0f} s left")
        else:
            # a dry run's sections run on a CPU, at tiny sizes but far slower than on the GPU the budgets are for
            limit = min(budget * (10 if a.dry_run else 1), left)
            print(f"[gpu_check] {name} (≤ {limit:.0f} s)", flush=True)
            rec = run_section(name, cmd, limit, a.out)
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
