"""The loop's small units: learning-rate schedules, EMA, the resumable sampler, the checkpoint ring."""
import math
import os

import pytest
import torch

from engine.data.sampler import ResumableSampler
from engine.training.ema import EMA, std_to_exp
from engine.training.lr_schedules import learning_rate
from engine.training.run_state import CheckpointRing
from engine.training.train_log import truncate_jsonl


def test_linear_decay_matches_cmt_formula():
    # docs/spec/cm.md §3.4: lr_k = 2e-4 (1 − k/300000) with the counter before the step
    total = 300_000 * 128
    for k in (0, 1, 150_000, 299_999):
        assert learning_rate("linear", 128 * k, lr=2e-4, total_nimg=total) == pytest.approx(2e-4 * (1 - k / 300_000))
    assert learning_rate("linear", 0, lr=2e-4, total_nimg=total) == 2e-4


def test_inv_sqrt_and_rampup_match_edm2():
    ref = 70_000 * 2048
    for nimg in (0, ref // 2, ref, 4 * ref):
        expect = 1e-2 / math.sqrt(max(nimg / ref, 1))
        assert learning_rate("inv_sqrt", nimg, lr=1e-2, total_nimg=1, ref_nimg=ref) == pytest.approx(expect)
    assert learning_rate("constant", 5e6, lr=1e-3, total_nimg=1, rampup_nimg=1e7) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        learning_rate("cosine", 0, lr=1, total_nimg=1)


def test_power_ema_exponent_solves_the_std_equation():
    for std in (0.01, 0.05, 0.10, 0.2):
        g = std_to_exp(std)
        assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(std ** 2, rel=1e-10)
    # the values EDM2 quotes (Karras et al. 2024): σ_rel 0.05 ↔ γ 16.97, σ_rel 0.10 ↔ γ 6.94
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.01)
    assert std_to_exp(0.10) == pytest.approx(6.94, abs=0.01)


def test_constant_ema_update_and_power_beta():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, beta=0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, 128, 128)
    for b, e, p in zip(before, ema.module.parameters(), net.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p.detach())
    pe = EMA(net, std=0.05)
    g = std_to_exp(0.05)
    assert pe.beta_at(1280, 128) == pytest.approx((1 - 0.1) ** (g + 1))
    with pytest.raises(ValueError, match="exactly one"):
        EMA(net, beta=0.9, std=0.05)


def test_sampler_is_a_function_of_position_and_splits_over_ranks():
    s = ResumableSampler(10, seed=3)
    stream = torch.cat([s.indices(p, 4) for p in range(0, 40, 4)])
    # every epoch is a permutation
    for e in range(4):
        assert sorted(stream[10 * e:10 * e + 10].tolist()) == list(range(10))
    # a fresh sampler (as after a resume) continues identically from any position
    assert torch.equal(ResumableSampler(10, seed=3).indices(12, 4), stream[12:16])
    # two ranks together see exactly the global batch
    r0, r1 = s.indices(8, 6, rank=0, world_size=2), s.indices(8, 6, rank=1, world_size=2)
    assert torch.equal(torch.cat([r0, r1]), stream[8:14])  # row for row: rank r holds the r-th contiguous share
    assert not torch.equal(ResumableSampler(10, seed=4).indices(0, 10), stream[:10])
    with pytest.raises(ValueError, match="cannot be split evenly"):
        s.indices(0, 5, rank=0, world_size=2)


