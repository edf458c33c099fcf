"""`--profile-steps N` (engine/training/step_profile.py): where a step's time goes, phase by phase, without changing
what the stage computes."""
import json
import os

import pytest
import torch

from engine.networks import build_network
from engine.objectives import CMT, ECD
from engine.objectives import base as marks
from engine.objectives.distances import squared_l2
from engine.precond import CMPrecond, EDMPrecond
from engine.training.loop import train_stage
from engine.training.stage_config import StageConfig
from engine.training.step_profile import PHASES, StepProfile, phase


def test_nested_phases_are_timed_exclusively_and_add_up_to_the_step(monkeypatch):
    """A clock that advances 1 s per reading: each phase's time is its own readings' span less its children's."""
    ticks = iter(range(1000))
    monkeypatch.setattr("engine.training.step_profile.time.perf_counter", lambda: float(next(ticks)))
    profile = StepProfile(2, torch.device("cpu"), skip=1)
    for _ in range(4):
        with profile.step():
            with phase("data"):                    # reads 2 ticks apart: 1 s
                pass
            with phase("forward"):                 # 5 ticks apart, of which the two teacher calls take 1 s each
                with phase("teacher"):
                    pass
                with phase("teacher"):
                    pass
        if profile.done():
            record = profile.record()
    assert marks.step_profile is None and not profile.done()
    ms = record["ms_per_step"]
    assert ms["data"] == 1000 and ms["teacher"] == 2000 and ms["forward"] == 5000 - 2000
    assert record["step_ms"] == sum(ms.values()) and record["steps"] == 2 and record["after_steps"] == 1
    assert set(PHASES) <= set(ms) and ms["backward"] == 0


def test_phase_outside_a_profiled_step_does_nothing():
    with phase("teacher"):
        pass
    profile = StepProfile(0, torch.device("cpu"))
    with profile.step():
        assert marks.step_profile is None      # N = 0: no step is timed
    with pytest.raises(ValueError, match="profile steps must be an integer >= 0"):
        StepProfile(-1, torch.device("cpu"))


def _stage(tmp_path, objective, profile_steps):
    torch.manual_seed(0)
    net = CMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1))
    data = __import__("engine.data.sampler", fromlist=["TensorSource"]).TensorSource(torch.randn(64, 2))
    cfg = StageConfig(name="s", total_kimg=0.128, batch_size=16, lr=1e-3, ema_beta=None, ema_std=0.1, seed=1)
    return train_stage(cfg, net, objective, data, str(tmp_path), profile_steps=profile_steps)


@pytest.mark.parametrize("make", [
    lambda teacher: CMT(teacher, nfe=4, trajectories_per_batch=4, distance=squared_l2, graphs=False),
    lambda teacher: ECD(teacher),
], ids=["cmt", "ecd"])
def test_a_profiled_stage_logs_its_phases_and_trains_the_same(tmp_path, make):
    torch.manual_seed(5)
    teacher = EDMPrecond(build_network("gmm-mlp", hidden_channels=8, num_blocks=1)).eval()
    plain = _stage(tmp_path / "plain", make(teacher), 0)
    profiled = _stage(tmp_path / "profiled", make(teacher), 3)
    assert all(torch.equal(a, b) for a, b in zip(plain.ema.state_dict().values(), profiled.ema.state_dict().values()))
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "profiled", "s", "log.jsonl"))]
    [profile] = [r for r in records if r.get("event") == "profile"]
    ms = profile["ms_per_step"]
    assert profile["steps"] == 3 and profile["clock"] == "wall clock" and set(PHASES) == set(ms)
    assert ms["teacher"] > 0 and ms["forward"] > 0 and ms["backward"] > 0 and ms["optimizer"] > 0
    assert abs(profile["step_ms"] - sum(ms.values())) < 1e-2
    assert not any(r.get("event") == "profile" for r in map(json.loads, open(tmp_path / "plain" / "s" / "log.jsonl")))


def test_every_recipe_takes_profile_steps_and_it_is_not_part_of_the_run(tmp_path, capsys):
    """`--profile-steps 2` on the gmm smoke: a profile record in every stage's log and a line on the terminal; the
    same command without it reruns the finished run (the flag changes no result, so no identity)."""
    import importlib.util
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("recipe_gmm_cmt_ect_profile", os.path.join(root, "recipes",
                                                                                            "gmm_cmt_ect.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = str(tmp_path / "R")
    mod.main(["--smoke", "--out", out, "--device", "cpu", "--profile-steps", "2"])
    printed = capsys.readouterr().out
    for stage in ("cmt_ect/mid_cmt", "cmt_ect/post_ect", "ect/ect"):
        events = [json.loads(line).get("event") for line in open(os.path.join(out, stage, "log.jsonl"))]
        assert events.count("profile") == 1, stage
        assert f"stage '{stage.split('/')[1]}': profile of 2 steps (wall clock), ms per step: data " in printed
    mod.main(["--smoke", "--out", out, "--device", "cpu"])
