"""The validation recipes (docs/validation.md) end to end in --smoke mode, over two seeds: the results.json
fields the documentation reads, paired intervals, plots, and resumed reruns."""
import importlib.util
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_gradient_bias_recipe_smoke(tmp_path):
    mod = load("gmm_gradient_bias")
    out = str(tmp_path / "run")
    res = mod.main(["--smoke", "--out", out, "--device", "cpu", "--seeds", "2"])
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["gradient_bias"]) == set(mod.SCHEMES) and len(saved["dt"]) == 2
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in saved["gradient_bias"].values())
    assert set(saved["stderr"]) == set(mod.SCHEMES) and saved["seeds"] == [0, 1]
    assert {p["verdict"] for ps in saved["paired"].values() for p in ps} <= {"tie", "a < b", "a > b"}
    assert all(saved["oracle_gradient_norm"][s]["mean"] > 0 for s in mod.SCHEMES)
    assert os.path.getsize(os.path.join(out, "gradient_bias.png")) > 0
    assert res["runs"]["s0/cmt"]["kimg"]["mid"] > 0 and res["runs"]["s1/cd"]["kimg"]["mid"] > 0


def test_mid_training_recipe_smoke(tmp_path):
    mod = load("gmm_mid_training")
    out = str(tmp_path / "run")
    res = mod.main(["--smoke", "--out", out, "--device", "cpu", "--seeds", "2"])
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["summary"]) == set(mod.ARMS) and set(saved["paired_vs_no_mid"]) == {"short_mid", "long_mid"}
    for arm in mod.ARMS:
        for k in mod.METRICS:
            assert len(saved["summary"][arm][k]["per_seed"]) == 2
            assert all(math.isfinite(v) and v >= 0 for v in saved["summary"][arm][k]["per_seed"])
    kimg = res["runs"]["s1/long_mid"]["kimg"]
    assert kimg["mid"] + kimg["post"] == res["runs"]["s1/no_mid"]["kimg"]["post"]      # equal total budgets
    assert "mid" not in res["runs"]["s0/no_mid"]["kimg"] or res["runs"]["s0/no_mid"]["kimg"]["mid"] == 0
    assert os.path.getsize(os.path.join(out, "mid_training.png")) > 0
    again = mod.main(["--smoke", "--out", out, "--device", "cpu", "--seeds", "2"])   # resumes every stage
    assert again["summary"] == res["summary"]


def test_cmt_ablations_recipe_smoke(tmp_path):
    """CMT, KD and Slow CMT from the same diffusion weights: the loop's counters give each mid-training's teacher
    cost (CMT one call per pair, KD 16, Slow CMT 16 − level ≈ 8.5 on average), and the same post-training follows."""
    mod = load("gmm_cmt_ablations")
    out = str(tmp_path / "run")
    res = mod.main(["--smoke", "--out", out, "--device", "cpu", "--seeds", "2"])
    s = json.load(open(os.path.join(out, "results.json")))["summary"]
    assert s["cmt"]["teacher_nfe_per_pair"]["per_seed"] == [1.0, 1.0]
    assert s["kd"]["teacher_nfe_per_pair"]["per_seed"] == [16.0, 16.0]
    assert all(7 <= v <= 10 for v in s["slow_cmt"]["teacher_nfe_per_pair"]["per_seed"])
    assert s["cmt"]["images_per_pair"]["mean"] == 1 / 16 and s["kd"]["images_per_pair"]["mean"] == 1.0
    assert set(res["paired_vs_cmt"]) == {"kd", "slow_cmt"}
    assert os.path.getsize(os.path.join(out, "cmt_ablations.png")) > 0


def test_digits_mid_training_recipe_smoke(tmp_path):
    """No / short / long mid-training on digits from one teacher: equal budgets, the floor and the teacher's FD
    recorded beside the arms, and a rerun resumes every stage."""
    mod = load("digits_mid_training")
    out = str(tmp_path / "run")
    res = mod.main(["--smoke", "--out", out, "--device", "cpu", "--seeds", "2"])
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["paired_vs_no_mid"]) == {"short_mid", "long_mid"} and saved["seeds"] == [0, 1]
    for arm in mod.ARMS:
        assert all(math.isfinite(v) and v >= 0 for k in mod.METRICS for v in saved["summary"][arm][k]["per_seed"])
        kimg = res["runs"][f"s1/{arm}"]["kimg"]
        assert kimg.get("mid", 0) + kimg["post"] == res["runs"]["s1/no_mid"]["kimg"]["post"]   # equal budgets
        assert kimg["pre"] == res["runs"]["s0/no_mid"]["kimg"]["pre"]                        # the one teacher
    assert saved["reference"]["floor"]["n"] == 359 and saved["reference"]["teacher_16step_fd"] > 0
    assert os.path.getsize(os.path.join(out, "mid_training.png")) > 0
    assert mod.main(["--smoke", "--out", out, "--device", "cpu", "--seeds", "2"])["summary"] == res["summary"]


def test_digits_mf_post_training_recipe_smoke(tmp_path):
    """The Mean Flow candidates: every arm over two seeds against mf and cmt_mf, the shared mid-trainings (the EMA
    and learning-rate arms start from cmt_mf's), and the teacher's own FD."""
    mod = load("digits_mf_post_training")
    out = str(tmp_path / "run")
    res = mod.main(["--smoke", "--out", out, "--device", "cpu", "--seeds", "2"])
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["summary"]) == set(mod.ARMS)
    assert set(saved["paired"]["mf"]) == set(mod.ARMS) - {"mf"} and set(saved["paired"]["cmt_mf"]) == set(mod.ARMS) - {"cmt_mf"}
    assert set(saved["teacher"]) == {"fd_1step", "fd_2step", "fd_8step"}
    assert set(saved["after_mid"]) == {"nonadjacent28", "long", "all36"}
    runs = res["runs"]
    for a in set(mod.ARMS) - {"mf_restarted"}:   # the same total budget, up to each stage's rounding to steps
        spent = runs[f"s0/{a}"]["kimg"].get("mid", 0) + runs[f"s0/{a}"]["kimg"]["post"]
        assert abs(spent - runs["s0/mf"]["kimg"]["post"]) <= 0.128 + 1e-9
    # one mid-training serves every seed's cmt_mf, continued_warmup, ema_continued and low_lr: trained once
    assert runs["s1/ema_continued"]["stages"]["mid"] == runs["s0/cmt_mf"]["stages"]["mid"]
    assert sorted(os.listdir(os.path.join(out, "mid"))) == ["mid_all36", "mid_long", "mid_nonadjacent28"]
    post = json.load(open(os.path.join(out, "s0", "continued_warmup", "post_continued_warmup", "config.json")))
    assert post["ema_continue_kimg"] == 0.224 and post["lr_rampup_kimg"] == 0.064   # the EMA goes on from the mid
    # the control restarts from the baseline's own EMA at mid_kimg, written by the baseline as a snapshot
    snaps = os.listdir(os.path.join(out, "s0", "mf", "mf", "snapshots"))
    assert len(snaps) == 2 and runs["s0/mf_restarted"]["kimg"]["post"] == runs["s0/cmt_mf"]["kimg"]["post"]
    assert os.path.getsize(os.path.join(out, "post_training.png")) > 0
