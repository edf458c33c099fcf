"""Every recipe checks all its stages' budgets at the run's --kimg-scale before the first stage trains
(engine/pipelines/recipe.py `Run.plan`): a scale too small for a later stage only is refused with one line naming
that stage, before anything is trained or written — not after the first stage, when a rerun with a larger scale
would be refused as another run (docs/runs.md). A refused command leaves no --out behind, smoke inputs included.

Dry runs return before the plan (`begin`, and each pipeline's `if args.dry_run`): they train nothing at any scale."""
import os
import re

import pytest
from test_reliability import ROOT, cli, recipe
from test_reliability_runs import one_line

RUNNERS = ("run_paper_recipe", "run_edm2_recipe", "run_latent512", "run_latent_vgg")


def entry(name: str):
    """The recipe's command-line entry point: its `main`, or the pipeline it hands its SETTINGS to."""
    mod = recipe(name)
    if hasattr(mod, "main"):
        return mod.main
    run = next(getattr(mod, r) for r in RUNNERS if hasattr(mod, r))
    return lambda argv: run(mod.__doc__, mod.SETTINGS, name, argv)


def refused(name: str, scale: str, out, capsys) -> str:
    code, err = cli(entry(name), ["--smoke", "--out", str(out), "--device", "cpu", "--kimg-scale", scale], capsys)
    assert code == 2, err
    return one_line(err)


# (recipe, --kimg-scale, the later stage refused): at the smoke sizes the first stage(s) have at least one step at
# this scale and the named one has none.
LATER = [
    # pre_mf 0.256 kimg × 0.6 = 154 pairs ≥ 128, mid_cmt 0.224 × 0.6 = 134 ≥ 16 × 7 = 112; post_mf 0.128 × 0.6 = 77
    ("digits_cmt_mf", "0.6", r"stage 'post_mf': total_kimg 0\.0768 is 77 pairs, less than one step of 128"),
    # pre_mf 230 ≥ 128, mid_all36 0.224 × 0.9 = 202 ≥ 112; mid_long 0.112 × 0.9 = 101 pairs < 16 × 7 CMT-MF pairs
    ("digits_mf_post_training", "0.9",
     r"stage 'mid_long': total_kimg 0\.1008 is 101 pairs, less than one step of 112"),
    # seed 0's pre_edm 230 and no_mid's post_ect 691 pairs ≥ 128; short_mid's mid_cmt 0.128 × 0.9 = 115
    ("gmm_mid_training", "0.9", r"stage 'mid_cmt': total_kimg 0\.1152 is 115 pairs, less than one step of 128"),
    # pre_edm 0.512 × 0.3 = 154 ≥ 128; mid_cmt 0.256 × 0.3 = 77
    ("gmm_gradient_bias", "0.3", r"stage 'mid_cmt': total_kimg 0\.0768 is 77 pairs, less than one step of 128"),
]


@pytest.mark.parametrize("name, scale, message", LATER, ids=[c[0] for c in LATER])
def test_a_scale_too_small_for_a_later_stage_is_refused_before_the_first_trains(name, scale, message, tmp_path,
                                                                                 capsys):
    out = tmp_path / "run"
    line = refused(name, scale, out, capsys)
    assert re.search(message + r" \(a --kimg-scale that small trains nothing\)", line), line
    assert not out.exists()


# Every recipe's first stage, in the order its stages train: at a scale that leaves every stage without a step it
# is the one named, and nothing is written (the smoke dataset, weights and teachers included).
FIRST = {
    "afhqv2_64_cmt_ect": "mid_cmt", "cifar10_cmt_ect": "mid_cmt", "ffhq64_cmt_ect": "mid_cmt",
    "coco_t2i_cmt_mf": "pre_sit_teacher", "digits_cmt_ect": "pre_edm", "digits_cmt_mf": "pre_mf",
    "digits_mf_post_training": "pre_mf", "digits_mid_training": "pre_edm", "gmm_cmt_ablations": "pre_edm",
    "gmm_cmt_ect": "mid_cmt", "gmm_gradient_bias": "pre_edm", "gmm_mid_training": "pre_edm",
    "imagenet256_cmt_mf": "pre_mf_teacher", "imagenet512_cmt_ecd": "mid_cmt", "imagenet512_latent_vgg": "latent_vgg",
    "imagenet64_cmt_ect": "mid_cmt",
}


def test_every_recipe_is_checked():
    assert sorted(FIRST) == sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "recipes")) if f.endswith(".py"))


@pytest.mark.parametrize("name", sorted(FIRST))
def test_every_recipe_plans_before_it_writes(name, tmp_path, capsys):
    out = tmp_path / "run"
    line = refused(name, "1e-6", out, capsys)
    assert re.fullmatch(rf".*: error: stage '{FIRST[name]}': total_kimg \S+ is 0 pairs, less than one step of \d+ "
                        r"\(a --kimg-scale that small trains nothing\)", line), line
    assert not out.exists()
