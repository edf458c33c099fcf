"""Resume by rerunning: a run SIGKILLed mid-step or mid-checkpoint-write and restarted ends bit-identical to an
uninterrupted run; a truncated newest checkpoint falls back to the previous one."""
import os
import subprocess
import sys

import pytest
import torch

HARNESS = os.path.join(os.path.dirname(__file__), "resume_harness.py")


def run(out, *extra):
    return subprocess.run([sys.executable, HARNESS, str(out), *extra], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    r = run(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / "final.pt", weights_only=True)


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


def test_truncated_newest_checkpoint_falls_back(tmp_path, reference):
    r = run(tmp_path, "--kill-at-call", "11")  # after the checkpoints at steps 3, 6, 9 (ring keeps 2)
    assert r.returncode == -9
    ckpts = sorted(os.listdir(tmp_path / "mid" / "checkpoints"))
    newest = tmp_path / "mid" / "checkpoints" / ckpts[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    r = run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping unreadable checkpoint" in r.stdout
    assert_identical(torch.load(tmp_path / "final.pt", weights_only=True), reference)
