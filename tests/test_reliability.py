"""Nothing a user does loses a run (docs/runs.md): a rerun with other settings or inputs is refused before anything
is written, checkpoints and releases verify their bytes, mismatches that would happen to run are errors naming
them, and plain mistakes on the command line and in constructors are one-line messages. Each case compares the
run directory's files before and after."""
import errno
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.checkpoints.files import CheckpointError, UnreadableCheckpoint, load_checkpoint, save_checkpoint
from engine.checkpoints.identity import IdentityMismatch, check_or_record, compare, write_identity
from engine.checks import positive_int
from engine.cli import run_main
from engine.data import write_image_dataset
from engine.data.sampler import TensorSource
from engine.errors import EngineError
from engine.networks import build_network
from engine.objectives import ECT, EDMLoss
from engine.precond import CMPrecond, EDMPrecond
from engine.training.loop import train_stage
from engine.training.stage_config import StageConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(directory) -> dict:
    """Every file under `directory` and its SHA-256."""
    out = {}
    for d, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, directory)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def recipe(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def cli(main, argv, capsys) -> tuple[int, str]:
    """Run an entry point as its command line does (engine.cli.run_main): its exit status and its stderr."""
    with pytest.raises(SystemExit) as e:
        run_main(main, argv)
    return e.value.code, capsys.readouterr().err


# ---- reruns ---------------------------------------------------------------------------------------------------

@pytest.fixture
def finished_gmm(gmm_smoke, tmp_path):
    """A finished run of the Gaussian-mixture recipe (its smoke size, to keep CI short): a copy of the session's
    (tests/conftest.py), so that tests on the two xdist workers never rerun in one directory at once."""
    out = tmp_path / "R"
    shutil.copytree(gmm_smoke, out)
    return out


@pytest.mark.parametrize("change, named", [
    ([], r"config\.blocks: 1 → 4; .*flags\.smoke: true → false"),     # the case, the other way round
    (["--smoke", "--seed", "1"], r"flags\.seed: 0 → 1"),
    (["--smoke", "--kimg-scale", "2"], r"flags\.kimg_scale: 1\.0 → 2\.0"),
])
def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(finished_gmm, change, named, capsys):
    """Refused before anything is written: the finished run's config.json, logs, checkpoints, releases and results
    are byte for byte what they were."""
    before = snapshot(finished_gmm)
    assert {"identity.json", "config.json", "results.json"} <= set(before)
    code, err = cli(recipe("gmm_cmt_ect").main, ["--out", str(finished_gmm), "--device", "cpu", *change], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "refusing to resume it with" in err and re.search(named, err), err
    assert snapshot(finished_gmm) == before


def test_a_compatible_rerun_resumes_and_may_change_result_neutral_settings(tmp_path):
    data = TensorSource(torch.randn(64, 2))
    make = lambda: (torch.manual_seed(0), CMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1)))[1]
    cfg = dict(name="s", total_kimg=0.128, batch_size=32, lr=1e-3, ema_beta=None, ema_std=0.1, seed=3)
    first = train_stage(StageConfig(**cfg, log_kimg=0.032, ckpt_kimg=0.064), make(), ECT(q=4), data, str(tmp_path))
    again = train_stage(StageConfig(**cfg, log_kimg=0.064, ckpt_kimg=0.032, keep_checkpoints=1, eval_kimg=0.064,
                                    parallel="ddp"), make(), ECT(q=4), data, str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(first.ema.state_dict().values(), again.ema.state_dict().values()))
    # a stage cannot be extended: a larger budget is another stage (its learning-rate schedule differs)
    with pytest.raises(IdentityMismatch, match=r"stage\.total_kimg: 0\.128 → 0\.256"):
        train_stage(StageConfig(**{**cfg, "total_kimg": 0.256}), make(), ECT(q=4), data, str(tmp_path))


