"""Data parallelism on CPU with gloo (engine/dist.py, engine/training/loop.py): the objectives' sharded randomness, a
2-process run against a 1-process run with the same global batch (CMT, ECT, Mean Flow, EDM2; sCT and sCD under
FSDP2 and DDP), checkpoints that resume at another world size, an elastic restart after SIGKILL, the errors for
batches that do not divide, and a recipe under torchrun. The multi-process runs go through tests/dist_harness.py
under torch.distributed.run."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from devices import DEVICES

from engine import dist
from engine.networks import DiT, SongUNet
from engine.objectives import CMT, ECT, SCD, SCT, CMTMeanFlow, FlowMatching, MeanFlow, SlowCMT, StepRNG, squared_l2
from engine.precond import CMPrecond, EDMPrecond
from engine.training.loop import train_stage
from engine.training.stage_config import StageConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "tests", "dist_harness.py")


def launch(args, nproc=None, extra=(), env=None):
    """Run the harness: plainly (nproc None) or under torch.distributed.run; returns the completed process."""
    cmd = [sys.executable, HARNESS, *args] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
         HARNESS, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    return done


def run_ok(args, nproc=None, extra=(), env=None):
    done = launch(args, nproc, extra, env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="session")
def reference(made_once):
    """`reference(args, nproc=None, env=None)`: the output directory of an uninterrupted harness run, made once per
    session for each set of arguments, process count and environment (tests/conftest.py `made_once`: shared by the
    pytest-xdist workers), since several tests compare against the same run (the one-process CMT, Mean Flow and
    EDM2 runs, the 2-process ECT run). Tests only read these directories."""
    def run(args, nproc=None, env=None):
        key = repr((tuple(args), nproc, tuple(sorted((env or {}).items()))))
        name = "reference-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return str(made_once(name, lambda path: run_ok([*args, "--out", str(path)], nproc, env=env)))
    return run


def losses(out):
    path = os.path.join(out, "stage", "log.jsonl")
    return {round(r["kimg"] * 1000): r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


def final(out):
    return torch.load(os.path.join(out, "final.pt"), weights_only=True)


def assert_losses_close(a, b, rtol=1e-5):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert abs(a[k] - b[k]) <= rtol * abs(a[k]), (k, a[k], b[k])


def assert_states_close(a, b, rtol=1e-9):
    for part in ("net", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=rtol, atol=rtol)


# ---- in one process: the objectives' randomness is a function of the global batch ---------------------------------

def _unet():
    return SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2],
                    num_blocks=1, attn_resolutions=[4], dropout=0.0).double()


def _dit():
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
               num_classes=4).double()


def _per_image_losses(objective, net, x, y, world, pairs_per_image=1):
    """Per-pair losses of ranks 0..world−1 on their contiguous shares, arranged image-major like one process."""
    parts = []
    m = x.shape[0] // world
    for r in range(world):
        sl = slice(r * m, (r + 1) * m)
        out = objective(net, x[sl], None if y is None else y[sl], StepRNG.for_step(3, r, 40, "cpu", world))
        loss = out.loss.detach()
        if pairs_per_image > 1:  # CMT's layout is step-major within a call: entry j·m + b
            loss = loss.reshape(pairs_per_image, m).t().reshape(-1)
        parts.append(loss)
    return torch.cat(parts)


@pytest.mark.parametrize("name", ["cmt", "slow_cmt", "ect", "mf", "fm", "cmt_mf", "cmt_mf_subset", "sct", "scd"])
def test_sharded_objectives_equal_the_unsharded_batch(name):
    """Rank r of 2 on its half of the batch computes exactly the per-pair losses one process computes for those
    rows: noise, times, r = t rows, label dropout and Slow-CMT levels all follow the global batch."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 4, (8,), generator=g)
    teacher = EDMPrecond(_unet()).eval().requires_grad_(False)
    per, labels = 1, None
    if name == "cmt":
        objective, net, per = CMT(teacher, nfe=4, trajectories_per_batch=8, distance=squared_l2, graphs=False), \
            CMPrecond(_unet()), 4
    elif name == "slow_cmt":
        objective, net = SlowCMT(teacher, nfe=4, distance=squared_l2), CMPrecond(_unet())
    elif name == "ect":
        objective, net = ECT(q=4), CMPrecond(_unet())
    elif name in ("sct", "scd"):
        objective = SCT() if name == "sct" else SCD(teacher)
        objective.weight.double()
        net = CMPrecond(_unet())
    elif name.startswith("cmt_mf"):
        k = 5 if name == "cmt_mf_subset" else None
        objective = CMTMeanFlow(_dit().eval().requires_grad_(False), trajectories_per_batch=8, pairs_per_trajectory=k)
        net, per, labels = _dit(), objective.per_trajectory, y
    else:
        objective = MeanFlow(omega=0.6, kappa=0.2, label_dropout=0.5) if name == "mf" else FlowMatching(
            label_dropout=0.5)
        net, labels = _dit(), y
    one = _per_image_losses(objective, net, x, labels, 1, per)
    two = _per_image_losses(objective, net, x, labels, 2, per)
    torch.testing.assert_close(two, one, rtol=1e-12, atol=1e-12)


