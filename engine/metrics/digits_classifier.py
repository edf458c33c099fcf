"""Sample-quality metrics for the digits runs: a small CNN classifier trained once on the embedded digits.

There is no Inception network offline, so the digits runs are scored by a classifier of their own data:

* **FD** — the Fréchet distance (`frechet.py`) between the classifier's penultimate-layer features (128-d,
  after the ReLU, like Inception's pool features) of generated samples and of the real digits. Reference
  statistics are over all 1797 images (EDM's convention: the full dataset), unbiased covariance.
* **class histogram** — argmax predictions of the samples, and their total-variation distance and
  KL(samples ‖ ·) to the uniform distribution and to the data's class frequencies (the digits are ~uniform).
  Mode dropping shows up here before it moves the FD much.

Resolution. Samples are [N, 1, R, R] in [−1, 1] for any R that is a multiple of 8 (8, 16, 32 in the recipes).
They are clamped to [−1, 1] (as the uint8 conversion of image metrics would) and average-pooled by R/8 to the
8×8 source resolution before the classifier. The digits are upsampled from 8×8 by nearest repetition, which
average pooling undoes exactly, so the real statistics are the same at every resolution and one classifier
trained once at 8×8 scores every run on the same feature space; detail a model adds above 8×8 is averaged
away, which is the point: the data has none. (Bilinear upsampling is not undone exactly; runs trained on it
pass their own real images as `reference_images`.)

Caching. The classifier is trained deterministically (fixed seed, one thread, AdamW over the 1438-image
train split for 20 epochs: a few seconds on CPU, ~98% test accuracy) and saved, with its test accuracy and
the reference statistics, as a plain state-dict file `digits_classifier-<hash of config>.pt` in `cache_dir`,
else `$ENGINE_CACHE_DIR`, else `~/.cache/cmt-engine`. It is written atomically and read with
`weights_only=True`; a missing, corrupt or mismatched file is retrained and rewritten (with a warning), never
a crash.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.checkpoints.files import CheckpointError, load_checkpoint, save_checkpoint
from engine.data.digits import DIGITS_NUM_CLASSES, digits
from engine.metrics.frechet import feature_statistics, frechet_distance

__all__ = ["DigitsClassifierConfig", "DigitsClassifier", "DigitsMetrics", "default_cache_dir",
           "digits_classifier_path", "load_digits_classifier", "train_digits_classifier", "to_classifier_input",
           "class_histogram"]

CACHE_ENV = "ENGINE_CACHE_DIR"
_FORMAT_VERSION = 1   # bump when the network or the training code changes: old cache files are then retrained


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """Everything that determines the trained weights; its hash names the cache file."""
    channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3                # AdamW, cosine decay to 0
    weight_decay: float = 1e-4
    max_shift: int = 0              # random ±max_shift-pixel translations (augmentation; off: it cost accuracy)
    seed: int = 0
    split_seed: int = 0             # the digits train/test split (engine.data.digits)
    test_fraction: float = 0.2

    def key(self) -> str:
        blob = json.dumps({"format": _FORMAT_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class DigitsClassifier(nn.Module):
    """8×8 → conv-conv-pool-conv-pool → 128-d features → 10 logits. Input [N, 1, 8, 8] in [−1, 1]."""

    def __init__(self, channels=(16, 32, 64), feature_dim: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3 * 2 * 2, feature_dim)
        self.head = nn.Linear(feature_dim, DIGITS_NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features [N, feature_dim] (post-ReLU)."""
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)        # 4×4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)        # 2×2
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """[N, 1, R, R] samples (R a multiple of 8) → float32 [N, 1, 8, 8]: clamp to [−1, 1], average-pool by R/8."""
    x = torch.as_tensor(images).detach()
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3] or x.shape[2] % 8 or x.shape[2] == 0:
        raise ValueError(f"expected digits-shaped samples [N, 1, R, R] with R a multiple of 8, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("samples have non-finite values")
    x = x.to(torch.float32).clamp(-1.0, 1.0)
    factor = x.shape[2] // 8
    return F.avg_pool2d(x, factor) if factor > 1 else x


# ---- cache ---------------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "cmt-engine"


def digits_classifier_path(cache_dir=None, config: DigitsClassifierConfig = DigitsClassifierConfig()) -> Path:
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"digits_classifier-{config.key()}.pt"


# ---- training ------------------------------------------------------------------------------------------------

def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ±max_shift pixels, filling with background (−1)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(n, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(n, h, w)
    return pad[torch.arange(n)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def _accuracy(model: DigitsClassifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model(x).argmax(dim=1) == labels).double().mean())


@torch.no_grad()
def _features(model: DigitsClassifier, x8: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([model.features(x8[i:i + batch]) for i in range(0, x8.shape[0], batch)]).double()


@contextlib.contextmanager
def _single_thread():
    """One intra-op thread: the weights then do not depend on the machine's thread count, and the tiny
    convolutions run ~10× faster than two threads when other processes share the cores (OpenMP barriers)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_digits_classifier(config: DigitsClassifierConfig = DigitsClassifierConfig()) -> tuple[DigitsClassifier, dict]:
    """Train on the digits train split, single-threaded and seeded (the same weights for the same config and
    PyTorch build); returns the model in eval mode and info {test_accuracy, train_seconds, ref_mu, ref_sigma,
    ref_class_freq, num_reference}."""
    with _single_thread():
        return _train(config)


def _train(config: DigitsClassifierConfig) -> tuple[DigitsClassifier, dict]:
    t0 = time.perf_counter()
    x_tr, y_tr = digits(8, split="train", seed=config.split_seed, test_fraction=config.test_fraction)
    x_te, y_te = digits(8, split="test", seed=config.split_seed, test_fraction=config.test_fraction)
    g = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):           # module init uses the global RNG; leave the caller's alone
        torch.manual_seed(config.seed)
        model = DigitsClassifier(config.channels, config.feature_dim)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(x_tr.shape[0] / config.batch_size)
    total = config.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total)))
    model.train()
    for _ in range(config.epochs):
        perm = torch.randperm(x_tr.shape[0], generator=g)
        for i in range(0, x_tr.shape[0], config.batch_size):
            idx = perm[i:i + config.batch_size]
            xb = _random_shift(x_tr[idx], config.max_shift, g)
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    train_seconds = time.perf_counter() - t0

    x_all, y_all = digits(8)
    mu, sigma = feature_statistics(_features(model, x_all))
    info = {
        "test_accuracy": _accuracy(model, x_te, y_te),
        "train_seconds": train_seconds,
        "ref_mu": torch.from_numpy(mu),
        "ref_sigma": torch.from_numpy(sigma),
        "ref_class_freq": torch.bincount(y_all, minlength=DIGITS_NUM_CLASSES).double() / y_all.numel(),
        "num_reference": int(y_all.numel()),
    }
    return model, info


def load_digits_classifier(cache_dir=None, config: DigitsClassifierConfig = DigitsClassifierConfig(),
                           retrain: bool = False) -> tuple[DigitsClassifier, dict]:
    """The cached classifier (eval mode, CPU) and its info; trains and caches it when the file is missing,
    corrupt, or does not match `config` (or when retrain=True). info["loaded_from_cache"] says which."""
    path = digits_classifier_path(cache_dir, config)
    # Built from the caller's global RNG on every path, loaded or trained: constructing the metrics then advances
    # that RNG by the same amount whether the cache was warm or cold, so a recipe's later network initialisation —
    # and every result it prints — does not depend on whether this machine had trained the classifier before.
    # (The trained weights themselves come from config.seed, under fork_rng, in _train.)
    model = DigitsClassifier(config.channels, config.feature_dim)
    if path.exists() and not retrain:
        try:
            state = load_checkpoint(path)
            if state.get("config_key") != config.key():
                raise CheckpointError(f"{path}: written for another configuration")
            model.load_state_dict(state["model"])
            info = {k: state[k] for k in ("test_accuracy", "train_seconds", "ref_mu", "ref_sigma",
                                          "ref_class_freq", "num_reference")}
            d = config.feature_dim
            if info["ref_mu"].shape != (d,) or info["ref_sigma"].shape != (d, d):
                raise CheckpointError(f"{path}: reference statistics have the wrong shape")
            return model.eval().requires_grad_(False), {**info, "path": str(path), "loaded_from_cache": True}
        except (CheckpointError, KeyError, RuntimeError, TypeError, AttributeError) as e:
            warnings.warn(f"digits classifier cache unusable, retraining: {e}", RuntimeWarning, stacklevel=2)
    trained, info = train_digits_classifier(config)
    model.load_state_dict(trained.state_dict())
    model.eval().requires_grad_(False)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"format": _FORMAT_VERSION, "config_key": config.key(),
                           "config": json.dumps(dataclasses.asdict(config), sort_keys=True),
                           "model": model.state_dict(), **info})
    return model, {**info, "path": str(path), "loaded_from_cache": False}


# ---- metrics -------------------------------------------------------------------------------------------------

def class_histogram(predictions: torch.Tensor, reference_freq: torch.Tensor | None = None) -> dict:
    """Counts and frequencies of predicted classes; TV and KL(samples ‖ q) for q uniform and, if given, q the
    data's class frequencies. KL(p ‖ q) is finite whenever q > 0 (both q's are), even with dropped modes."""
    counts = torch.bincount(torch.as_tensor(predictions).long().reshape(-1), minlength=DIGITS_NUM_CLASSES)
    p = counts.double() / counts.sum().clamp(min=1)

    def tv_kl(q):
        q = q.double() / q.double().sum()
        kl = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum()
        return float(0.5 * (p - q).abs().sum()), float(kl)

    out = {"counts": counts.tolist(), "freq": p.tolist()}
    out["tv_uniform"], out["kl_uniform"] = tv_kl(torch.full_like(p, 1.0 / DIGITS_NUM_CLASSES))
    if reference_freq is not None:
        out["tv_data"], out["kl_data"] = tv_kl(torch.as_tensor(reference_freq))
    return out


class DigitsMetrics:
    """FD in classifier-feature space and class-histogram distances for digits samples [N, 1, R, R] in [−1, 1].

        metrics = DigitsMetrics()                      # loads or trains the cached classifier
        metrics(samples)   # {'fd': …, 'tv_uniform': …, 'kl_uniform': …, 'tv_data': …, 'kl_data': …, 'freq': […]}
    """

    def __init__(self, cache_dir=None, config: DigitsClassifierConfig = DigitsClassifierConfig(),
                 retrain: bool = False, batch_size: int = 1024, reference_images: torch.Tensor | None = None):
        """reference_images: real images to take the reference statistics from instead of the cached ones
        over all 1797 nearest-upsampled digits (e.g. `digits(16, interpolation="bilinear")[0]` for a run
        trained on bilinear-upsampled data, whose average-pooled images are blurred relative to the source)."""
        self.model, self.info = load_digits_classifier(cache_dir, config, retrain)
        self.config = config
        self.batch_size = batch_size
        self.ref_mu = self.info["ref_mu"].numpy()
        self.ref_sigma = self.info["ref_sigma"].numpy()
        self.ref_class_freq = self.info["ref_class_freq"]
        self._train_stats = None
        if reference_images is not None:
            self.ref_mu, self.ref_sigma = self.statistics(reference_images)

    @property
    def test_accuracy(self) -> float:
        return float(self.info["test_accuracy"])

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float64 [N, feature_dim] penultimate features of samples at any supported resolution."""
        return _features(self.model, to_classifier_input(images).cpu(), self.batch_size)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        x = to_classifier_input(images).cpu()
        return torch.cat([self.model(x[i:i + self.batch_size]).argmax(dim=1)
                          for i in range(0, x.shape[0], self.batch_size)])

    def statistics(self, images: torch.Tensor, unbiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(μ, Σ) of the samples' features, float64."""
        return feature_statistics(self.features(images), unbiased)

    def frechet_distance(self, images: torch.Tensor, reference: tuple | None = None) -> float:
        """FD between the samples' feature statistics and `reference` (μ, Σ) (default: the reference data)."""
        mu, sigma = self.statistics(images)
        ref_mu, ref_sigma = reference if reference is not None else (self.ref_mu, self.ref_sigma)
        return frechet_distance(mu, sigma, ref_mu, ref_sigma)

    def class_histogram(self, images: torch.Tensor) -> dict:
        return class_histogram(self.predict(images), self.ref_class_freq)

    def __call__(self, images: torch.Tensor) -> dict:
        """FD and class-histogram metrics of one sample set; features are computed once."""
        x = to_classifier_input(images).cpu()
        feats, preds = [], []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.batch_size):
                f = self.model.features(x[i:i + self.batch_size])
                feats.append(f.double())
                preds.append(self.model.head(f).argmax(dim=1))
        mu, sigma = feature_statistics(torch.cat(feats))
        out = {"fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)}
        out.update(class_histogram(torch.cat(preds), self.ref_class_freq))
        return out

    def heldout_floor(self) -> dict:
        """What a perfect model of the training digits would score: the FD of the classifier's held-out split
        (359 digits the embedded recipes never train on: `digits_source` serves the train split) against the
        training split's statistics. Its sample count is smaller than a run's 1,000, and FD's estimate is biased
        upward by about tr(Σ)/n, so `against_training` scores a model's samples at the same count for a like-for-like
        comparison. {'fd', 'n'}."""
        held, _ = digits(8, split="test", test_fraction=self.config.test_fraction, seed=self.config.split_seed)
        return dict(fd=self.against_training(held), n=int(held.shape[0]))

    def against_training(self, images: torch.Tensor) -> float:
        """FD of `images` against the training split's feature statistics (the floor's reference)."""
        if self._train_stats is None:
            train, _ = digits(8, split="train", test_fraction=self.config.test_fraction, seed=self.config.split_seed)
            self._train_stats = self.statistics(train)
        return self.frechet_distance(images, reference=self._train_stats)

    def few_step(self, sample, steps=(1, 2)) -> dict:
        """The embedded recipes' evaluation record: {fd_<k>step, class_tv_<k>step} of `sample(k)` (k-step
        samples in [−1, 1]) for each k in `steps`."""
        out = {}
        for k in steps:
            m = self(sample(k))
            out[f"fd_{k}step"], out[f"class_tv_{k}step"] = m["fd"], m["tv_data"]
        return out
