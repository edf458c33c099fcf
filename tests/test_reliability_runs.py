"""Faults a probe found in runs and the files around them (docs/runs.md), each refused with one line before anything
is written, the run directory's files compared byte for byte before and after: post-hoc EMA writing over a run's
own snapshots, a refused rerun adopting its settings where identity.json is missing, releases without their hash or
with a header claiming another network, two processes in one --out, a --kimg-scale too small for a later stage only,
and grids written with another mode than every other file."""
import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from test_reliability import cli, recipe, snapshot

from engine.checkpoints.files import CheckpointError, UnreadableCheckpoint
from engine.checkpoints.identity import IdentityMismatch
from engine.checkpoints.releases import export_safetensors, load_safetensors_network
from engine.networks import build_network
from engine.precond import CMPrecond
from engine.training.ema import snapshot_name


def tiny(seed=0):
    torch.manual_seed(seed)
    return CMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1))


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def rewrite_header(path, change):
    """The release at `path` with its JSON header passed through `change(header)`; tensor data kept (padded to 8
    bytes as safetensors writes it)."""
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data[8 + n:])


# ---- post-hoc EMA never writes over its inputs ------------------------------------------------------------------

@pytest.fixture()
def snapshots(tmp_path):
    """A stage's snapshot series as the loop writes it: σ_rel 0.050 and 0.100 at 64 and 128 images."""
    d = tmp_path / "run" / "pre" / "snapshots"
    d.mkdir(parents=True)
    for i, nimg in enumerate((64, 128)):
        for j, std in enumerate((0.05, 0.10)):
            export_safetensors(tiny(2 * i + j), d / snapshot_name("pre", nimg, std),
                               metadata=dict(stage="pre", nimg=nimg, std=std, kimg=nimg / 1000))
    return d


def test_phema_refuses_an_out_that_is_one_of_its_inputs(snapshots, tmp_path, capsys):
    from engine.training.phema import main
    before = snapshot(tmp_path)
    own = snapshots / "pre-000000000128-0.050.safetensors"
    code, err = cli(main, ["--in", str(snapshots), "--std", "0.07", "--out", str(own)], capsys)
    assert code == 2 and re.search(r"--out .*pre-000000000128-0\.050\.safetensors is the snapshot .* of --in .*; "
                                   r"reconstructing into it would replace the run's own snapshot", one_line(err))
    # through a symbolic link, and a snapshot the filters leave out (--in-std 0.05 does not read the 0.100 series)
    os.symlink(own, tmp_path / "link.safetensors")
    before = snapshot(tmp_path)
    code, err = cli(main, ["--in", str(snapshots), "--std", "0.07", "--out", str(tmp_path / "link.safetensors")],
                    capsys)
    assert code == 2 and "is the snapshot" in one_line(err) and own.name in err
    other = snapshots / "pre-000000000128-0.100.safetensors"
    code, err = cli(main, ["--in", str(snapshots), "--std", "0.07", "--in-std", "0.05", "--out", str(other)], capsys)
    assert code == 2 and "is the snapshot" in one_line(err)
    # a directory --out whose names fall on the inputs' (the same prefix)
    code, err = cli(main, ["--in", str(snapshots), "--std", "0.05", "--std", "0.1", "--out", str(snapshots),
                           "--out-prefix", "pre"], capsys)
    assert code == 2 and "is the snapshot" in one_line(err)
    assert snapshot(tmp_path) == before


