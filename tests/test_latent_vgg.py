"""Training the latent VGG (docs/spec/edm2_latent.md §6.5; engine/pipelines/latent_vgg.py): SGD with the step
schedule as torch's reference optimizer computes it, top-1 against a direct count, the classification objective
learning separable latents, and the recipe's --smoke run, whose output E-LatentLPIPS loads and which resumes."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from engine.data import ImageDataset, write_latent_dataset
from engine.data.sampler import LatentSource, Subset
from engine.objectives import Classification, LatentPosterior, StepRNG
from engine.objectives.classification import top1
from engine.training.loop import train_stage
from engine.training.lr_schedules import learning_rate
from engine.training.stage_config import StageConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_step_schedule_is_the_reference_imagenet_schedule():
    epoch = 5004 * 256                                   # ⌊1 281 167 / 256⌋ iterations of 256
    lr = lambda n: learning_rate("step", n, lr=0.1, total_nimg=100 * epoch, step_nimg=30 * epoch)  # noqa: E731
    assert [lr(e * epoch) for e in (0, 29, 30, 59, 60, 90, 99)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.0001, 0.0001], rel=1e-12)
    assert lr(30 * epoch - 1) == 0.1
    with pytest.raises(Exception, match="lr_step_kimg"):
        StageConfig(name="x", total_kimg=1, batch_size=1, lr=0.1, optimizer="sgd", lr_schedule="step")
    with pytest.raises(Exception, match="momentum is SGD's"):
        StageConfig(name="x", total_kimg=1, batch_size=1, lr=0.1, optimizer="adam", momentum=0.9)


def separable(tmp_path, n=32, classes=4, r=8, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    mean = rng.normal(0, 1, size=(n, 4, r, r))
    mean[np.arange(n), labels] += 3.0
    std = np.full(mean.shape, 0.1)
    path = write_latent_dataset(tmp_path / "lat.zip", np.concatenate([mean, std], 1).astype(np.float32), labels)
    return LatentSource(ImageDataset(str(path), use_labels=True)), torch.as_tensor(labels)


class Pooled(torch.nn.Module):
    """A linear classifier on channel means: enough for the separable latents above."""

    def __init__(self, classes=4):
        super().__init__()
        self.init_kwargs = dict(classes=classes)
        self.fc = torch.nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def test_top1_counts_correct_predictions(tmp_path):
    source, labels = separable(tmp_path)
    net = Pooled()
    idx = list(range(3, 30, 2))
    from engine.objectives.latent import posterior_sample
    g = torch.Generator().manual_seed(0)
    m, _ = source.batch(torch.as_tensor(idx), "cpu")
    x = posterior_sample(m, torch.randn((len(idx), 4, 8, 8), generator=g), "edm2")
    want = float((net(x).argmax(1) == labels[idx]).float().mean())
    assert top1(net, source, idx, "cpu", batch=5) == pytest.approx(want, abs=1e-12)
    sub = Subset(source, [5, 1])
    assert torch.equal(sub.batch(torch.tensor([1]), "cpu")[1], labels[[1]])


def test_classification_on_posterior_samples_learns_separable_latents(tmp_path, monkeypatch):
    from engine.checkpoints import registry
    monkeypatch.setitem(registry.BACKBONES, "Pooled", Pooled)     # the loop releases what it trains
    source, _ = separable(tmp_path)
    net = Pooled()
    before = top1(net, source, list(range(32)), "cpu")
    cfg = StageConfig(name="cls", total_kimg=0.64, batch_size=16, lr=0.5, optimizer="sgd", momentum=0.9,
                      lr_schedule="step", lr_step_kimg=0.32, ema_beta=0.0, log_kimg=None, ckpt_kimg=None)
    res = train_stage(cfg, net, LatentPosterior(Classification(), convention="edm2"), source, str(tmp_path / "r"),
                      torch.device("cpu"))
    after = top1(res.ema, source, list(range(32)), "cpu")
    assert before < 0.75 and after == 1.0
    out = Classification()(net, torch.zeros(2, 4, 8, 8), torch.tensor([0, 1]), StepRNG.for_step(0, 0, 0))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(net(torch.zeros(2, 4, 8, 8)),
                                                                           torch.tensor([0, 1]), reduction="none"))


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_smoke_output_is_what_elatentlpips_loads_and_it_resumes(tmp_path, capsys):
    from engine.perceptual.elatentlpips import ELatentLPIPS, read_vgg_state
    mod = load("imagenet512_latent_vgg")
    out = str(tmp_path / "run")
    res = mod.run_latent_vgg(mod.__doc__, mod.SETTINGS, "imagenet512_latent_vgg", ["--smoke", "--out", out,
                                                                                     "--device", "cpu"])
    weights = os.path.join(out, "latent_vgg16.safetensors")
    assert res["runs"]["latent_vgg"]["weights"] == weights
    evals = [json.loads(x) for x in open(os.path.join(out, "latent_vgg", "latent_vgg", "log.jsonl"))
             if '"eval"' in x]
    assert [e["kimg"] for e in evals] == [0.016, 0.032, 0.048] and all(0 <= e["top1"] <= 1 for e in evals)
    state = read_vgg_state(weights)
    m = ELatentLPIPS(weights, augment=None)
    assert torch.equal(m.slices[0][0].weight, state["features.0.weight"])
    x, y = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    assert m(x, y) > 0
    capsys.readouterr()
    mod.run_latent_vgg(mod.__doc__, mod.SETTINGS, "imagenet512_latent_vgg", ["--smoke", "--out", out,
                                                                             "--device", "cpu"])
    assert "resuming stage 'latent_vgg'" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs:\n  --data: EDM2's ImageNet-512 latent dataset"):
        mod.run_latent_vgg(mod.__doc__, mod.SETTINGS, "imagenet512_latent_vgg", ["--out", str(tmp_path / "y"),
                                                                                 "--device", "cpu"])


def test_recipe_logs_top1_on_the_validation_latents_when_given(tmp_path, capsys):
    mod = load("imagenet512_latent_vgg")
    from engine.pipelines.latent_vgg import _smoke_latents, smoke_settings
    val = _smoke_latents(str(tmp_path / "val.zip"), smoke_settings(mod.SETTINGS), n=8, seed=5)
    out = str(tmp_path / "run")
    mod.run_latent_vgg(mod.__doc__, mod.SETTINGS, "imagenet512_latent_vgg", ["--smoke", "--out", out, "--device",
                                                                             "cpu", "--val", val])
    assert "on the validation latents" in capsys.readouterr().out
    ident = json.load(open(os.path.join(out, "identity.json")))
    assert "val" in ident["inputs"]                                  # the validation file is part of the identity
    evals = [json.loads(x) for x in open(os.path.join(out, "latent_vgg", "latent_vgg", "log.jsonl")) if '"eval"' in x]
    assert all(e["top1"] * 8 == round(e["top1"] * 8) for e in evals)  # fractions of the 8 validation latents
