"""Every recipe runs end to end in --smoke mode (tiny networks, synthetic or embedded data) and writes
results.json in the documented form; the paper recipes name the files they need when they are missing."""
import importlib.util
import json
import os
import sys

import pytest
import torch

RECIPES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(RECIPES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def check_results(out, arms):
    res = json.load(open(os.path.join(out, "results.json")))
    assert set(arms) <= set(res["runs"])
    for arm in arms:
        r = res["runs"][arm]
        assert {"one_step", "two_step", "kimg", "wall_s"} <= set(r)
        assert set(r["kimg"]) <= {"pre", "mid", "post"} and r["wall_s"] >= 0
    return res


@pytest.mark.parametrize("name", ["gmm_cmt_ect", "digits_cmt_ect", "digits_cmt_mf"])
def test_embedded_recipes_smoke(tmp_path, name):
    out = str(tmp_path / name)
    res = load(name).main(["--smoke", "--out", out, "--device", "cpu"])
    cmt, base = ("cmt_mf", "mf") if name.endswith("_mf") else ("cmt_ect", "ect")
    check_results(out, [cmt, base])
    assert res["runs"][cmt]["kimg"]["mid"] > 0 and res["runs"][base]["kimg"]["post"] > 0
    assert os.path.getsize(os.path.join(out, "metrics_vs_kimg.png")) > 0
    for v in res["runs"][cmt]["one_step"].values():
        assert v == v and v >= 0  # finite, non-negative metrics
    # rerunning the same command resumes every finished stage instead of training again
    again = load(name).main(["--smoke", "--out", out, "--device", "cpu"])
    assert again["runs"][cmt]["one_step"] == res["runs"][cmt]["one_step"]
    if name == "digits_cmt_ect":   # the showcase: the floor, the teacher, the side-by-side picture, grids ×4
        from PIL import Image
        ref = res["reference"]
        assert ref["floor"]["n"] == 359 and 0 < ref["floor"]["fd"] < 10 and ref["teacher_16step"]["fd"] > 0
        picture = Image.open(os.path.join(out, "comparison.png"))
        # 3 rows of 2 panels, each 10 × 6 digits upscaled to 32 × 32 with 2-pixel padding, 12-pixel gaps
        assert picture.size == (2 * (10 * 34 + 2) + 12, 3 * (6 * 34 + 2 + 16) + 2 * 12)
        grids = os.path.join(out, "cmt_ect", "post_ect", "grids")
        assert Image.open(os.path.join(grids, sorted(os.listdir(grids))[-1])).size == (10 * 33 + 1,) * 2
        check_trajectories_solved_ahead(mod_cfg=load(name).smoke(load(name).Config()), out=out, res=res)


def check_trajectories_solved_ahead(mod_cfg, out, res):
    """The main job's CMT solves its trajectories before the stage: the store holds exactly the trajectories the
    stage consumed (steps × trajectories_per_batch, each once), the steps called no teacher, and a stored
    trajectory is the pre-trained teacher's own 16-step solve from its stored seed and image."""
    from safetensors.torch import load_file

    from engine.pipelines.digits import backbone
    from engine.precond import EDMPrecond
    from engine.teacher import trajectory_cache as tc
    source = tc.TrajectorySource(os.path.join(out, "cmt_ect", "trajectories"))
    mid = res["runs"]["cmt_ect"]["stages"]["mid"]
    steps = round(mid["kimg"] * 1000) // 128
    assert len(source) == steps * mod_cfg.trajectories_per_batch == mid["counters"]["images"]
    assert mid["counters"]["teacher_nfe"] == 0 and mid["trajectories_wall_s"] > 0
    teacher = EDMPrecond(backbone(mod_cfg, 0.0))
    teacher.load_state_dict(load_file(os.path.join(out, "teacher", "pre_edm", "ema.safetensors")))
    from engine.data import digits_source
    for t in (0, len(source) - 1):
        again = tc.regenerate(source.store, t, teacher.eval(), digits_source(mod_cfg.resolution))
        torch.testing.assert_close(again, torch.from_numpy(source.store.states[t].copy()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cifar10_cmt_ect", "ffhq64_cmt_ect", "afhqv2_64_cmt_ect"])
def test_paper_recipes_smoke_and_missing_files(tmp_path, name):
    mod = load(name)
    with pytest.raises(SystemExit, match=r"--teacher: the EDM teacher edm-.*-uncond-vp\.pkl"):
        mod.run_paper_recipe(mod.__doc__, mod.SETTINGS, name, ["--out", str(tmp_path / "x"), "--device", "cpu"])
    out = str(tmp_path / name)
    mod.run_paper_recipe(mod.__doc__, mod.SETTINGS, name, ["--smoke", "--out", out, "--device", "cpu"])
    res = check_results(out, ["cmt_ect"])
    assert res["runs"]["cmt_ect"]["kimg"] == {"mid": 0.032, "post": 0.032}
    assert os.listdir(os.path.join(out, "cmt_ect", "post_ect", "grids"))


def test_dry_run_trains_nothing(tmp_path):
    out = str(tmp_path / "dry")
    assert load("digits_cmt_ect").main(["--dry-run", "--out", out]) == {}
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["nfe"] == 16 and cfg["flags"]["dry_run"] is True
    assert sorted(os.listdir(out)) == ["config.json"]


def test_imagenet256_cmt_mf_smoke_and_missing_data(tmp_path):
    """The ImageNet-256 CMT-MF pipeline: a clear message without its latent dataset (and for an image dataset in
    its place), and every stage end to end on synthetic latents with tiny DiTs."""
    mod = load("imagenet256_cmt_mf")
    with pytest.raises(SystemExit, match=r"needs:\n  --data: the ImageNet-256 latent dataset in EDM2's \.npy format"):
        mod.main(["--out", str(tmp_path / "x"), "--device", "cpu", "--data", str(tmp_path / "absent.zip")])
    import numpy as np

    from engine.data import write_image_dataset
    images = write_image_dataset(tmp_path / "images.zip", np.zeros((2, 8, 8, 3), np.uint8), [0, 1])
    from engine.errors import EngineError
    with pytest.raises(EngineError, match="holds images of shape"):
        mod.main(["--out", str(tmp_path / "y"), "--device", "cpu", "--data", str(images)])
    out = str(tmp_path / "run")
    res = mod.main(["--smoke", "--out", out, "--device", "cpu"])
    assert res["runs"]["cmt_mf"]["kimg"] == {"pre": 0.064, "mid": 0.112, "post": 0.032}
    cfg = json.load(open(os.path.join(out, "config.json")))["config"]
    full = mod.Config()  # the paper's settings (docs/spec/mf.md §4.5) are what a real run resolves
    assert (full.teacher, full.student, full.omega, full.kappa, full.t_end) == ("B/4", "XL/2", 0.2, 0.92, 0.75)
    assert full.mid_kimg == 200_000 * 112 / 1000 and full.post_batch == 64 and cfg["tiny"] is True
    for stage in ("pre_mf_teacher", "mid_cmt", "post_mf"):
        assert os.path.exists(os.path.join(out, "cmt_mf", stage, "ema.safetensors"))


def test_coco_t2i_cmt_mf_smoke_and_missing_data(tmp_path, capsys, monkeypatch):
    """The MS-COCO text-to-image pipeline: a clear message naming both missing inputs; --smoke runs the REPA SiT
    teacher, CMT-MF from its weights and Mean Flow, and both baselines (random and SiT init, at the CMT arm's mid +
    post budget), writing the table; a rerun resumes every finished stage instead of training it again."""
    mod = load("coco_t2i_cmt_mf")
    for var in ("ENGINE_FID_STATS", "ENGINE_INCEPTION_WEIGHTS", "ENGINE_VAE_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit, match=r"needs:\n  --data: the COCO 256² SD-VAE latent dataset.*\n  --captions: "
                                         r"its caption store with REPA features"):
        mod.main(["--out", str(tmp_path / "x"), "--device", "cpu"])
    out = str(tmp_path / "run")
    res = mod.main(["--smoke", "--out", out, "--device", "cpu"])
    runs = res["runs"]
    assert runs["cmt_mf"]["kimg"] == {"pre": 0.032, "mid": 0.112, "post": 0.032}
    assert runs["mf_sit"]["kimg"] == {"pre": 0.032, "post": 0.144} and runs["mf_random"]["kimg"] == {"post": 0.144}
    assert "| mf_random |" in res["table"] and os.path.exists(os.path.join(out, "results.json"))
    for arm, stage in (("cmt_mf", "pre_sit_teacher"), ("cmt_mf", "mid_cmt"), ("cmt_mf", "post_mf"),
                       ("mf_random", "post_mf"), ("mf_sit", "post_mf")):
        assert os.path.exists(os.path.join(out, arm, stage, "ema.safetensors")), (arm, stage)
    full = mod.Config()
    assert (full.repa_weight, full.trajectories_per_batch, full.pair_rule, full.fid_samples) == \
        (0.5, 4, "nonadjacent28", 30_000) and full.omega / (1 - full.kappa) == 2.0
    assert "FID-30k not computed: missing --val" in capsys.readouterr().out
    again = mod.main(["--smoke", "--out", out, "--device", "cpu"])
    assert again["runs"]["cmt_mf"]["kimg"] == runs["cmt_mf"]["kimg"]
    assert capsys.readouterr().out.count("resuming stage") == 5


def test_imagenet64_cmt_ect_smoke_and_required_settings(tmp_path, capsys, monkeypatch):
    """The ImageNet-64 pipeline: without the choices the paper leaves open the run stops, naming EDM2's published
    files, and writes nothing; --smoke runs CMT → ECT and CMT → ECD on a tiny MP-UNet with a checkpoint per stage
    and the results table."""
    mod = load("imagenet64_cmt_ect")
    for var in ("ENGINE_FID_STATS", "ENGINE_INCEPTION_WEIGHTS", "ENGINE_DINOV2_WEIGHTS", "ENGINE_WEIGHTS_DIR"):
        monkeypatch.delenv(var, raising=False)
    import numpy as np

    from engine.data import write_image_dataset
    data = write_image_dataset(tmp_path / "img64.zip", np.zeros((2, 64, 64, 3), np.uint8), [0, 1])
    with pytest.raises(SystemExit) as e:
        mod.run_edm2_recipe(mod.__doc__, mod.SETTINGS, "imagenet64_cmt_ect",
                            ["--out", str(tmp_path / "x"), "--device", "cpu", "--data", str(data)])
    text = str(e.value)
    assert "teacher_file: the EMA length of the EDM2-XL ImageNet-64 teacher" in text
    assert "edm2-img64-xl-0671088-0.040.pkl as the FID-optimal reconstruction (FID 1.33" in text
    assert "edm2-img64-s-1073741-0.045.pkl guided by edm2-img64-xs-0134217-0.110.pkl, w 1.7 (FID 1.01" in text
    assert not os.path.exists(tmp_path / "x")
    out = str(tmp_path / "run")
    res = mod.run_edm2_recipe(mod.__doc__, mod.SETTINGS, "imagenet64_cmt_ect", ["--smoke", "--out", out,
                                                                                 "--device", "cpu"])
    check_results(out, ["cmt_ect", "cmt_ecd"])
    assert res["runs"]["cmt_ecd"]["kimg"] == {"mid": 0.064, "post": 0.064}
    assert "| cmt_ecd |" in res["table"]
    for stage in ("cmt/mid_cmt", "cmt_ect/post_ect", "cmt_ecd/post_ecd"):
        assert os.path.exists(os.path.join(out, stage, "checkpoints", "ckpt-000000000064.pt"))
        assert os.path.exists(os.path.join(out, stage, "ema.safetensors"))
    ecd = res["runs"]["cmt_ecd"]["stages"]["post"]["counters"]
    assert ecd["teacher_nfe"] == 4 * ecd["pairs"]       # Heun's 2 evaluations, each of the main net and the guide
    mid = res["runs"]["cmt_ect"]["stages"]["mid"]["counters"]
    assert mid["teacher_nfe"] == mid["pairs"]            # CMT: one unguided teacher call per pair
    said = capsys.readouterr().out                       # the metrics' files, each with where it goes, in one message
    assert said.count("  missing: ") == 3 and "(EDM2's https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img64.pkl)" in said
    assert "dinov2_vitl14_pretrain.pth in the --weights directory" in said