def test_phema_replaces_only_its_own_earlier_output(snapshots, tmp_path, capsys):
    from engine.training.phema import main
    out = tmp_path / "ema-0.070.safetensors"
    main(["--in", str(snapshots), "--std", "0.07", "--out", str(out)])
    first = out.read_bytes()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~_umask()
    main(["--in", str(snapshots), "--std", "0.07", "--out", str(out)])     # the same command again: same bytes
    assert out.read_bytes() == first and sorted(os.listdir(tmp_path)) == ["ema-0.070.safetensors", "run"]
    before = snapshot(tmp_path)
    # another σ_rel, another time, and a file that is no release at all: each refused, each left as it was
    for argv in (["--std", "0.08"], ["--std", "0.07", "--kimg", "0"]):
        code, err = cli(main, ["--in", str(snapshots), "--out", str(out), *argv], capsys)
        assert code == 2 and re.search(r"--out .*ema-0\.070\.safetensors exists and is not this command's earlier "
                                       r"output .*Remove it or give another --out", one_line(err)), err
    notes = tmp_path / "notes.safetensors"
    notes.write_text("mine")
    before = snapshot(tmp_path)
    code, err = cli(main, ["--in", str(snapshots), "--std", "0.07", "--out", str(notes)], capsys)
    assert code == 2 and "exists and is not this command's earlier output" in one_line(err)
    assert snapshot(tmp_path) == before


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- a refused rerun writes nothing, whatever identity file is missing -----------------------------------------

@pytest.fixture
def finished(gmm_smoke):
    """A finished run of the Gaussian-mixture recipe at its smoke size (made once per session, tests/conftest.py;
    the tests below change copies of it)."""
    return gmm_smoke


def copy_without(finished, tmp_path, *names):
    out = tmp_path / "R"
    shutil.copytree(finished, out)
    for name in names:
        for path in out.rglob(name):
            path.unlink()
    return out


@pytest.mark.parametrize("removed", [("identity.json",), ("identity.json", "**/identity.json")],
                         ids=["run-identity", "every-identity"])
def test_a_refused_rerun_does_not_adopt_its_settings_where_identity_is_missing(finished, tmp_path, removed, capsys):
    """Without identity.json the rerun is checked against config.json; refused, it writes neither, and the original
    command still resumes the run (the stages checked against their identity.json or their checkpoints)."""
    out = copy_without(finished, tmp_path, *removed)
    before = snapshot(out)
    main = recipe("gmm_cmt_ect").main
    code, err = cli(main, ["--smoke", "--out", str(out), "--device", "cpu", "--seed", "1"], capsys)
    assert code == 2 and re.search(r"run 'gmm_cmt_ect' in .* refusing to resume it with: flags\.seed: 0 → 1 \(its "
                                   r"identity\.json is missing: checked against its config\.json\)", one_line(err))
    assert snapshot(out) == before
    res = main(["--smoke", "--out", str(out), "--device", "cpu"])
    assert res["runs"]["ect"]["kimg"] == {"post": 1.024} and capsys.readouterr().out.count("resuming stage") == 3
    assert json.load(open(out / "identity.json"))["flags"]["seed"] == 0
    assert (out / "cmt_ect" / "mid_cmt" / "identity.json").exists()


def test_a_run_without_identity_or_config_is_refused_not_adopted(finished, tmp_path, capsys):
    out = copy_without(finished, tmp_path, "identity.json", "config.json")
    before = snapshot(out)
    code, err = cli(recipe("gmm_cmt_ect").main, ["--smoke", "--out", str(out), "--device", "cpu", "--seed", "1"],
                    capsys)
    assert code == 2 and re.search(r"--out .* holds a run \(results\.json, cmt_ect/mid_cmt, .*\) but no identity\.json "
                                   r"or config\.json recording its settings.* restore .*identity\.json, or use "
                                   r"another --out directory", one_line(err))
    assert snapshot(out) == before


