"""Resume by rerunning: a run SIGKILLed mid-step or mid-checkpoint-write and restarted ends bit-identical to an
uninterrupted run; a truncated newest checkpoint, or one with flipped bytes, falls back to the previous one; SIGTERM
and Ctrl-C save a checkpoint at the step boundary, exit with 143 / 130 without a traceback, and resume exactly."""
import os
import subprocess
import sys

import pytest
import torch

HARNESS = os.path.join(os.path.dirname(__file__), "resume_harness.py")


def run(out, *extra):
    return subprocess.run([sys.executable, HARNESS, str(out), *extra], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def reference(made_once):
    """The uninterrupted run's final weights (made once per session, tests/conftest.py)."""
    def make(out):
        r = run(out)
        assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(made_once("resume-harness", make) / "final.pt", weights_only=True)


def assert_identical(a, b):
    for part in ("net", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs"
    assert a["counters"] == b["counters"]


# mid stage: 12 steps (checkpoints after steps 3, 6, 9, 12); post stage: calls 13..24
@pytest.mark.parametrize("kill", [["--kill-at-call", "5"], ["--kill-at-call", "17"], ["--kill-in-save", "2"],
                                  ["--kill-in-save", "6"]], ids=lambda k: "".join(k))
def test_sigkill_then_rerun_is_bit_identical(tmp_path, reference, kill):
    r = run(tmp_path, *kill)
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    assert not (tmp_path / "final.pt").exists()
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical(torch.load(tmp_path / "final.pt", weights_only=True), reference)


def newest_checkpoint(out):
    return sorted((out / "mid" / "checkpoints").glob("ckpt-*.pt"))[-1]


def test_truncated_newest_checkpoint_falls_back(tmp_path, reference):
    r = run(tmp_path, "--kill-at-call", "11")  # after the checkpoints at steps 3, 6, 9 (ring keeps 2)
    assert r.returncode == -9
    newest = newest_checkpoint(tmp_path)
    newest.write_bytes(newest.read_bytes()[:1000])
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping unreadable checkpoint" in r.stdout
    assert_identical(torch.load(tmp_path / "final.pt", weights_only=True), reference)


def test_flipped_bytes_in_the_newest_checkpoint_are_caught(tmp_path, reference):
    """16 bytes flipped inside a weight tensor load silently with torch.load (it ignores the zip CRCs); the recorded
    SHA-256 catches them, the previous checkpoint is used, and the run ends as if nothing had happened."""
    r = run(tmp_path, "--kill-at-call", "11")
    assert r.returncode == -9
    newest = newest_checkpoint(tmp_path)
    data = bytearray(newest.read_bytes())
    state = torch.load(newest, weights_only=True)
    weight = state["net"]["model.dec.out.weight" if "model.dec.out.weight" in state["net"] else
                          next(k for k, v in state["net"].items() if v.numel() >= 64)]
    at = bytes(data).find(weight.numpy().tobytes()[:32])   # the tensor's bytes inside the archive
    assert at > 0
    data[at + 8:at + 24] = bytes(b ^ 0xFF for b in data[at + 8:at + 24])
    newest.write_bytes(bytes(data))
    assert torch.load(newest, weights_only=True)["net"].keys() == state["net"].keys()  # torch does not notice
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "do not match the SHA-256" in r.stdout and "skipping unreadable checkpoint" in r.stdout
    assert_identical(torch.load(tmp_path / "final.pt", weights_only=True), reference)


@pytest.mark.parametrize("sig, code", [("TERM", 143), ("INT", 130)])
def test_sigterm_and_ctrl_c_save_at_the_step_boundary_and_resume_exactly(tmp_path, reference, sig, code):
    r = run(tmp_path, "--signal-at-call", "5", "--signal", sig)   # during the 5th step of the mid stage
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and f"stopped by SIG{sig}" in r.stdout
    assert not (tmp_path / "post").exists()                    # no later stage was started
    assert newest_checkpoint(tmp_path).name == "ckpt-000000000160.pt"   # 5 steps of 32 pairs: the step boundary
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming stage 'mid'" in r.stdout
    assert_identical(torch.load(tmp_path / "final.pt", weights_only=True), reference)


PREMOVE_RUN = os.path.join(os.path.dirname(__file__), "data", "gmm_smoke_stopped_f00baca")
GMM_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "gmm_cmt_ect.py")


def test_a_run_written_before_the_restructure_resumes_bit_exactly(tmp_path, gmm_smoke):
    """tests/data/gmm_smoke_stopped_f00baca is `recipes/gmm_cmt_ect.py --smoke` as commit f00baca wrote it, when
    every module was flat in engine/, stopped by SIGTERM inside its first step (mid_cmt at 0.128 of 0.512 kimg).
    Rerunning the same command over a copy of it resumes after the modules moved, and every stage's release is the
    same bytes as an uninterrupted run's (the session's `gmm_smoke`, tests/conftest.py: the same command with
    --device cpu, the device this one resolves to here): no identity names a module path, so moving modules orphans
    no run."""
    import shutil
    resumed = tmp_path / "resumed"
    shutil.copytree(PREMOVE_RUN, resumed)
    for text in (resumed / "identity.json", resumed / "cmt_ect" / "mid_cmt" / "identity.json"):
        assert "engine." not in text.read_text()
    fresh = gmm_smoke
    r = subprocess.run([sys.executable, GMM_RECIPE, "--smoke", "--out", str(resumed)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    before = open(os.path.join(PREMOVE_RUN, "cmt_ect", "mid_cmt", "log.jsonl"), encoding="utf-8").read()
    after = (resumed / "cmt_ect" / "mid_cmt" / "log.jsonl").read_text()
    assert after.startswith(before) and len(after) > len(before)   # the pre-move log was kept and continued
    releases = sorted(p.relative_to(fresh) for p in fresh.rglob("ema.safetensors"))
    assert len(releases) == 3
    for rel in releases:
        assert (resumed / rel).read_bytes() == (fresh / rel).read_bytes(), rel
