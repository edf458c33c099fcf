"""The benchmark scripts run (on CPU, --smoke: tiny sizes, timings meaningless) and report every quantity their
tables need, so that a GPU session spends its time measuring, not debugging."""
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def test_kernels_bench_smoke(tmp_path, capsys):
    """The benchmark reports accuracy beside speed: the fused update (Triton's interpreter here) no worse than
    about twice PyTorch's own rounding against float64 (STYLE.md's standard for kernels), the upstream
    difference form within rounding of the expanded one, and the teacher's paths giving the same trajectory."""
    res = load("fast_teacher").main(["--smoke", "--out", str(tmp_path)])
    assert {r["dtype"] for r in res["update"]} == {"float32", "bfloat16"}
    for r in res["update"]:
        assert r["fused_us"] > 0 and r["copy_GBs"] > 0 and r["speedup_vs_eager"] > 0
        ulp = 2.0 ** -8 if r["dtype"] == "bfloat16" else 2.0 ** -24
        assert r["fused_rel_err"] <= max(2 * r["eager_rel_err"], ulp), r
        assert r["upstream_rel_err"] <= 4 * max(r["eager_rel_err"], ulp), r
    t = res["teacher"]
    assert t["graph_replays"] == 0  # CPU: the eager fallback (a GPU run replays)
    assert t["kernels_vs_reference_max_abs"] == 0 and t["graph_vs_reference_max_abs"] == 0  # CPU: one path
    assert all(t[k] > 0 for k in ("eager_reference_ms", "eager_kernels_ms", "graph_ms", "cache_read_ms"))
    it = res["iterations"]
    for arm in ("cmt_eager_teacher", "cmt_graph_teacher", "cmt_cached"):
        assert it[f"{arm}/l2/over_ect"] > 0
    printed = capsys.readouterr().out
    assert "Fused DPM-Solver++ update" in printed and "| l2 |" in printed
    files = os.listdir(tmp_path)
    assert len(files) == 1 and json.load(open(tmp_path / files[0]))["command"] == "python bench/fast_teacher.py --smoke"


