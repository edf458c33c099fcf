"""The loop end to end on tiny problems: what it logs and counts, that a NaN stops it without touching what was
saved, and that a changed configuration is not silently resumed."""
import json
import os

import pytest
import torch

from engine.checkpoints.identity import IdentityMismatch
from engine.data import GaussianMixture
from engine.data.sampler import TensorSource
from engine.networks import build_network
from engine.objectives import EDMLoss, LossOutput
from engine.objectives.base import Objective
from engine.precond import EDMPrecond
from engine.training.loop import NonFiniteError, train_stage
from engine.training.stage_config import StageConfig


def tiny_setup():
    gm = GaussianMixture.random(4, (2,), std=0.1, seed=0)
    data = TensorSource(gm.sample(256, generator=torch.Generator().manual_seed(0)).float())
    torch.manual_seed(0)
    net = EDMPrecond(build_network("gmm-mlp", hidden_channels=16, num_blocks=1))
    return net, data


def cfg(**kw):
    base = dict(name="s", total_kimg=0.16, batch_size=32, lr=1e-3, log_kimg=0.064, ckpt_kimg=0.064, seed=1)
    return StageConfig(**{**base, **kw})


def test_logs_counters_and_release(tmp_path):
    net, data = tiny_setup()
    res = train_stage(cfg(), net, EDMLoss(), data, str(tmp_path))
    assert res.pairs_seen == 160 and res.counters["steps"] == 5
    assert res.counters["images"] == res.counters["pairs"] == res.counters["student_backward"] == 160
    recs = [json.loads(l) for l in open(tmp_path / "s" / "log.jsonl")]
    assert [r["kimg"] for r in recs] == [0.064, 0.128, 0.16]
    assert all(r["loss"] > 0 and r["teacher_nfe_per_pair"] == 0 and r["student_forward_per_pair"] == 1
               for r in recs)
    # the linear schedule: the rate logged at the last step is lr·(1 − 128/160)
    assert recs[-1]["lr"] == pytest.approx(1e-3 * (1 - 128 / 160))
    assert (tmp_path / "s" / "ema.safetensors").exists() and (tmp_path / "s" / "config.json").exists()


class NaNAfter(Objective):
    """EDM loss that turns NaN from the k-th call on."""

    def __init__(self, k):
        self.inner, self.k, self.calls = EDMLoss(), k, 0

    def __call__(self, net, images, labels, rng):
        self.calls += 1
        out = self.inner(net, images, labels, rng)
        if self.calls >= self.k:
            out = LossOutput(loss=out.loss * float("nan"), pairs=out.pairs, student_forward=out.student_forward,
                             student_backward=out.student_backward)
        return out


def test_nonfinite_loss_stops_the_stage_and_keeps_saved_checkpoints(tmp_path):
    net, data = tiny_setup()
    with pytest.raises(NonFiniteError, match=r"non-finite between 0.064 and 0.128 kimg.*ckpt-000000000064.pt"):
        train_stage(cfg(), net, NaNAfter(3), data, str(tmp_path))
    ckpts = sorted(os.listdir(tmp_path / "s" / "checkpoints"))
    assert ckpts == ["ckpt-000000000064.pt", "ckpt-000000000064.pt.sha256"]  # the good one and its hash, nothing after
    state = torch.load(tmp_path / "s" / "checkpoints" / ckpts[0], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["net"].values())
    assert not (tmp_path / "s" / "ema.safetensors").exists()


def test_changed_configuration_is_not_resumed(tmp_path, monkeypatch):
    net, data = tiny_setup()
    first = train_stage(cfg(), net, EDMLoss(), data, str(tmp_path))
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    net2, _ = tiny_setup()
    with pytest.raises(IdentityMismatch, match=r"stage 's' .* refusing to resume it with: stage\.lr: 0\.001 → 0\.002"):
        train_stage(cfg(lr=2e-3), net2, EDMLoss(), data, str(tmp_path))
    net3, _ = tiny_setup()
    with torch.no_grad():   # another initialisation is another run
        for p in net3.parameters():
            p.add_(1.0)
    with pytest.raises(IdentityMismatch, match="init_sha256"):
        train_stage(cfg(), net3, EDMLoss(), data, str(tmp_path))
    assert {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()} == before  # nothing touched
    # a rerun of the finished stage with the same configuration trains nothing and returns the same EMA
    calls, real = [], EDMLoss.__call__
    monkeypatch.setattr(EDMLoss, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    net4, _ = tiny_setup()
    again = train_stage(cfg(), net4, EDMLoss(), data, str(tmp_path))
    assert calls == [] and again.counters == first.counters and again.pairs_seen == first.pairs_seen
    a, b = first.ema.state_dict(), again.ema.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(first.net.state_dict().values(), again.net.state_dict().values()))




@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cmt_stage_on_gpu_follows_the_cpu_run(tmp_path):
    """A CMT stage on CUDA — CUDA-graph teacher, fused kernels, fp32 and then bf16 autocast — against the same
    stage on the CPU: the fp32 losses agree to TF32 rounding (cuDNN's default for convolutions), the bf16 ones to a
    few per cent, and every logged loss is finite."""
    from engine.objectives import CMT
    from engine.precond import CMPrecond

    def run(device, bf16, out):
        torch.manual_seed(0)
        teacher = EDMPrecond(build_network("digits-ddpmpp", img_resolution=8, model_channels=8, dropout=0.0))
        torch.manual_seed(1)
        student = CMPrecond(build_network("digits-ddpmpp", img_resolution=8, model_channels=8, dropout=0.1))
        images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
        c = cfg(total_kimg=0.128, batch_size=32, log_kimg=0.032, ckpt_kimg=0.128, bf16=bf16)
        objective = CMT(teacher.to(device), trajectories_per_batch=2, distance="squared_l2")
        train_stage(c, student.to(device), objective, TensorSource(images), str(out), device=device)
        return [json.loads(l)["loss"] for l in open(out / "s" / "log.jsonl")]

    cpu = run("cpu", False, tmp_path / "cpu")
    fp32 = run("cuda", False, tmp_path / "fp32")
    bf16 = run("cuda", True, tmp_path / "bf16")
    assert len(cpu) == len(fp32) == len(bf16) == 4
    assert all(torch.isfinite(torch.tensor(v)).all() for v in (cpu, fp32, bf16))
    torch.testing.assert_close(torch.tensor(fp32), torch.tensor(cpu), rtol=1e-2, atol=0)
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(cpu), rtol=5e-2, atol=0)