def test_the_identity_covers_data_teacher_and_initialisation(tmp_path):
    torch.manual_seed(0)
    teacher = EDMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1))
    data = TensorSource(torch.randn(64, 2))
    net = lambda: (torch.manual_seed(1), CMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1)))[1]
    from engine.objectives import ECD
    cfg = StageConfig(name="s", total_kimg=0.064, batch_size=32, lr=1e-3, ema_beta=0.5)
    train_stage(cfg, net(), ECD(teacher), data, str(tmp_path))
    before = snapshot(tmp_path)
    with pytest.raises(IdentityMismatch, match=r"data\.sha256: "):
        train_stage(cfg, net(), ECD(teacher), TensorSource(torch.randn(64, 2)), str(tmp_path))
    other = EDMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1))
    with pytest.raises(IdentityMismatch, match=r"objective\.teacher\.state_sha256: "):
        train_stage(cfg, net(), ECD(other), data, str(tmp_path))
    with pytest.raises(IdentityMismatch, match=r"objective\.solver: \"euler\" → \"heun\""):
        train_stage(cfg, net(), ECD(teacher, solver="heun"), data, str(tmp_path))
    assert snapshot(tmp_path) == before


def test_run_identity_names_changed_input_files(tmp_path, capsys):
    """--data and --teacher are fingerprinted (a dataset by its index, weights whole); a rerun with other files is
    refused before anything is written."""
    from engine.pipelines.recipe import Run, parse_flags
    d = tmp_path / "d.zip"
    write_image_dataset(d, np.zeros((4, 1, 8, 8), np.uint8))
    t = tmp_path / "teacher.pkl"
    t.write_bytes(b"\x80\x04weights")
    out = tmp_path / "run"
    args = parse_flags("", ["--out", str(out), "--data", str(d), "--teacher", str(t), "--device", "cpu"])
    Run(args, "r", dict(a=1)).record()
    before = snapshot(out)
    write_image_dataset(d, np.ones((4, 1, 8, 8), np.uint8), overwrite=True)
    t.write_bytes(b"\x80\x04other weights")
    with pytest.raises(IdentityMismatch, match=r"inputs\.data\.index_sha256: .*inputs\.teacher\.sha256: "):
        Run(args, "r", dict(a=1))
    assert snapshot(out) == before


def test_new_settings_at_their_default_keep_an_identity(tmp_path):
    path = tmp_path / "identity.json"
    write_identity(path, {"version": 1, "config": {"a": 1}})
    # the engine gained a setting `b` (default 2) after the run started: at its default it changes nothing
    assert check_or_record(path, dict(config=dict(a=1, b=2)), "run", defaults=dict(config=dict(b=2)))
    with pytest.raises(IdentityMismatch, match=r"config\.b: \(not set\) → 3"):
        check_or_record(path, dict(config=dict(a=1, b=3)), "run", defaults=dict(config=dict(b=2)))
    with pytest.raises(IdentityMismatch, match=r"config\.a: 1 → \(not set\)"):
        check_or_record(path, dict(config=dict(b=2)), "run", defaults=dict(config=dict(b=2)))
    write_identity(path, {"version": 0, "config": {"a": 1}})
    with pytest.raises(IdentityMismatch, match="identity format 0; this engine writes format 1"):
        check_or_record(path, dict(config=dict(a=1)), "run")
    path.write_text("{not json")
    with pytest.raises(IdentityMismatch, match="cannot be read"):
        check_or_record(path, dict(config=dict(a=1)), "run")
    assert compare({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1, "c": [1, 3]}}) == ["a.c: [1, 2] → [1, 3]"]


def test_a_readable_checkpoint_that_does_not_fit_is_refused_not_replaced(tmp_path):
    data = TensorSource(torch.randn(64, 2))
    cfg = StageConfig(name="s", total_kimg=0.128, batch_size=32, lr=1e-3, ema_beta=0.5, ckpt_kimg=0.064)
    torch.manual_seed(0)
    train_stage(cfg, CMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1)), EDMLoss(), data,
                str(tmp_path))
    # as a run directory of an older engine: no identity.json, checkpoints carrying only the StageConfig fingerprint
    os.remove(tmp_path / "s" / "identity.json")
    for ckpt in (tmp_path / "s" / "checkpoints").glob("ckpt-*.pt"):
        state = load_checkpoint(ckpt)
        del state["identity"]
        save_checkpoint(ckpt, state)
    before = snapshot(tmp_path)
    torch.manual_seed(0)
    wider = CMPrecond(build_network("gmm-mlp", hidden_channels=16, num_blocks=1))
    with pytest.raises(CheckpointError, match=r"does not fit: .*it belongs to another configuration of stage 's'"):
        train_stage(cfg, wider, EDMLoss(), data, str(tmp_path))
    assert snapshot(tmp_path) == before


# ---- integrity --------------------------------------------------------------------------------------------------