def test_batches_that_do_not_divide_over_the_ranks_are_named(monkeypatch, tmp_path):
    """CMT's trajectories are per global batch: 2 trajectories cannot be shared by 4 ranks (the reference code
    silently trains on nothing then, docs/spec/cm.md §3.1)."""
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    teacher = EDMPrecond(_unet()).eval().requires_grad_(False)
    cmt = CMT(teacher, nfe=4, trajectories_per_batch=2, distance=squared_l2, graphs=False)
    cfg = StageConfig(name="s", total_kimg=0.008, batch_size=8, lr=1e-3)
    with pytest.raises(ValueError, match="cmt consumes 2 trajectories per step: 2 per global batch cannot be "
                                         "divided evenly over 4 ranks"):
        train_stage(cfg, CMPrecond(_unet()), cmt, None, str(tmp_path))
    with pytest.raises(ValueError, match="batch_size \\(pairs per step\\): 6 per global batch cannot be divided"):
        train_stage(StageConfig(name="s", total_kimg=0.006, batch_size=6, lr=1e-3), CMPrecond(_unet()), ECT(q=4),
                    None, str(tmp_path))
    with pytest.raises(ValueError, match="unknown data-parallel strategy 'zero3'"):
        dist.resolve_strategy("zero3")


# ---- multi-process, through torchrun -------------------------------------------------------------------------------

@pytest.mark.parametrize("objective,flags", [("cmt", []), ("cmt", ["--shard-teacher"]), ("ect", []), ("mf", []),
                                            ("mf", ["--jvp", "func"]), ("edm2", [])])
def test_two_processes_equal_one(objective, flags, reference):
    """FSDP2 over 2 gloo processes against one process, same global batch of 8: every one of the 20 per-step
    losses within 1e-5 relative, and the final weights (float64) within 1e-9. CMT also with its frozen teacher
    FSDP-sharded (gathered block by block inside the teacher's solve). Mean Flow with its dual-stream JVP (weights
    gathered by dist.unsharded) and with torch.func.jvp through the FSDP2 modules' own hooks. EDM2: its weights
    renormalised shard by shard after every step, and the tracked EMAs' snapshots equal too."""
    both = flags if flags[:1] == ["--jvp"] else []       # the objective's own settings go to both runs
    one = reference(["--objective", objective, *both])
    two = reference(["--objective", objective, *flags], nproc=2)
    assert sorted(os.listdir(os.path.join(two, "stage", "checkpoints")))[0] == "ckpt-000000000080"  # DCP dirs
    assert_losses_close(losses(one), losses(two))
    assert len(losses(one)) == 20
    assert_states_close(final(one), final(two))
    if objective == "edm2":
        from safetensors.torch import load_file
        names = sorted(os.listdir(os.path.join(one, "stage", "snapshots")))
        assert len(names) == 8 and names == sorted(os.listdir(os.path.join(two, "stage", "snapshots")))
        for n in names:
            a, b = (load_file(os.path.join(d, "stage", "snapshots", n)) for d in (one, two))
            assert_states_close(dict(net=a, ema=a), dict(net=b, ema=b))
        w = final(two)["net"]["unet.enc.4x4_block0.conv_res0.weight"]
        torch.testing.assert_close(w.flatten(1).square().mean(1).sqrt(), torch.full((16,), 1 / (1 + 1e-4),
                                   dtype=w.dtype), rtol=1e-6, atol=0)      # unit RMS rows after the last step