def test_nfe_profile_measured_counts_equal_the_closed_form(capsys):
    records = load("nfe_profile").main(["--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == records
    keys = {"method", "config", "teacher_nfe_per_pair", "student_forward_per_pair", "student_backward_per_pair",
            "closed_form_teacher_nfe_per_pair"}
    assert all(keys <= set(r) for r in records)
    assert {r["method"] for r in records} == {"cmt", "slow_cmt", "kd", "cd_euler", "cd_heun", "ct", "sct", "scd",
                                              "cmt_cache", "mf"}
    cmt = [r["config"] for r in records if r["method"] == "cmt"]
    assert cmt == [f"N={n}, order={k}, c=1" for n in (8, 16, 32) for k in (1, 2, 3)]
    for r in records:
        assert r["teacher_nfe_per_pair"] == r["closed_form_teacher_nfe_per_pair"], r
        assert r["student_backward_per_pair"] == 1
        # one student pass per pair for the regression methods, two (with / without gradient) for the rest;
        # Mean Flow: one forward plus the JVP on its 25% of r ≠ t rows
        two = r["method"] in ("cd_euler", "cd_heun", "ct", "sct", "scd")
        expected = 1.25 if r["method"] == "mf" else 2 if two else 1
        assert r["student_forward_per_pair"] == expected, r


def test_closed_form_accounting():
    nfe = load("nfe_profile")
    assert nfe.closed_form_cmt(16, 3) == 1.0
    # a 3-step multistep solver bootstrapped by a 2-call single-step method: 16 pairs for 18 teacher calls
    assert nfe.closed_form_cmt(16, 3, c=2) == 18 / 16


def test_throughput_bench_smoke(tmp_path):
    # --peak-tflops makes the CPU run take the MFU path (FLOPs counted over one step, JVPs included)
    res = load("throughput").main(["--smoke", "--peak-tflops", "1", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"cmt", "cmt_graph", "cmt_cache", "ect", "ecd_euler", "ecd_heun", "sct", "scd", "sct_fd",
                         "scd_fd"}
    assert rows["cmt"]["relative_to_cmt"] == 1.0
    assert rows["cmt"]["teacher_nfe_per_pair"] == 1 and rows["cmt_cache"]["teacher_nfe_per_pair"] == 0
    assert rows["ecd_heun"]["teacher_nfe_per_pair"] == 2
    assert all(r["ms"] > 0 and r["pairs_per_s"] > 0 and r["mfu"] > 0 for r in rows.values())
    assert rows["sct"]["tflops"] > rows["ect"]["tflops"]  # the JVP's FLOPs are counted
    assert rows["sct_fd"]["tflops"] > rows["ect"]["tflops"]  # two forwards for the tangent
    assert rows["cmt"]["images_per_s"] * 16 == pytest.approx(rows["cmt"]["pairs_per_s"])
    exts = sorted(os.path.splitext(f)[1] for f in os.listdir(tmp_path))
    assert exts == [".json", ".md", ".png"]


def test_throughput_compiled_rows_smoke(tmp_path):
    """The compiled rows gpu_check asks for (every block of student and teacher, engine/training/compiled.py; aot_eager
    here), a chosen subset normalised to its first row, and an unknown row named."""
    mod = load("throughput")
    res = mod.main(["--smoke", "--methods", "cmt_graph,ect", "--compile", "aot_eager", "--out", str(tmp_path)])
    assert [r["method"] for r in res["rows"]] == ["cmt_graph", "ect"] and res["baseline"] == "cmt_graph"
    assert res["rows"][0]["relative_to_cmt"] == 1.0 and all("(compiled, aot_eager)" in r["label"] for r in res["rows"])
    assert any(f.startswith("throughput-compiled-") for f in os.listdir(tmp_path))
    with pytest.raises(SystemExit, match="cmt_graph_lpips"):
        mod.main(["--smoke", "--methods", "cmt_graph_lpips", "--out", str(tmp_path)])


def test_jvp_bench_smoke(tmp_path):
    res = load("jvp").main(["--smoke", "--out", str(tmp_path)])
    assert [r["variant"] for r in res["rows"]] == ["mf_dual", "mf_forward_ad", "mf_math_attention", "mf_fd",
                                                   "flow_matching"]   # mf_dual_autocast: CUDA only
    assert all(r["ms"] > 0 and r["peak_gib"] > 0 for r in res["rows"])
    assert all(r["jvp_ms"] > 0 for r in res["rows"][:4]) and res["rows"][4]["jvp_ms"] is None
    # the exact paths at float32 rounding of the float64 JVP, the central difference at its truncation + rounding
    assert all(r["jvp_rel_err"] < 1e-5 for r in res["rows"][:3]) and 1e-6 < res["rows"][3]["jvp_rel_err"] < 1e-2
    # the ratio is reported, not judged: a timing claim belongs in bench/RESULTS.md, and under a loaded CPU this
    # smoke-sized ratio fell to 0.03–0.05 (a Mean Flow step does more work; the JVP row above shows it)
    assert 0 < res["mf_over_fm"] < float("inf")


def test_throughput_bench_dit_family(tmp_path):
    """--family dit: CMT-MF (teacher trajectories shared by 28 pairs each), Mean Flow and flow matching."""
    res = load("throughput").main(["--family", "dit", "--smoke", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["cmt_mf", "mf", "fm"] and rows["cmt_mf"]["relative_to_cmt"] == 1.0
    assert rows["cmt_mf"]["teacher_nfe_per_pair"] == pytest.approx(8 / 28)
    assert rows["mf"]["teacher_nfe_per_pair"] == 0 and res["batch"] == 56
    assert rows["cmt_mf"]["images_per_s"] * 28 == pytest.approx(rows["cmt_mf"]["pairs_per_s"])


def test_memory_plan_is_computed_and_docs_are_current():
    """docs/scaling.md's memory plan is bench/memory_plan.py's output: the DiT inputs are the engine's own
    networks (trained parameters as docs/spec/mf.md §3), the per-GPU sums add up, CMT's trajectory limit is where the
    trajectories stop dividing, and the committed tables equal a fresh computation."""
    mp = load("memory_plan")
    p = mp.plan()
    assert p["b4"]["params"] == 131_165_248 and p["xl2"]["params"] == 676_440_592
    assert p["xl2"]["act_bf16"] < p["xl2"]["act_fp32"] and p["xl2"]["act_fp32"] > 0
    # the engine's EDM2 (no uncertainty head) against the spec's size table and the topology's largest block
    assert abs(p["xxl"]["params"] - 1523.2e6) < 0.05e6 and abs(p["m"]["params"] - 497.8e6) < 0.05e6
    assert abs(p["xxl"]["unit"] - mp.edm2_largest_block_params(448)) <= 1             # + its 0-d gain
    assert abs(p["m"]["unit"] - mp.edm2_largest_block_params(256)) <= 1
    assert 0.5 < p["xxl"]["act_fp32"] / 2**30 < 2 and 40 < p["lpips"] / 2**20 < 100   # spec §9.3: 0.98 GiB, ≈ 1 GB/16
    rows = {(r["run"], r["world"]): r for r in p["rows"]}
    cmt = "ImageNet-512 CMT mid-training (XXL), teacher replicated"
    assert rows[(cmt, 8)]["feasible"] and not rows[(cmt, 64)]["feasible"] and rows[(cmt, 64)]["min_global"] == 1024
    assert not rows[("MF-XL/2 CMT mid-training (B/4 teacher)", 8)]["feasible"]
    for r in p["rows"]:
        assert abs(r["total"] - (r["state"] + r["gathered"] + r["teacher"] + r["activations"])) < 1e-9
    fresh = mp.markdown(p).split("## Inputs", 1)[1]
    committed = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "scaling.md")).read()
    assert committed.split("## Inputs", 1)[1] == fresh, "docs/scaling.md is stale: rerun bench/memory_plan.py --write"


def test_edm2_bench_smoke(tmp_path):
    """bench/edm2.py: every preset's per-sample MACs equal the spec's table (counted on the reference), the
    backward costs about twice the forward, and the recipe's three steps run with their teacher accounting."""
    res = load("edm2").main(["--smoke", "--peak-tflops", "1", "--out", str(tmp_path)])
    presets = {r["preset"]: r for r in res["presets"]}
    assert len(presets) == 12
    for r in presets.values():
        if r["spec_gmac"] is not None:
            assert r["fwd_gmac"] == pytest.approx(r["spec_gmac"], abs=0.06), r
        assert r["fwd_bwd_gflop"] == pytest.approx(3 * r["fwd_gflop"], rel=0.01)
        assert r["fwd_gflop"] == pytest.approx(2 * r["fwd_gmac"])
    assert presets["edm2-img512-xxl"]["attention_gmac"] == pytest.approx(1.4, abs=0.05)      # spec §9.1
    steps = {r["method"]: r for r in res["steps"]}
    assert [steps[m]["teacher_nfe_per_pair"] for m in ("cmt", "ect", "ecd_heun_guided")] == [1, 0, 4]
    assert steps["cmt"]["relative"] == 1.0 and all(r["seconds"] > 0 and r["mfu"] > 0 for r in steps.values())
    assert "EDM2's \"Gflops\"" in open(next(tmp_path.glob("*.md"))).read()


def test_imagenet512_bench_smoke(tmp_path):
    """bench/imagenet512.py: the headline's four steps with their teacher accounting (CMT one unguided call per pair,
    CD two guided calls per Euler step and four per Heun step), the paper's relative costs beside the measured ones,
    and counted FLOPs that grow with what each step evaluates."""
    res = load("imagenet512").main(["--smoke", "--out", str(tmp_path)])
    rows = {r["method"]: r for r in res["steps"]}
    assert list(rows) == ["cmt", "ct", "cd_euler", "cd_heun"]
    assert [rows[m]["teacher_nfe_per_pair"] for m in rows] == [1, 0, 2, 4]
    assert [rows[m]["paper_relative"] for m in rows] == [1.0, 0.68, 0.83, 0.98]
    assert rows["cmt"]["relative"] == 1.0 and all(r["seconds"] > 0 for r in rows.values())
    assert rows["ct"]["tflop_per_iter"] < rows["cd_euler"]["tflop_per_iter"] < rows["cd_heun"]["tflop_per_iter"]
    # Heun adds one guided evaluation pair per sample over Euler: main + guide forwards of the same tiny net
    euler, heun, ct = (rows[m]["tflop_per_iter"] for m in ("cd_euler", "cd_heun", "ct"))
    assert heun - euler == pytest.approx(euler - ct, rel=0.02)


def test_loader_bench_smoke(tmp_path):
    """bench/loader.py: the batch stream's images/s from a PNG zip, in process and with a worker."""
    res = load("loader").main(["--smoke", "--out", str(tmp_path)])
    assert [r["workers"] for r in res["rows"]] == [0, 1] and all(r["images_per_s"] > 0 for r in res["rows"])


def test_frechet_bench_smoke():
    """bench/frechet.py --smoke: the engine's Fréchet distance and the D × D eigendecomposition formula agree on
    few samples (rank below D) and on more samples than dimensions."""
    rows = load("frechet").main(["--smoke"])
    assert [r["samples"] for r in rows] == [8, 200] and all(r["relative_difference"] < 1e-10 for r in rows)


def test_micro_benchmarks_run_as_tests():
    """bench/test_micro.py (pytest-benchmark): every micro-benchmark once, its result checked against the reference."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n0",
                           "bench/test_micro.py", "--benchmark-disable"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "8 passed" in done.stdout


def test_gpu_check_dry_run_writes_every_section(tmp_path):
    """bench/gpu_check.py --dry-run: the prepared GPU run's sections on CPU at tiny sizes, one JSON record each, the
    preflight first, the CUDA tests one file per section with JUnit XML, a plan whose budgets fit the 480 s deadline,
    a deadline that skips what no longer fits, and --only for a rerun."""
    mod = load("gpu_check")
    files = mod.gpu_test_files()
    assert {"test_kernels.py", "test_teacher.py", "test_edm2.py", "test_dit.py", "test_meanflow.py"} <= set(files)
    res = mod.main(["--out", str(tmp_path), "--dry-run", "--only",
                    "install,env,preflight,tests:test_kernels.py,tests:test_teacher.py,loader"])
    recs = {r["section"]: r for r in res["sections"]}
    files = ["test_kernels.py", "test_teacher.py"]
    assert list(recs) == ["install", "env", "preflight", *[f"tests:{f}" for f in files], "loader"]
    assert "skipped" in recs["install"] and res["failed"] == []
    assert recs["env"]["env"]["torch"] == torch.__version__ and recs["preflight"]["rc"] == 0
    assert all(recs[f"tests:{f}"]["rc"] == 0 for f in files)
    assert "--junitxml" in recs["tests:test_kernels.py"]["command"]
    assert "addopts=--strict-markers" in recs["tests:test_kernels.py"]["command"]   # no -n: no xdist there
    assert json.load(open(tmp_path / "preflight.json"))["failed"] == []
    # a bench section's record carries the JSON the bench wrote (its smoke run itself: test_loader_bench_smoke)
    assert [r["workers"] for r in recs["loader"]["results"]["rows"]] == [0, 1]
    saved = json.load(open(tmp_path / "gpu_check.json"))
    assert [r["section"] for r in saved["sections"]] == list(recs)
    plan = json.load(open(tmp_path / "plan.json"))
    assert plan["deadline_s"] == 480 and plan["budget_s"] <= 480
    assert plan["budget_s"] == sum(s["budget_s"] for s in plan["sections"] if not s["optional"])
    assert [s["name"] for s in plan["sections"]][:3] == ["install", "env", "preflight"]
    late = mod.main(["--out", str(tmp_path / "late"), "--only", "env,loader", "--deadline", "3"])
    assert all("deadline" in r["skipped"] for r in late["sections"])
    with pytest.raises(SystemExit, match="over the 100 s deadline"):
        mod.main(["--out", str(tmp_path / "short"), "--dry-run", "--deadline", "100"])
    with pytest.raises(SystemExit):
        mod.main(["--out", str(tmp_path), "--only", "nope"])


def test_gpu_check_kills_a_timed_out_section_with_its_children(tmp_path):
    """A section that runs past its limit is killed with its whole process group: a grandchild it started (as
    torchrun starts its workers) does not outlive it."""
    mod = load("gpu_check")
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    rec = mod.run_section("hang", [sys.executable, "-c", code], 3, str(tmp_path))
    assert rec["rc"] == "timeout"
    child = int(pid_file.read_text())
    import time
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the section's child {child} is still running")


def test_vs_reference_names_what_it_needs(tmp_path):
    """bench/vs_reference.py times the authors' code, which is never committed: without a copy it says so, and
    sizes whose pairs are not whole trajectories are refused."""
    mod = load("vs_reference")
    with pytest.raises(SystemExit, match="not a copy of sony/cmt"):
        mod.main(["--ref", str(tmp_path)])
    with pytest.raises(SystemExit):
        mod.main(["--ref", str(tmp_path), "--sizes", "16:10"])


FAKE_REFERENCE = {
    "training/__init__.py": "",
    # stand-ins with the reference's interface; their networks are the engine's, so weights load both ways
    "training/networks.py": '''
from engine.networks.configs import build_network
from engine import precond
def _net(cls, img_resolution, img_channels, model_channels, dropout, **kw):
    return cls(build_network("cifar10-ddpmpp", img_resolution=img_resolution, model_channels=model_channels,
                             dropout=dropout), sigma_data=0.5)
def ECMPrecond(**kw):
    return _net(precond.CMPrecond, **kw)
def EDMPrecond(**kw):
    return _net(precond.EDMPrecond, **kw)
''',
    "training/dpm_solver.py": '''
import torch
class NoiseScheduleEDM:
    pass
class DPM_Solver:
    def __init__(self, ns, algorithm_type):
        pass
    def get_time_steps(self, skip_type, t_T, t_0, N, device):
        return torch.linspace(1, 0, N + 1, device=device)
''',
    "training/loss.py": '''
import torch
class DPMSolverLoss:
    def __init__(self, NFE, loss_metric):
        from training import dpm_solver
        self.grid = dpm_solver.DPM_Solver(None, "dpmsolver++").get_time_steps("logSNR", 80.0, 0.002, NFE, "cuda")
        self.nfe = NFE
    def __call__(self, net, net_ref, images, labels=None, augment_pipe=None):
        sigma = torch.full([images.shape[0], 1, 1, 1], 1.0)
        with torch.no_grad():
            target = net_ref(images, sigma)
        return ((net(images, sigma) - target) ** 2).flatten(1).sum(1)
class ECMLoss:
    def __init__(self, q, c):
        pass
    def __call__(self, net, images, labels=None, augment_pipe=None):
        state = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(state)
        sigma = torch.full([images.shape[0], 1, 1, 1], 1.0)
        return (net(images, sigma) ** 2).flatten(1).sum(1)
''',
}


def test_vs_reference_runs_its_comparison(tmp_path, capsys):
    """The side-by-side run end to end against a stand-in for the authors' code: the reference in a worker process
    of its own (glibc's allocator) and in this one, interleaved with ours; the records the issue asks for."""
    for rel, text in FAKE_REFERENCE.items():
        (tmp_path / "ref" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "ref" / rel).write_text(text)
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import vs_reference
    records = vs_reference.main(["--ref", str(tmp_path / "ref"), "--sizes", "8:16", "--channels", "8", "--rounds",
                                 "2", "--warmup", "1", "--no-compiled", "--json", "--out", str(tmp_path / "out")])
    assert [r["method"] for r in records] == ["cmt", "ect"]
    for r in records:
        assert (r["resolution"], r["pairs"], r["ours_compiled_ms"], r["compile_s"]) == (8, 16, None, None)
        assert r["reference_ms"] > 0 and r["reference_retain_ms"] > 0 and r["ours_eager_ms"] > 0
        assert set(r["spread"]) == {"reference", "reference_retain", "ours_eager"}
        shares = r["ours_eager_op_shares"]     # the profiled floor: convolutions dominate even this tiny step
        assert set(shares) == {"convolution", "attention matmuls"} and 0.05 < shares["convolution"] < 1
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"method", "resolution", "pairs", "reference_ms", "ours_eager_ms", "ours_compiled_ms",
            "compile_s"} <= set(printed[0])