def test_a_stage_without_identity_is_checked_against_its_checkpoints(tmp_path):
    from engine.data.sampler import TensorSource
    from engine.objectives import ECT
    from engine.pipelines.run_directory import check_stage_directory
    from engine.training.loop import train_stage
    from engine.training.stage_config import StageConfig
    data = TensorSource(torch.randn(64, 2))
    cfg = StageConfig(name="s", total_kimg=0.064, batch_size=32, lr=1e-3, ema_beta=None, ema_std=0.1, seed=3)
    train_stage(cfg, tiny(), ECT(q=4), data, str(tmp_path))
    os.remove(tmp_path / "s" / "identity.json")
    before = snapshot(tmp_path)
    check_stage_directory(str(tmp_path / "s"), cfg, tiny(), ECT(q=4), data)    # the same stage: passes
    import dataclasses
    with pytest.raises(IdentityMismatch, match=r"stage 's' in .* identity\.json is missing and .*ckpt-000000000064"
                                               r"\.pt was written for stage identity .*refusing to resume it"):
        check_stage_directory(str(tmp_path / "s"), dataclasses.replace(cfg, seed=4), tiny(), ECT(q=4), data)
    shutil.rmtree(tmp_path / "s" / "checkpoints")
    before = snapshot(tmp_path)
    with pytest.raises(IdentityMismatch, match=r"holds results \(ema\.safetensors, log\.jsonl\) but no identity\.json "
                                               r"or readable checkpoint"):
        check_stage_directory(str(tmp_path / "s"), cfg, tiny(), ECT(q=4), data)
    assert snapshot(tmp_path) == before


# ---- releases: a missing hash warns, a header that claims another network is refused --------------------------

def test_a_release_without_its_hash_loads_with_a_warning(tmp_path):
    """As a checkpoint without its .sha256 does (engine/checkpoints/files.py load_checkpoint): damaged data under
    a removed hash cannot be detected, so the load says it was not checked."""
    path = tmp_path / "ema.safetensors"
    export_safetensors(tiny(), path)
    rewrite_header(path, lambda h: h["__metadata__"].pop("cmt.data_sha256"))
    data = bytearray(path.read_bytes())
    data[-16:-4] = bytes(b ^ 0xFF for b in data[-16:-4])
    path.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    with pytest.warns(UserWarning, match=r"ema\.safetensors has no recorded SHA-256 of its tensor data .*loaded "
                                         r"without an integrity check"):
        load_safetensors_network(path)
    assert snapshot(tmp_path) == before


@contextlib.contextmanager
def address_space_limit(extra_bytes: int):
    """Cap this process's address space at its current size plus `extra_bytes`, so that an attempt to allocate a
    huge network fails at once instead of swapping the machine (Linux)."""
    resource = pytest.importorskip("resource")
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_release_header_claiming_a_huge_network_is_refused_before_allocating(tmp_path, capsys):
    snaps = tmp_path / "snapshots"
    snaps.mkdir()
    path = snaps / snapshot_name("pre", 64, 0.05)
    export_safetensors(tiny(), path, metadata=dict(nimg=64, std=0.05))

    def widen(header):   # the description claims 100 000 hidden channels (≈ 75 GiB of float32); the data is kept
        desc = json.loads(header["__metadata__"]["cmt.network"])
        desc["backbone_kwargs"]["hidden_channels"] = 100_000
        header["__metadata__"]["cmt.network"] = json.dumps(desc)

    rewrite_header(path, widen)
    before = snapshot(tmp_path)
    with address_space_limit(2 << 30), pytest.raises(
            CheckpointError, match=r"its header describes a MLPNet of 74\.\d GiB that does not fit the 14 tensors "
                                   r"\(.* KiB\) the file holds: shape mismatch: model\.in_layer\.weight: checkpoint "
                                   r"\[8, 2\] vs network \[100000, 2\].*nothing was allocated"):
        load_safetensors_network(path)
    from engine.training.phema import main     # and on a command line: one line
    code, err = cli(main, ["--in", str(snaps), "--std", "0.07", "--out", str(tmp_path / "o.safetensors")], capsys)
    assert code == 2 and "its header describes a MLPNet of 74." in one_line(err)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage, message", [
    (lambda d: (10 ** 12).to_bytes(8, "little") + d[8:], r"header length field claims 1000000000000 bytes of a \d+-byte"),
    (lambda d: d[:-64], r"tensor 'model\.\S+' is described as .* does not fit the file's \d+ bytes of tensor data"),
])
def test_a_release_header_that_does_not_fit_its_file_is_an_error(tmp_path, damage, message):
    from engine.checkpoints.releases import verify_release
    path = tmp_path / "ema.safetensors"
    export_safetensors(tiny(), path)
    path.write_bytes(damage(path.read_bytes()))
    before = snapshot(tmp_path)
    with pytest.raises(UnreadableCheckpoint, match=message):
        verify_release(path)
    assert snapshot(tmp_path) == before


