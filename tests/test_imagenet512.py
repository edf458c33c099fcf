"""The ImageNet-512 headline (docs/spec/edm2_latent.md §7, §8, §10; engine/pipelines/imagenet512.py): the ECD loss
against §8 steps 1–6 written out on a tiny MP-UNet pair, the mid-training loss's per-pair randomness (uniform
labels, E-LatentLPIPS transforms) independent of the world size, and the recipe's --smoke pipeline, its resume and
its one message of missing files."""
from __future__ import annotations

import math
import os

import pytest
import torch

from engine.guidance import GuidedDenoiser
from engine.objectives import CMT, ECD, StepRNG, perceptual
from engine.pipelines.edm2_presets import build_edm2_preset, with_unit_gains

D = torch.float64


def tiny(res=16, seed=0, **kw):
    torch.manual_seed(seed)
    net = with_unit_gains(build_edm2_preset("edm2-tiny", img_resolution=res, img_channels=4, **kw))
    return net.double().eval()


def test_ecd_loss_equals_section8_steps_1_to_6():
    """ECD as released: t = exp(−0.8 + 1.6ξ); r = t(1 − (1 + 8 sigmoid(−t))/1024) ≥ 0; x_t = y + tε; a Heun step
    of D̃ = D_g + w(D_main − D_g); f_t with gradients, f_r of the same online weights without; loss =
    (sqrt(‖f_t − f_r‖² + c²) − c)(1/t² + 1/σ_d²) — each step computed here from §8's text."""
    main, guide = tiny(seed=1), tiny(seed=2)
    student = tiny(seed=3, logvar_channels=None, use_fp16=False).train()
    w, c, sd = 2.05, 0.06, 0.5
    y = torch.randn(4, 4, 16, 16, dtype=D) * 0.5
    labels = torch.tensor([0, 3, 7, 9])
    ecd = ECD(main, solver="heun", guide=guide, guidance=w, P_mean=-0.8, P_std=1.6, q=1024, c=c)
    out = ecd(student, y, labels, StepRNG.for_step(5, 0, 0))
    ecd_g = ECD(GuidedDenoiser(main, guide, w), solver="heun", P_mean=-0.8, P_std=1.6, q=1024, c=c)
    out_g = ecd_g(student, y, labels, StepRNG.for_step(5, 0, 0))   # the guided pair as one teacher: the same

    rng = StepRNG.for_step(5, 0, 0)                                   # the same stream, drawn in the same order
    t = torch.exp(-0.8 + 1.6 * rng.randn([4], "cpu", D))
    r = torch.clamp(t * (1 - (1 + 8 / (1 + torch.exp(t))) / 1024), min=0)
    eps = rng.randn(y.shape, "cpu", D)
    x_t = y + t.reshape(-1, 1, 1, 1) * eps

    def guided(x, s):
        g = guide(x, s, labels)
        return g + w * (main(x, s, labels) - g)
    tb, rb = t.reshape(-1, 1, 1, 1), r.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        d = (x_t - guided(x_t, t)) / tb
        x1 = x_t + (rb - tb) * d
        d1 = (x1 - guided(x1, r)) / rb
        x_r = x_t + (rb - tb) * (d + d1) / 2
        f_r = student(x_r, r, labels)
    f_t = student(x_t, t, labels)
    loss = (torch.sqrt(((f_t - f_r) ** 2).sum(dim=(1, 2, 3)) + c * c) - c) * (1 / t ** 2 + 1 / sd ** 2)
    assert (r > 0).all() and ((t - r) / t).min() > 1 / 1024 and ((t - r) / t).max() < 9 / 1024
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(out_g.loss, loss, rtol=1e-10, atol=0)
    assert out.teacher_nfe == 4 * 4 and out_g.teacher_nfe == 4 * 4            # Heun: 2 × (main + guide) per sample
    out.loss.sum().backward()                                                 # gradients through f_t only
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad and p.ndim > 0)
    # with the published lr discrepancy aside, the weight is 1/t² + 4 (σ_d = 0.5)
    assert math.isclose(float(ecd.weight(torch.tensor(2.0), None)), 0.25 + 4, rel_tol=1e-12)