def test_releases_verify_their_bytes(tmp_path):
    from engine.checkpoints.releases import export_safetensors, load_safetensors_network, verify_release
    torch.manual_seed(0)
    net = CMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1))
    path = tmp_path / "ema.safetensors"
    export_safetensors(net, path)
    assert verify_release(path)
    data = bytearray(path.read_bytes())
    data[-20:-4] = bytes(b ^ 0xFF for b in data[-20:-4])
    path.write_bytes(bytes(data))
    with pytest.raises(UnreadableCheckpoint, match="tensor data do not match the SHA-256"):
        load_safetensors_network(path)


def test_a_full_disk_is_reported_as_such_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch's zip writer turns the disk's ENOSPC into "enforce fail … unexpected pos"; the error says what it is."""
    import engine.checkpoints.files as files
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, dict(w=torch.arange(10.0)))
    before = snapshot(tmp_path)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 200:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

    monkeypatch.setattr(files.os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
    with pytest.raises(OSError, match=r"no space left on device while writing .*ckpt\.pt .*untouched") as e:
        save_checkpoint(path, dict(w=torch.zeros(1000)))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert snapshot(tmp_path) == before and torch.equal(load_checkpoint(path)["w"], torch.arange(10.0))


# ---- mismatches that would happen to run --------------------------------------------------------------------------

def test_a_consistency_snapshot_is_not_a_teacher(tmp_path):
    import edm_pickle_writer as W

    from engine.checkpoints.edm_snapshots import load_edm_pickle
    kw = dict(img_resolution=8, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1],
              num_blocks=1, attn_resolutions=[])
    net = CMPrecond(build_network("digits-ddpmpp", **kw))
    path = tmp_path / "ect.pkl"
    W.write_pickle(W.snapshot(W.network_record(net, W.edm_init_kwargs(net.model.init_kwargs))), path)
    with pytest.raises(CheckpointError, match=r"holds a consistency model \(ECMPrecond.* a teacher is an EDMPrecond"):
        load_edm_pickle(path, mode="teacher")
    assert load_edm_pickle(path, mode="student") is not None
    with pytest.raises(CheckpointError, match="is a directory"):
        load_edm_pickle(tmp_path, mode="teacher")
    save_checkpoint(tmp_path / "ckpt-000000000064.pt", dict(w=torch.zeros(1)))
    with pytest.raises(CheckpointError, match=r"is a torch\.save archive \(a training checkpoint of this engine"):
        load_edm_pickle(tmp_path / "ckpt-000000000064.pt", mode="teacher")


def test_paper_recipe_inputs_must_fit_its_settings():
    from types import SimpleNamespace

    from engine.pipelines.edm_cm import PaperSettings, check_inputs
    s = PaperSettings(dataset="ffhq-64x64", resolution=64, q=4)
    teacher = SimpleNamespace(model=SimpleNamespace(img_resolution=32, img_channels=3))
    data = SimpleNamespace(resolution=32, num_channels=1)
    with pytest.raises(EngineError, match=r"holds 32×32 images; ffhq64 is for 64×64; .*was trained at 32×32; .*"
                                          r"1-channel images, the teacher .* 3-channel ones"):
        check_inputs("ffhq64", s, data, teacher, "d.zip", "t.pkl")


def test_trajectory_cache_refuses_a_teacher_of_another_shape(tmp_path, capsys):
    import edm_pickle_writer as W

    from engine.teacher import trajectory_cache as tc
    kw = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=8, channel_mult=[1], num_blocks=1,
              attn_resolutions=[])
    teacher = EDMPrecond(build_network("digits-ddpmpp", **kw))
    W.write_pickle(W.snapshot(W.network_record(teacher, W.edm_init_kwargs(teacher.model.init_kwargs))),
                   tmp_path / "t.pkl")
    write_image_dataset(tmp_path / "d.zip", np.zeros((4, 3, 32, 32), np.uint8))
    code, err = cli(tc.main, ["--teacher", str(tmp_path / "t.pkl"), "--data", str(tmp_path / "d.zip"), "--out",
                              str(tmp_path / "store"), "--trajectories", "4", "--device", "cpu"], capsys)
    assert code == 2 and "holds images of shape [3, 32, 32]; the teacher" in err and "[3, 16, 16]" in err
    assert not (tmp_path / "store").exists()
    code, err = cli(tc.main, ["--teacher", str(tmp_path / "t.pkl"), "--data", str(tmp_path / "d.zip"), "--out",
                              str(tmp_path / "store"), "--trajectories", "0"], capsys)
    assert code == 2 and "--trajectories: the value must be a positive integer, got 0" in err


def test_solvers_refuse_unusable_inputs():
    from engine.solvers import consistency_sampler, dpm_solver_pp, euler, heun, mean_flow_sampler
    den = lambda x, s, labels=None: x * 0
    sig = [80.0, 1.0, 0.002]
    with pytest.raises(EngineError, match="dpm_solver_pp: the state must be a floating-point tensor, got torch.int64"):
        dpm_solver_pp(den, torch.zeros(2, 3, dtype=torch.long), sig)
    with pytest.raises(EngineError, match="dpm_solver_pp: the state has non-finite entries"):
        dpm_solver_pp(den, torch.tensor([[math.nan, 0.0]]), sig)
    with pytest.raises(EngineError, match="finite positive σ grid"):
        dpm_solver_pp(den, torch.zeros(1, 2), [80.0, -1.0])
    for solver in (heun, euler):
        with pytest.raises(EngineError, match=f"{solver.__name__}: the σ grid must be finite, non-negative"):
            solver(den, torch.zeros(1, 2), [80.0, -1.0, 0.0])
    with pytest.raises(EngineError, match="must be finite and decrease to 0"):
        consistency_sampler(den, torch.zeros(1, 2), sigma_max=math.inf)
    with pytest.raises(EngineError, match=r"in \(0, 1\] and decrease to 0"):
        mean_flow_sampler(den, torch.zeros(1, 2), (2.0,))


# ---- plain mistakes: one line each, before anything is written --------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--kimg-scale", "nan"], "--kimg-scale: the value must be a finite number > 0, got nan"),
    (["--kimg-scale", "inf"], "--kimg-scale: the value must be a finite number > 0, got inf"),
    (["--kimg-scale", "-1"], "--kimg-scale: the value must be a finite number > 0, got -1.0"),
    (["--kimg-scale", "1e-9"], "is 0 pairs, less than one step of 128"),
    (["--device", "foo"], "--device 'foo' is not a device; use cpu, cuda or cuda:N"),
    (["--device", "cuda"], "--device cuda: this PyTorch has no usable CUDA device"),
    (["--seed", "-3"], "--seed: the seed must be an integer in [0, 2**64 − 1] (a 64-bit seed), got -3"),
])
def test_recipe_flags(tmp_path, argv, message, capsys):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    code, err = cli(recipe("gmm_cmt_ect").main, ["--out", str(out)] + argv, capsys)
    last = err.strip().splitlines()[-1]          # argparse's usage, then the one line of the error
    assert code == 2 and " error: " in last and message in last, err
    assert not out.exists()


def test_out_that_is_a_file_or_under_one(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out, message in ((f, "is a file; the run directory must be a folder"),
                         (f / "sub", "is a file, so the run directory cannot be created under it")):
        code, err = cli(recipe("gmm_cmt_ect").main, ["--out", str(out)], capsys)
        assert code == 2 and message in err
    assert f.read_text() == "x"


@pytest.mark.parametrize("flag, value, named", [("--num-samples", "0", "the value must be a "),
                                                ("--num-samples", "-5", "the value must be a "),
                                                ("--batch", "0", "the value must be a "),
                                                ("--seed-start", "-1", "the seed must be an integer in [0, 2**64")])
def test_evaluate_counts(tmp_path, flag, value, named, capsys):
    from engine.evaluate import main
    code, err = cli(main, ["--net", "x.safetensors", "--metrics", "none", flag, value], capsys)
    assert code == 2 and f"{flag}: {named}" in err


def test_constructors_name_their_bad_values():
    cases = [
        (lambda: CMPrecond(build_network("gmm-mlp"), sigma_data=0), "CMPrecond: sigma_data must be a finite number > 0"),
        (lambda: EDMPrecond(build_network("gmm-mlp"), sigma_min=-1), "EDMPrecond: sigma_min must be a finite number ≥ 0"),
        (lambda: EDMPrecond(build_network("gmm-mlp"), sigma_min=1, sigma_max=1), "sigma_max must be greater than"),
        (lambda: EDMPrecond("net"), "model must be a network"),
        (lambda: build_network("digits-ddpmpp", img_resolution=12, channel_mult=[1, 2, 2, 2]),
         "img_resolution 12 is not divisible by 2^3"),
        (lambda: build_network("digits-ddpmpp", model_channels=0), "SongUNet: model_channels must be a positive integer"),
        (lambda: build_network("digits-ddpmpp", dropout=1.5), "SongUNet: dropout must be a finite number ≥ 0"),
        (lambda: build_network("gmm-mlp", num_blocks=-1), "MLPNet: num_blocks must be a positive integer"),
        (lambda: __import__("engine.networks", fromlist=["DiT"]).DiT(input_size=8, patch_size=3),
         "DiT: input_size 8 is not a multiple of the patch size 3"),
        (lambda: EDMLoss(P_std=0), "EDMLoss: P_std must be a finite number > 0"),
        (lambda: ECT(q=4, P_mean=math.nan), "ECT: P_mean must be a finite number"),
        (lambda: __import__("engine.objectives", fromlist=["MeanFlow"]).MeanFlow(label_dropout=1.0),
         "MeanFlow: label_dropout must be in [0, 1)"),
        (lambda: __import__("engine.objectives", fromlist=["CMT"]).CMT(lambda *a: a[0], nfe=0, distance="l2"),
         "nfe must be a positive integer"),
        (lambda: StageConfig(name="s", total_kimg=math.inf, batch_size=8, lr=1e-3), "total_kimg must be a finite"),
        (lambda: StageConfig(name="s", total_kimg=1, batch_size=0, lr=1e-3), "batch_size must be a positive integer"),
        (lambda: StageConfig(name="s", total_kimg=1, batch_size=8, lr=-1), "lr must be a finite number > 0"),
        (lambda: StageConfig(name="s", total_kimg=1, batch_size=8, lr=1e-3, ema_std=0.05),
         "give exactly one of ema_beta"),
        (lambda: StageConfig(name="../x", total_kimg=1, batch_size=8, lr=1e-3), "name must be a directory name"),
        (lambda: TensorSource(torch.zeros(3, 2), torch.zeros(2)), "3 images but 2 labels"),
        (lambda: positive_int("n", True), "n must be a positive integer, got True"),
    ]
    from engine.data import ImageDataset
    cases.append((lambda: ImageDataset("x.zip", max_size=0), "ImageDataset: max_size must be a positive integer"))
    for make, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            make()


def test_a_command_line_error_is_one_line_without_a_traceback(tmp_path):
    """End to end, through the interpreter: the recipe's stderr is argparse's usage and one error line."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "recipes", "gmm_cmt_ect.py"), "--out",
                           str(tmp_path / "o"), "--kimg-scale", "1e-9"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("(a --kimg-scale that small trains nothing)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("entry, argv, flag", [
    ("engine.metrics.reference_stats", ["--data", "d.zip", "--out", "r.npz", "--batch", "0"], "--batch"),
    ("engine.pipelines.encode_latents", ["--data", "d.zip", "--out", "l.zip", "--batch", "-2"], "--batch"),
    ("bench/throughput.py", ["--reps", "0"], "--reps"),
    ("bench/jvp.py", ["--warmup", "-1"], "--warmup"),
    ("bench/fast_teacher.py", ["--smoke", "--reps", "0"], "--reps"),
])
def test_every_command_line_names_a_bad_count(entry, argv, flag, capsys):
    if entry.endswith(".py"):
        import importlib.util
        spec = importlib.util.spec_from_file_location(f"bench_{os.path.basename(entry)[:-3]}",
                                                      os.path.join(ROOT, entry))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    else:
        mod = __import__(entry, fromlist=["main"])
    code, err = cli(mod.main, argv, capsys)
    assert code == 2 and f"argument {flag}: the value must be a " in err.strip().splitlines()[-1]