@pytest.mark.parametrize("device", DEVICES)
def test_fsdp2_in_a_one_process_group_equals_unsharded(device, tmp_path, reference):
    """FSDP2 at world size 1 (a process group of one: gloo on CPU, NCCL on a GPU): sharded parameters, gathers,
    DCP checkpoints, against the plain run: losses within 1e-5, final float64 weights within 1e-9."""
    # hiding the GPUs changes nothing where there are none: there the plain run is the one other tests compare with
    env = {} if device == "cuda" or not torch.cuda.is_available() else {"CUDA_VISIBLE_DEVICES": ""}
    one, sharded = reference(["--objective", "cmt"], env=env), str(tmp_path / "sharded")
    run_ok(["--objective", "cmt", "--out", sharded, "--parallel", "fsdp", "--one-process-group"], env=env)
    assert sorted(os.listdir(os.path.join(sharded, "stage", "checkpoints")))[0] == "ckpt-000000000080"  # DCP dir
    assert os.path.isdir(os.path.join(sharded, "stage", "checkpoints", "ckpt-000000000080"))
    assert_losses_close(losses(one), losses(sharded))
    assert_states_close(final(one), final(sharded))


def test_ddp_equals_one_process(tmp_path, reference):
    one, two = reference(["--objective", "mf"]), str(tmp_path / "two")
    run_ok(["--objective", "mf", "--out", two, "--parallel", "ddp"], nproc=2)
    assert_losses_close(losses(one), losses(two))
    assert_states_close(final(one), final(two))


@pytest.mark.parametrize("objective,jvp", [("sct", "fd"), ("scd", "func")])
def test_scm_under_fsdp2_and_ddp_equals_one_process_and_resumes_at_the_other_world_size(objective, jvp, tmp_path):
    """sCT (its tangent by central differences) and sCD (torch.func.jvp through the sharded network) against one
    process, same global batch of 8 (the adaptive weight w_φ, averaged over the ranks by the loop, enters every
    loss). Under DDP, 2 gloo processes for all 20 steps: the per-step losses within 1e-5 relative, the final float64
    weights within 1e-9, and the network's gradients reduced exactly once per step — 20 all-reduces of all of its
    parameters in 20 steps (the tangent pass goes around the wrapper). Under FSDP2, a run stopped after step 10 at
    one world size and resumed at the other (sCT: 2 FSDP2 processes, then one; sCD: one, then 2 FSDP2 processes):
    its 20 losses and final weights equal the uninterrupted one-process run's to the same tolerances."""
    flags = ["--objective", objective, "--jvp", jvp]
    one = str(tmp_path / "one")
    run_ok([*flags, "--out", one])
    assert len(losses(one)) == 20
    if jvp == "func" and dist._torch_version() < dist.FUNC_JVP_THROUGH_FSDP2:
        # torch.func.jvp through FSDP2 fails on this torch: the stage refuses it in one line naming the version
        done = launch([*flags, "--out", str(tmp_path / "refused"), "--parallel", "fsdp"], nproc=2)
        assert done.returncode != 0 and "needs torch ≥ 2.13" in done.stderr, done.stderr[-3000:]
        return
    ddp = str(tmp_path / "ddp")
    run_ok([*flags, "--out", ddp, "--parallel", "ddp", "--count-reductions"], nproc=2)
    assert_losses_close(losses(one), losses(ddp))
    assert_states_close(final(one), final(ddp))
    counts = json.load(open(os.path.join(ddp, "reductions.json")))
    assert counts["buckets"] == 20 and counts["elements"] == 20 * counts["trained_elements"], counts
    first, second = (2, None) if objective == "sct" else (None, 2)   # 2 processes: FSDP2 ("auto")
    out = str(tmp_path / "fsdp")
    run_ok([*flags, "--out", out, "--stop-at", "10"], nproc=first)
    assert len(losses(out)) == 10 and not os.path.exists(os.path.join(out, "final.pt"))
    done = run_ok([*flags, "--out", out], nproc=second)
    assert "resuming stage 'stage' from" in done.stdout and "ckpt-000000000080" in done.stdout
    assert_losses_close(losses(one), losses(out))
    assert_states_close(final(one), final(out))


@pytest.mark.parametrize("objective,first,second", [("mf", 2, None), ("mf", None, 2), ("edm2", 2, None),
                                                    ("edm2", None, 2)])