def test_mid_training_randomness_does_not_depend_on_the_world_size():
    """CMT from 80ε with uniform labels and E-LatentLPIPS: two ranks holding one trajectory each get, pair by pair,
    the losses of one process holding both — the labels, the start noise and every pair's transform are drawn for
    the global batch in CMT's step-major layout (StepRNG.grouped)."""
    from engine.networks.latent_vgg import LatentVGG
    from engine.perceptual.elatentlpips import ELatentLPIPS
    torch.manual_seed(0)
    lpips = ELatentLPIPS(vgg_state_dict=LatentVGG().state_dict())
    teacher = tiny(res=32, seed=1, label_dim=10).float()
    student = tiny(res=32, seed=2, label_dim=10, logvar_channels=None, use_fp16=False).float()
    seen = []

    def recording(x, s, labels=None):
        seen.append(labels.clone())
        return teacher(x, s, labels)
    cmt = CMT(recording, nfe=4, trajectories_per_batch=2, prior="noise", labels="uniform", num_classes=10,
              distance=perceptual(lpips), graphs=False)
    y = torch.zeros(2, 4, 32, 32)
    with torch.no_grad():
        one = cmt(student, y, torch.tensor([0, 0]), StepRNG.for_step(3, 0, 64)).loss.reshape(4, 2)
        labels_one = seen[0]
        ranks = [cmt(student, y[:1], torch.tensor([0]), StepRNG.for_step(3, rank, 64, world=2)).loss
                 for rank in (0, 1)]
    torch.testing.assert_close(torch.stack(ranks, dim=1), one, rtol=1e-5, atol=1e-7)
    assert torch.equal(torch.cat([seen[-8], seen[-4]]), labels_one)           # each rank's first teacher call
    assert not torch.equal(labels_one, torch.tensor([0, 0]))                  # the data's labels were not used
    assert one.std() > 0                                                      # pairs see different transforms
    with pytest.raises(ValueError, match="num_classes"):
        CMT(teacher, labels="uniform", distance="l2")


# ---- the recipe -----------------------------------------------------------------------------------------------------

def load_recipe():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes",
                        "imagenet512_cmt_ecd.py")
    spec = importlib.util.spec_from_file_location("imagenet512_cmt_ecd", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_missing_inputs_are_one_message_naming_each_file(tmp_path, monkeypatch):
    for var in ("ENGINE_FID_STATS", "ENGINE_INCEPTION_WEIGHTS", "ENGINE_DINOV2_WEIGHTS", "ENGINE_WEIGHTS_DIR",
                "ENGINE_VAE_WEIGHTS", "ENGINE_LATENT_VGG_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    mod = load_recipe()
    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(SystemExit) as e:
        mod.run_latent512(mod.__doc__, mod.SETTINGS, "imagenet512_cmt_ecd",
                          ["--out", str(tmp_path / "x"), "--device", "cpu", "--weights", str(weights)])
    text = str(e.value)
    for name in ("--data: the ImageNet-512 latent dataset", "edm2-img512-xxl-0939524-0.070.pkl",
                 "edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.pkl", "latent_vgg16.safetensors",
                 "diffusion_pytorch_model.safetensors", "img512.pkl", "inception-2015-12-05",
                 "dinov2_vitl14_pretrain.pth", "https://nvlabs-fi-cdn.nvidia.com/edm2/"):
        assert name in text, name
    assert text.count("\n  ") == 9                                            # one line per missing input
    assert not os.path.exists(tmp_path / "x")                                 # nothing written


# The recipe's --smoke end to end (a checkpoint and a release per stage, the teacher accounting, the FID and its
# detector record, results.json, and `engine.evaluate` reproducing the FIDs from the release alone) is one run with
# all of those assertions, under torchrun and then resumed on one process: tests/test_distributed.py
# test_imagenet512_headline_runs_under_torchrun_and_resumes_on_one_process.
