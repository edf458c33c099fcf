"""Training the latent VGG of E-LatentLPIPS (docs/spec/edm2_latent.md §6.5; the CMT authors'
`imagenet512/train_latent_vgg.py`): VGG16_Latent_GN (engine/perceptual/elatentlpips.py `LatentVGG`) from scratch as an
ImageNet classifier on EDM2 final latents, a fresh posterior sample of every stored latent each time it is drawn,
no other augmentation; SGD momentum 0.9, weight decay 1e-4 on every parameter, batch 256, lr 0.1 × 0.1 every 30
epochs, 100 epochs, float32. recipes/imagenet512_latent_vgg.py holds the numbers.

Top-1 accuracy is logged at every evaluation on the validation latents (`--val`, an EDM2-format latent dataset of
ImageNet's validation split) or, without them, on a held-out fraction of the training latents that is then never
trained on. The output `<out>/latent_vgg16.safetensors` is the network's state dict under the reference's names —
the file E-LatentLPIPS reads (it takes `features.*`; the classifier is kept for further use).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from engine import dist
from engine.checkpoints.files import atomic_write
from engine.data import ImageDataset, write_latent_dataset
from engine.data.sampler import LatentSource, Subset
from engine.errors import EngineError
from engine.networks.latent_vgg import LatentVGG
from engine.objectives import Classification, LatentPosterior
from engine.objectives.classification import top1
from engine.perceptual.elatentlpips import LATENT_VGG_FILE
from engine.pipelines.recipe import Run, missing_input, parse_flags, stop_if_missing
from engine.training.stage_config import StageConfig

IMAGENET_TRAIN = 1_281_167


@dataclasses.dataclass
class LatentVGGSettings:
    num_classes: int = 1000
    latent_resolution: int = 64
    batch_size: int = 256
    epochs: int = 100
    lr: float = 0.1
    lr_step_epochs: int = 30              # × lr_gamma at epochs 30, 60, 90
    lr_gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4            # on every parameter, GroupNorm and biases included (torch's SGD)
    train_images: int = IMAGENET_TRAIN    # an epoch is ⌊train_images / batch⌋ iterations, as a DataLoader drops
    holdout: float = 0.01                 # without --val: this fraction of the training latents, never trained on
    eval_epochs: float = 1.0
    ckpt_epochs: float = 1.0
    hidden: int = 4096                    # the classifier's width (the trunk does not depend on it)

    @property
    def epoch_kimg(self) -> float:
        return (self.train_images // self.batch_size) * self.batch_size / 1000


def smoke_settings(s: LatentVGGSettings) -> LatentVGGSettings:
    return dataclasses.replace(s, num_classes=4, latent_resolution=16, batch_size=8, epochs=3, lr_step_epochs=2, lr=0.01,
                               train_images=16, holdout=0.25, hidden=64)


def _smoke_latents(path: str, s: LatentVGGSettings, n: int = 24, seed: int = 0) -> str:
    """Separable classes: each class shifts the latent mean of one channel."""
    import numpy as np
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % s.num_classes
    r = s.latent_resolution
    mean = rng.normal(0, 1, size=(n, 4, r, r))
    mean[np.arange(n), labels % 4] += 3.0
    std = rng.uniform(0.05, 0.2, size=mean.shape)
    if dist.rank() == 0 and not os.path.exists(path):
        write_latent_dataset(path, np.concatenate([mean, std], 1).astype(np.float32), labels)
    dist.barrier()
    return path


def run_latent_vgg(doc: str, settings: LatentVGGSettings, name: str, argv=None) -> dict:
    args = parse_flags(doc, argv, default_out=f"runs/{name}", extra={"--val": dict(
        default=None, help="EDM2-format latents of ImageNet's validation split, for top-1 (default: a held-out "
                           "fraction of --data)")})
    val = args.val
    s = smoke_settings(settings) if args.smoke else settings
    if not args.smoke:
        stop_if_missing(name, [missing_input("--data", args.data, "EDM2's ImageNet-512 latent dataset (img512-sd.zip: "
                                             "dataset_tool.py convert --resolution=512x512 "
                                             "--transform=center-crop-dhariwal, then encode)")],
                        "--val adds the validation split encoded the same way.")
    if val is not None and not os.path.exists(val):
        raise SystemExit(f"--val {val}: not found")
    run = Run(args, name, dataclasses.asdict(s), inputs=dict(val=val) if val else None)
    if args.dry_run:
        run.record(identity=False)
        return {}
    cfg = StageConfig(name="latent_vgg", total_kimg=s.epochs * s.epoch_kimg, batch_size=s.batch_size, lr=s.lr,
                      optimizer="sgd", momentum=s.momentum, weight_decay=s.weight_decay, lr_schedule="step",
                      lr_step_kimg=s.lr_step_epochs * s.epoch_kimg, lr_step_gamma=s.lr_gamma, ema_beta=0.0,
                      log_kimg=s.epoch_kimg / 10, ckpt_kimg=s.ckpt_epochs * s.epoch_kimg,
                      eval_kimg=s.eval_epochs * s.epoch_kimg, seed=args.seed, bf16=False)
    run.plan(cfg)                  # the budget at this --kimg-scale, before the smoke latents are written
    data_path = _smoke_latents(os.path.join(args.out, "smoke-latents.zip"), s) if args.smoke else args.data
    train = LatentSource(ImageDataset(data_path, use_labels=True))
    _check(train.dataset, s)
    if val:
        held, held_idx = LatentSource(ImageDataset(val, use_labels=True)), None
        _check(held.dataset, s)
        held_idx = list(range(len(held)))
        source = train
    else:                          # a fixed, seeded split of the training latents
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234)).tolist()
        k = max(1, round(s.holdout * len(train)))
        if k >= len(train):
            raise EngineError(f"holdout {s.holdout} leaves no training latents out of {len(train)}")
        held, held_idx, source = train, sorted(perm[:k]), Subset(train, sorted(perm[k:]))
    device = run.device

    def evaluate(net):
        return {"top1": top1(net, held, held_idx, device, batch=s.batch_size)}

    torch.manual_seed(args.seed)
    net = LatentVGG(num_classes=s.num_classes, hidden=s.hidden)
    res = run.stage("latent_vgg", "pre", cfg, net, LatentPosterior(Classification(), convention="edm2"), source,
                    evaluate=evaluate)
    final = res.eval_history[-1]["top1"] if res.eval_history else None
    out = os.path.join(args.out, LATENT_VGG_FILE)
    if run.lead:                   # the last weights (EMA β = 0 is the network itself)
        from safetensors.torch import save
        data = save({k: v.detach().cpu().contiguous() for k, v in res.ema.state_dict().items()})
        atomic_write(out, lambda f: f.write(data))
        print(f"latent VGG: top-1 {final} on {'the validation latents' if val else 'the held-out latents'}; "
              f"E-LatentLPIPS reads {out}", flush=True)
    run.results["runs"]["latent_vgg"]["top1"] = final
    run.results["runs"]["latent_vgg"]["weights"] = out
    return run.finish([], [])


def _check(dataset, s: LatentVGGSettings) -> None:
    want = [8, s.latent_resolution, s.latent_resolution]
    if not dataset.is_latent or list(dataset.image_shape) != want or not dataset.has_labels:
        raise EngineError(f"{dataset.path}: expected labelled SD-VAE latent moments {want} (EDM2's encode), got "
                          f"{'latents' if dataset.is_latent else 'images'} {list(dataset.image_shape)}"
                          f"{'' if dataset.has_labels else ' without labels'}")
    if dataset.label_dim > s.num_classes:
        raise EngineError(f"{dataset.path} has {dataset.label_dim} classes; the classifier has {s.num_classes}")