def test_checkpoint_resumes_at_another_world_size(objective, first, second, tmp_path, reference):
    """Stop after step 10's checkpoint at one world size, resume at the other (2 → 1: a DCP directory read by one
    process; 1 → 2: a single-process file sharded on load): the losses of steps 11–20 equal an uninterrupted
    run's, the next step's included. EDM2: with its tracked EMAs and the 0-d gains FSDP leaves whole."""
    ref, out = reference(["--objective", objective]), str(tmp_path / "out")
    run_ok(["--objective", objective, "--out", out, "--stop-at", "10"], nproc=first)
    assert not os.path.exists(os.path.join(out, "final.pt"))
    done = run_ok(["--objective", objective, "--out", out], nproc=second)
    form = "ckpt-000000000080" + (".pt" if first is None else " ")
    assert f"resuming stage 'stage' from {os.path.join(out, 'stage', 'checkpoints', form)}" in done.stdout + " "
    a, b = losses(ref), losses(out)
    assert min(k for k in b) == 8 and 88 in b   # the resumed run logged the 11th step (88 images) afresh
    assert_losses_close(a, b)
    assert_states_close(final(ref), final(out))
    if objective == "edm2":                     # the tracked EMAs resumed too
        from safetensors.torch import load_file
        a, b = (load_file(os.path.join(d, "stage", "snapshots", "stage-000000000160-0.050.safetensors"))
                for d in (ref, out))
        assert_states_close(dict(net=a, ema=a), dict(net=b, ema=b))


def test_sigterm_to_one_rank_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path, reference):
    """A scheduler's SIGTERM reaching one rank: all ranks agree at the next log boundary, write one sharded
    checkpoint there, exit with 143 and start nothing else; the rerun resumes from it and ends with the
    uninterrupted run's weights."""
    ref, out = reference(["--objective", "ect"], nproc=2), str(tmp_path / "out")
    stopped = launch(["--objective", "ect", "--out", out, "--sigterm-at", "7"], nproc=2)
    assert stopped.returncode != 0 and "exitcode: 143" in stopped.stderr, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at 0.064 kimg" in stopped.stdout   # step 7 ran to its end: 8 steps of 8
    assert not os.path.exists(os.path.join(out, "final.pt"))
    assert os.path.isfile(os.path.join(out, "stage", "checkpoints", "ckpt-000000000064", "MANIFEST.sha256"))
    done = run_ok(["--objective", "ect", "--out", out], nproc=2)
    assert "resuming stage 'stage' from" in done.stdout and "ckpt-000000000064" in done.stdout
    assert_states_close(final(ref), final(out))


def test_elastic_restart_after_sigkill_recovers_exactly(tmp_path, reference):
    """Rank 1 is SIGKILLed at step 12 of 20; torchrun (--max-restarts=1) restarts both ranks, which resume from the
    step-10 checkpoint and finish; the final weights equal an uninterrupted 2-process run's."""
    ref, out = reference(["--objective", "ect"], nproc=2), str(tmp_path / "out")
    done = launch(["--objective", "ect", "--out", out, "--kill-at", "12"], nproc=2, extra=["--max-restarts=1"])
    assert done.returncode == 0, done.stderr[-4000:]
    assert "SIGKILL" in done.stderr or "exitcode: -9" in done.stderr
    assert "resuming stage 'stage' from " + os.path.join(out, "stage", "checkpoints", "ckpt-000000000080") \
        in done.stdout
    assert_losses_close(losses(ref), losses(out), rtol=1e-12)
    assert_states_close(final(ref), final(out), rtol=0)


