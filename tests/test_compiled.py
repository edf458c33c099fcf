"""Regional compilation (engine/training/compiled.py): the students' forwards trace without a graph break (dropout
pinned
to the step included), training with compiled blocks equals eager training — the same dropout masks — and a
compiled run's checkpoint resumes eagerly (and the other way round). The AOT-autograd backend checks capture and
the generated backward without code generation; the inductor comparison is heavy (C++ compilation on CPU)."""
from __future__ import annotations

import glob
import os

import pytest
import torch
import torch._dynamo as dynamo

from engine.data.sampler import TensorSource
from engine.networks import DiT
from engine.networks.configs import build_network
from engine.networks.dropout import dropout_generator
from engine.objectives import ECT
from engine.pipelines.edm2_presets import build_edm2_preset
from engine.precond import CMPrecond
from engine.training.loop import train_stage
from engine.training.stage_config import StageConfig


def students():
    torch.manual_seed(0)
    s = torch.rand(2) + 0.5
    yield "ddpm++", CMPrecond(build_network("digits-ddpmpp"), sigma_data=0.5), (torch.randn(2, 1, 8, 8), s)
    yield "adm", build_network("imagenet64-adm", model_channels=32, channel_mult=[1, 2], num_blocks=1,
                               attn_resolutions=[8], img_resolution=16), (
        torch.randn(2, 3, 16, 16), s, torch.nn.functional.one_hot(torch.tensor([1, 2]), 1000).float())
    yield "edm2", build_edm2_preset("edm2-tiny", use_fp16=False, logvar_channels=None, dropout=0.2), (
        torch.randn(2, 3, 16, 16), s, torch.tensor([1, 2]))
    yield "dit", DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                     num_classes=10), (torch.randn(2, 4, 8, 8), torch.rand(2), torch.rand(2), torch.tensor([1, 2]))


@pytest.mark.parametrize("name", ["ddpm++", "adm", "edm2", "dit"])
def test_student_forward_has_no_graph_break_in_training(name):
    net, args = next((n, a) for k, n, a in students() if k == name)
    net.train()
    dynamo.reset()
    with dropout_generator(1):
        e = dynamo.explain(net)(*args)
    assert e.graph_break_count == 0, [str(b.reason)[:200] for b in e.break_reasons]


def run(tmp, how, kimg=0.096, remove_after=None):
    torch.manual_seed(0)
    net = CMPrecond(build_network("digits-ddpmpp"), sigma_data=0.5)        # dropout 0.1: masks matter
    g = torch.Generator().manual_seed(0)
    data = TensorSource(torch.rand(64, 1, 8, 8, generator=g) * 2 - 1)
    cfg = StageConfig(name="s", total_kimg=kimg, batch_size=16, lr=1e-3, ema_beta=0.9, log_kimg=0.032,
                      ckpt_kimg=0.048, compile=how)
    return train_stage(cfg, net, ECT(q=4), data, str(tmp), torch.device("cpu"))


def test_compiled_training_equals_eager_and_resumes_across_modes(tmp_path):
    dynamo.reset()
    eager = run(tmp_path / "eager", None)
    compiled = run(tmp_path / "compiled", "aot_eager")
    from engine.dist import fsdp_units
    units = fsdp_units(compiled.net)
    assert units and all(u._compiled_call_impl is not None for u in units)      # the blocks ran compiled
    assert all(u._compiled_call_impl is None for u in fsdp_units(compiled.ema))  # the EMA copy is eager
    for (k, a), b in zip(eager.net.state_dict().items(), compiled.net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)
    # the compiled run stopped after 48 images resumes eagerly, and the eager one compiled: both end as the eager run
    # (its last checkpoint and its release gone: a stage whose release is in place is finished, engine/training/loop.py)
    for d, how in ((tmp_path / "compiled", None), (tmp_path / "eager", "aot_eager")):
        for f in glob.glob(str(d / "s" / "checkpoints" / "ckpt-000000000096*")):
            os.remove(f)
        os.remove(d / "s" / "ema.safetensors")
        again = run(d, how)
        assert again.pairs_seen == 96
        for (k, a), b in zip(eager.net.state_dict().items(), again.net.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=k)


def test_unknown_compile_mode_is_named():
    with pytest.raises(Exception, match="compile"):
        StageConfig(name="s", total_kimg=1, batch_size=1, lr=1e-3, compile="fast")


@pytest.mark.heavy
def test_inductor_training_equals_eager(tmp_path):
    dynamo.reset()
    eager = run(tmp_path / "eager", None)
    compiled = run(tmp_path / "inductor", "default")
    for (k, a), b in zip(eager.net.state_dict().items(), compiled.net.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)


def test_every_block_of_a_unet_pair_is_compiled(caplog):
    """A CIFAR-10 DDPM++ student and teacher (dozens of UNetBlock instances of differing structure, one code object):
    no block falls back to eager because dynamo's per-code recompile limit ran out."""
    import logging

    from engine.precond import EDMPrecond
    from engine.training.compiled import compile_regions
    dynamo.reset()
    torch.manual_seed(0)
    nets = [cls(build_network("cifar10-ddpmpp", model_channels=16, img_resolution=16), sigma_data=0.5)
            for cls in (CMPrecond, EDMPrecond)]
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for net in nets:
            units = compile_regions(net, "eager")
            assert len(units) > 8
            with dropout_generator(0):
                net(torch.randn(2, 3, 16, 16), torch.rand(2) + 0.5).sum().backward()
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