# ---- one process per run directory ------------------------------------------------------------------------------

def test_a_second_process_in_the_same_out_is_refused_naming_the_holder(finished, tmp_path, capsys):
    """Another process holds the run directory's lock (as a running recipe does, engine/pipelines/recipe.py): the
    rerun is refused with its pid and writes nothing; once that process is gone — killed, no clean-up — the same
    command runs, and holds the lock itself (its pid is in the file)."""
    out = tmp_path / "R"
    shutil.copytree(finished, out)
    # the protocol on disk, written out here rather than through the engine: flock on run.lock, the pid inside
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); "
                               "print('held', flush=True); sys.stdin.read()",
         str(out / "run.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        main = recipe("gmm_cmt_ect").main
        code, err = cli(main, ["--smoke", "--out", str(out), "--device", "cpu"], capsys)
        assert code == 2 and re.search(rf"--out .* is in use by process {holder.pid}, which holds .*run\.lock; wait "
                                       r"for it to finish, or use another --out directory", one_line(err))
        code, err = cli(main, ["--smoke", "--out", str(out), "--device", "cpu", "--dry-run"], capsys)
        assert code == 2 and f"in use by process {holder.pid}" in one_line(err)
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    main(["--smoke", "--out", str(out), "--device", "cpu"])
    assert (out / "run.lock").read_text().strip() == str(os.getpid())


# ---- every stage's budget before the first one trains -----------------------------------------------------------

def test_a_kimg_scale_too_small_for_a_later_stage_is_refused_before_the_first(tmp_path, capsys):
    """imagenet256_cmt_mf --smoke: the teacher's 0.064 kimg at batch 16 survives ×0.3, CMT's 0.112 kimg at 56 pairs
    a step does not; refused before the teacher trains, nothing written."""
    out = tmp_path / "run"
    code, err = cli(recipe("imagenet256_cmt_mf").main, ["--smoke", "--out", str(out), "--device", "cpu",
                                                        "--kimg-scale", "0.3"], capsys)
    assert code == 2 and re.search(r"stage 'mid_cmt': total_kimg 0\.0336 is 34 pairs, less than one step of 56 \(a "
                                   r"--kimg-scale that small trains nothing\)", one_line(err))
    assert not out.exists()


def test_plan_checks_every_stage_at_the_runs_scale(tmp_path):
    from engine.errors import EngineError
    from engine.pipelines.recipe import Run, parse_flags
    from engine.training.stage_config import StageConfig
    out = tmp_path / "run"
    run = Run(parse_flags("", ["--out", str(out), "--device", "cpu", "--kimg-scale", "0.5"]), "r", dict(a=1))
    stage = lambda name, kimg, batch: StageConfig(name=name, total_kimg=kimg, batch_size=batch, lr=1e-3,
                                                  ema_beta=0.5)
    run.plan(stage("a", 0.064, 32), stage("b", 0.128, 64))           # 32 and 64 pairs: one step each
    with pytest.raises(EngineError, match=r"stage 'c': total_kimg 0\.032 is 32 pairs, less than one step of 64"):
        run.plan(stage("a", 0.064, 32), stage("c", 0.064, 64))
    assert not out.exists()


# ---- grids are written like every other file --------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_grids_get_the_mode_open_gives(tmp_path, mask):
    from engine.data.image_grid import save_image_grid, save_labeled_panels
    previous = os.umask(mask)
    try:
        grid = save_image_grid(torch.zeros(4, 3, 8, 8), str(tmp_path / "grids" / "g.png"))
        panels = save_labeled_panels([("a", torch.zeros(4, 1, 8, 8))], str(tmp_path / "p.png"))
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(previous)
    want = stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode)
    assert want == 0o666 & ~mask
    assert stat.S_IMODE(os.stat(grid).st_mode) == want and stat.S_IMODE(os.stat(panels).st_mode) == want
    assert sorted(os.listdir(tmp_path / "grids")) == ["g.png"]      # no temporary left beside it