def test_recipe_runs_under_torchrun(tmp_path):
    """The ImageNet-256 CMT-MF recipe's three stages (teacher, CMT, Mean Flow with FSDP-gathered evaluation grids)
    on 2 processes, with rank 0 writing the run's files."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "recipes", "imagenet256_cmt_mf.py"), "--smoke", "--out", out, "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["runs"]["cmt_mf"]["kimg"] == {"pre": 0.064, "mid": 0.112, "post": 0.032}
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["world_size"] == 2
    for stage in ("pre_mf_teacher", "mid_cmt", "post_mf"):
        assert os.path.exists(os.path.join(out, "cmt_mf", stage, "ema.safetensors"))
        assert os.listdir(os.path.join(out, "cmt_mf", stage, "grids"))


def test_imagenet512_headline_runs_under_torchrun_and_resumes_on_one_process(tmp_path):
    """recipes/imagenet512_cmt_ecd.py --smoke on 2 processes (FSDP2 over gloo: tiny MP-UNet student, teacher,
    guide; E-LatentLPIPS; the evaluation gathered from both ranks): a sharded checkpoint and a release per stage,
    the teacher accounting (CMT one unguided call per pair, ECD's guided Heun four), the 1- and 2-step FID through
    the random-weight detector file with its record, results.json. Then the same command on one process resumes
    both finished stages instead of retraining them and reports the same FID, and the `engine.evaluate` command the
    recipe prints reproduces those numbers from the release alone."""
    out = str(tmp_path / "run")
    recipe = os.path.join(ROOT, "recipes", "imagenet512_cmt_ecd.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("ENGINE_FID_STATS", "ENGINE_INCEPTION_WEIGHTS", "ENGINE_WEIGHTS_DIR", "ENGINE_VAE_WEIGHTS",
                "ENGINE_LATENT_VGG_WEIGHTS"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           recipe, "--smoke", "--out", out, "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.load(open(os.path.join(out, "results.json")))
    assert json.load(open(os.path.join(out, "config.json")))["world_size"] == 2
    for stage in ("mid_cmt", "post_ecd"):
        assert os.path.isdir(os.path.join(out, "cmt_ecd", stage, "checkpoints", "ckpt-000000000016"))  # sharded
        assert os.path.exists(os.path.join(out, "cmt_ecd", stage, "ema.safetensors"))
    run = res["runs"]["cmt_ecd"]
    assert run["kimg"] == {"mid": 0.016, "post": 0.016}
    assert run["stages"]["post"]["counters"]["teacher_nfe"] == 4 * run["stages"]["post"]["counters"]["pairs"]
    assert run["stages"]["mid"]["counters"]["teacher_nfe"] == run["stages"]["mid"]["counters"]["pairs"]
    for k in ("one_step", "two_step"):          # FID through the random-weight detector file, with its record
        assert math.isfinite(run[k]["fid"]) and run[k]["detectors"]["fid"]["layout"] == "pytorch-fid"
    again = subprocess.run([sys.executable, recipe, "--smoke", "--out", out, "--device", "cpu"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    said = again.stdout + again.stderr
    assert "resuming stage 'mid_cmt'" in said and "resuming stage 'post_ecd'" in said
    res2 = json.load(open(os.path.join(out, "results.json")))
    for k in ("one_step", "two_step"):
        assert math.isclose(res2["runs"]["cmt_ecd"][k]["fid"], res["runs"]["cmt_ecd"][k]["fid"], rel_tol=1e-6)
    # the command the recipe prints for evaluating later reproduces its numbers from the release alone: one process
    # and one batch of 8 like the resumed run's evaluation, and its thread count (float sums depend on it)
    w = os.path.join(out, "smoke-weights")
    ev = subprocess.run([sys.executable, "-m", "engine.evaluate", "--net",
                         os.path.join(out, "cmt_ecd", "post_ecd", "ema.safetensors"), "--metrics", "fid",
                         "--stats", os.path.join(w, "img512.pkl"), "--inception",
                         os.path.join(w, "pt_inception-2015-12-05-6726825d.pth"), "--vae",
                         os.path.join(w, "sd-vae-ft-mse", "diffusion_pytorch_model.safetensors"),
                         "--latent-convention", "edm2", "--schedules", "80", "80,1.526", "--num-samples", "8",
                         "--batch", "8", "--out", str(tmp_path / "eval")],
                        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert ev.returncode == 0, ev.stderr[-4000:]
    report = json.load(open(tmp_path / "eval" / "report.json"))["results"]
    assert [r["fid"] for r in report.values()] == pytest.approx(
        [res2["runs"]["cmt_ecd"]["one_step"]["fid"], res2["runs"]["cmt_ecd"]["two_step"]["fid"]], rel=1e-9)


def test_frozen_teachers_are_sharded_without_the_bf16_parameter_policy(tmp_path):
    """2 gloo processes, FSDP2's bf16 parameter policy forced on CPU as on CUDA: a DiT teacher and an EDM U-Net
    teacher sharded as frozen networks still compute in fp32 and equal their unsharded copies (with the policy a
    DiT teacher met fp32 inputs with bf16 weights and raised a dtype mismatch), while the trained network is
    gathered in bf16."""
    out = tmp_path / "frozen.json"
    harness = os.path.join(os.path.dirname(__file__), "frozen_harness.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           harness, str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["dit"] < 1e-5 and res["unet"] < 1e-5, res
    assert res["dit_dtype"] == "torch.float32" and res["student_dtype"] == "torch.bfloat16", res