# ---- the second probe (296 cases): what it found on the surfaces added since the first ------------------------

def test_an_unconditional_paper_recipe_refuses_a_class_conditional_teacher():
    """recipes/cifar10_cmt_ect.py with a label_dim-10 teacher trained a student with its labels silently zeroed."""
    from types import SimpleNamespace

    from engine.pipelines.edm_cm import PaperSettings, check_inputs
    s = PaperSettings(dataset="cifar10-32x32", resolution=32, q=2)
    teacher = EDMPrecond(build_network("digits-ddpmpp", img_resolution=32, in_channels=3, out_channels=3,
                                       model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[],
                                       label_dim=10))
    data = SimpleNamespace(resolution=32, num_channels=3)
    with pytest.raises(EngineError, match=r"^t\.pkl is class-conditional \(10 classes\); cifar10 reproduces the "
                                          r"paper's unconditional setting \(its teacher: "
                                          r"edm-cifar10-32x32-uncond-vp\.pkl\)$"):
        check_inputs("cifar10", s, data, teacher, "d.zip", "t.pkl")


def test_objectives_refuse_a_consistency_model_as_teacher_and_forwards_check_host_sigmas():
    """CMT(CMPrecond(...).eval(), ...) trained against a consistency model's outputs as if they were a diffusion
    model's. Forwards check what costs no device read: σ's type, shape, and a host number's value."""
    from engine.guidance import GuidedDenoiser
    from engine.objectives import CMT, ECD, SCD
    from engine.objectives.distances import squared_l2
    mlp = lambda: build_network("gmm-mlp", hidden_channels=8, num_blocks=1)  # noqa: E731
    cm, dm = CMPrecond(mlp()).eval(), EDMPrecond(mlp()).eval()
    refused = r"the (teacher|guide) is a consistency model \(CMPrecond\); it must be a diffusion denoiser"
    for make in (lambda t: CMT(t, nfe=4, distance=squared_l2), lambda t: ECD(t), lambda t: SCD(t),
                 lambda t: ECD(dm, guide=t, guidance=2.0), lambda t: CMT(GuidedDenoiser(dm, t, 2.0), nfe=4,
                                                                         distance=squared_l2)):
        with pytest.raises(EngineError, match=refused):
            make(cm)
        make(dm)                                   # a diffusion teacher is taken
    x = torch.randn(3, 2)
    for sigma, named in [(-1.0, r"finite number >= 0, got -1\.0"), (math.nan, "finite number >= 0, got nan"),
                         ("0.5", "a number or a tensor, got str '0.5'"), (torch.ones(2), "2 entries for a batch of 3"),
                         (torch.ones(3, 2), r"a scalar, \[B\] or \[B,1,...,1\]; got shape \(3, 2\)")]:
        with pytest.raises(EngineError, match=named):
            cm(x, sigma)
    assert torch.isfinite(cm(x, 0.5)).all() and torch.isfinite(cm(x, [0.1, 1.0, 80.0])).all()
    meta = CMPrecond(mlp()).to("meta")          # a network on another device than its input: named, not a raw error
    with pytest.raises(EngineError, match=r"CMPrecond: x is on cpu, the network on meta; move one of them"):
        meta(x, 0.5)
    assert meta(x.to("meta"), 0.5).shape == (3, 2)