def test_ring_keeps_last_k_and_falls_back_over_a_truncated_checkpoint(tmp_path, capsys):
    ring = CheckpointRing(str(tmp_path / "ck"), keep=2)
    for n in (100, 200, 300):
        ring.save({"nimg": n, "w": torch.full((3,), float(n))}, n)
    assert [n for n, _ in ring.list()] == [200, 300]
    newest = ring.list()[-1][1]
    data = open(newest, "rb").read()
    with open(newest, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated, e.g. by a full disk
    state, path = ring.latest()
    assert state["nimg"] == 200 and path.endswith("ckpt-000000000200.pt")
    assert "skipping unreadable checkpoint" in capsys.readouterr().out
    assert os.path.exists(newest)  # never deleted: nothing is lost to a false alarm
    # temporaries of a save killed mid-write are cleaned at start-up
    stale = tmp_path / "ck" / ".ckpt-000000000400.pt.123.abcd.tmp"
    stale.write_bytes(b"partial")
    CheckpointRing(str(tmp_path / "ck"), keep=2)
    assert not stale.exists()


def test_truncate_jsonl_drops_lines_past_resume_point_and_partial_line(tmp_path):
    p = tmp_path / "log.jsonl"
    p.write_text('{"kimg": 1.0}\n{"kimg": 2.0}\n{"kimg": 3.0}\n{"kimg": 4.')
    truncate_jsonl(str(p), 2.0)
    assert p.read_text() == '{"kimg": 1.0}\n{"kimg": 2.0}\n'


def test_power_ema_continued_over_earlier_images_keeps_the_telescoped_share():
    # ema_continue_kimg = K: β_k = (1 − b/(K + k·b))^(γ+1), whose product over m steps telescopes to
    # (K/(K + m·b))^(γ+1): the share of the initial weights (standing for the K earlier images) after m steps
    import dataclasses
    import types

    from engine.errors import EngineError
    from engine.training.run_state import TrainingState
    from engine.training.stage_config import StageConfig
    base = StageConfig(name="s", total_kimg=1.0, batch_size=64, lr=1e-3, ema_beta=None, ema_std=0.10)
    g = std_to_exp(0.10)
    for K, m in ((2.0, 5), (4.0, 3)):
        cfg = dataclasses.replace(base, ema_continue_kimg=K)
        net = torch.nn.Linear(3, 2)
        w0 = [p.detach().clone() for p in net.parameters()]
        ema = EMA(net, std=0.10)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)          # the trained weights, held fixed: the EMA moves from w0 toward them
        state = types.SimpleNamespace(cfg=cfg, ema=ema, tracked=[], model=net)
        for k in range(1, m + 1):
            TrainingState.update_averages(state, k * 64)
        share = (K * 1000 / (K * 1000 + m * 64)) ** (g + 1)
        for a, e, p in zip(w0, ema.module.parameters(), net.parameters()):
            torch.testing.assert_close(e.double(), (share * a + (1 - share) * p.detach()).double(), atol=1e-6,
                                       rtol=0)
        assert 0.05 < share < 0.95   # a case where the continuation visibly keeps part of the initial weights
    # without it the power EMA restarts: β = 0 on the first step, the EMA is the weights
    state = types.SimpleNamespace(cfg=base, ema=EMA(torch.nn.Linear(3, 2), std=0.10), tracked=[], model=net)
    TrainingState.update_averages(state, 64)
    for e, p in zip(state.ema.module.parameters(), net.parameters()):
        torch.testing.assert_close(e, p.detach())
    # a constant β has no image count to continue; the default stays out of the stage identity (old runs resume)
    with pytest.raises(EngineError, match="ema_continue_kimg continues EDM2's power EMA"):
        StageConfig(name="s", total_kimg=1.0, batch_size=64, lr=1e-3, ema_beta=0.99, ema_continue_kimg=1.0)
    assert "ema_continue_kimg" not in base.identity()
    assert dataclasses.replace(base, ema_continue_kimg=2.0).identity()["ema_continue_kimg"] == 2.0


def test_kimg_scale_scales_the_budget_and_every_interval_measured_in_kimg():
    from engine.pipelines.recipe import scaled
    from engine.training.stage_config import StageConfig
    cfg = StageConfig(name="s", total_kimg=10.0, batch_size=64, lr=1e-3, ema_beta=None, ema_std=0.05, log_kimg=1.0,
                      ckpt_kimg=5.0, eval_kimg=2.0, snapshot_emas=(0.05,), snapshot_kimg=4.0, lr_rampup_kimg=3.0,
                      ema_continue_kimg=7.0)
    s = scaled(cfg, 0.5)
    assert (s.total_kimg, s.log_kimg, s.ckpt_kimg, s.eval_kimg, s.snapshot_kimg, s.lr_rampup_kimg,
            s.ema_continue_kimg) == (5.0, 0.5, 2.5, 1.0, 2.0, 1.5, 3.5)
    assert scaled(cfg, 1.0) is cfg and s.lr == cfg.lr and s.batch_size == cfg.batch_size