def test_weights_files_that_are_not_state_dicts_are_one_line_without_torch_advice(tmp_path):
    """A malicious, text or wrong-key VGG16 file raised torch's UnpicklingError, whose text advises
    weights_only=False: that advice would run the file's code, and is never passed on."""
    from engine.perceptual.lpips import load_vgg16_state_dict
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"features.0.weight": Payload()}, tmp_path / "evil.pth")
    (tmp_path / "text.pth").write_text("features.0.weight = 1\n")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "keys.pth")
    for name, match in [("evil.pth", r"refused without running anything: it names posix\.system, which a weights "
                                     r"file never holds"),
                        ("text.pth", r"is not a PyTorch file \(neither a torch\.save zip archive nor a pickle\)"),
                        ("keys.pth", r"VGG16 weights .*keys\.pth.*: missing keys")]:
        with pytest.raises(EngineError, match=match) as e:
            load_vgg16_state_dict(tmp_path / name)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_a_wrong_vae_file_and_a_wrong_dataset_for_encode_latents_are_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    from engine.pipelines.encode_latents import main
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    (tmp_path / "text.safetensors").write_text("not weights")
    gray = write_image_dataset(tmp_path / "gray.zip", np.zeros((2, 8, 8, 1), np.uint8))
    rgb = write_image_dataset(tmp_path / "rgb.zip", np.zeros((2, 8, 8, 3), np.uint8))
    for vae, data, match in [("wrong.safetensors", rgb, r"wrong\.safetensors: not the SD VAE \(AutoencoderKL"),
                             ("text.safetensors", rgb, r"text\.safetensors: not a safetensors file"),
                             (None, gray, r"gray\.zip holds 1-channel images; the SD VAE encodes RGB")]:
        if vae is None:                          # a VAE that loads, then the dataset is checked
            from engine.pipelines.smoke_weights import write_sd_vae
            vae = os.path.relpath(write_sd_vae(str(tmp_path)), tmp_path)
        code, err = cli(main, ["--data", str(data), "--vae", str(tmp_path / vae), "--out", str(tmp_path / "o.zip"),
                               "--device", "cpu"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), err
    assert not (tmp_path / "o.zip").exists()


def test_encode_captions_checks_its_device_and_names_a_bad_json_file(tmp_path, capsys):
    from engine.pipelines.encode_captions import main
    (tmp_path / "bad.json").write_text("{'annotations': ")
    base = ["--captions", str(tmp_path / "bad.json"), "--clip", str(tmp_path), "--out", str(tmp_path / "s")]
    for device, match in [("foo", r"--device 'foo' is not a device"), ("cpu", r"bad\.json is not JSON \(")]:
        code, err = cli(main, base + ["--device", device], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(match, err), err
    if not torch.cuda.is_available():
        code, err = cli(main, base + ["--device", "cuda"], capsys)
        assert code == 2 and "this PyTorch has no usable CUDA device" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("damage, match", [
    ("float_offsets", r"offsets\.npy holds float64 values; a caption store writes integer offsets there"),
    ("object_array", r"captions\.npy is an object array \(it would be unpickled\)"),
    ("garbage_meta", r"meta\.json is damaged: not JSON"),
    ("meta_counts", r"meta\.json is damaged: images and captions must be counts"),
])
def test_a_damaged_caption_store_is_one_line(tmp_path, damage, match):
    from engine.data.captions import CaptionStore, write_caption_store
    store = str(tmp_path / "store")
    write_caption_store(store, np.zeros((2, 4, 8), np.float16), np.array([0, 1, 2]), np.zeros((4, 8), np.float16),
                        [["a"], ["b"]])
    if damage == "float_offsets":
        np.save(os.path.join(store, "offsets.npy"), np.array([0.0, 1.0, 2.0]))
    elif damage == "object_array":
        np.save(os.path.join(store, "captions.npy"), np.array([None, "x"], dtype=object), allow_pickle=True)
    elif damage == "garbage_meta":
        open(os.path.join(store, "meta.json"), "w").write("\x00garbage{")
    else:
        import json
        meta = json.load(open(os.path.join(store, "meta.json")))
        json.dump({**meta, "images": "two"}, open(os.path.join(store, "meta.json"), "w"))
    with pytest.raises(EngineError, match=match) as e:
        CaptionStore(store)
    assert "\n" not in str(e.value)


def test_e_latentlpips_names_latents_it_cannot_compare():
    from engine.networks.latent_vgg import LatentVGG
    from engine.perceptual.elatentlpips import ELatentLPIPS
    torch.manual_seed(0)
    d = ELatentLPIPS(vgg_state_dict=LatentVGG().state_dict())
    with pytest.raises(EngineError, match=r"augmentation needs latents of at least 22×22, got \(16, 16\)"):
        d(torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16))
    with pytest.raises(EngineError, match=r"compares two \[N, 4, H, W\] latents of one shape, got \(2, 3, 32, 32\)"):
        d(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    assert d(torch.randn(2, 4, 22, 22), torch.randn(2, 4, 22, 22)).shape == (2,)
    unaugmented = ELatentLPIPS(vgg_state_dict=LatentVGG().state_dict(), augment=None)
    assert unaugmented(torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)).shape == (2,)


def test_a_huge_dataset_label_is_refused_before_anything_is_allocated(tmp_path):
    """A label of 10¹² asked for one-hot vectors of 3.64 TiB."""
    import json
    import zipfile

    from engine.data import ImageDataset
    path = write_image_dataset(tmp_path / "d.zip", np.zeros((2, 8, 8, 3), np.uint8), [0, 1])
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    labels = json.loads(members["dataset.json"])
    labels["labels"][1][1] = 10 ** 12
    members["dataset.json"] = json.dumps(labels).encode()
    with zipfile.ZipFile(tmp_path / "huge.zip", "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(EngineError, match=r"is 1000000000000; class indices must be in \[0, 1,048,576\)"):
        ImageDataset(str(tmp_path / "huge.zip"))
