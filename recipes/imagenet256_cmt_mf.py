"""CMT for Mean Flow on ImageNet 256×256 (SD-VAE latents 4×32×32), the paper's Table 4 pipeline (docs/spec/mf.md §4).

Reproduces: pre-train an MF-B/4 teacher with the post-training CFG settings (ω 0.2, κ 0.92, t ∈ [0, 0.75], so
ω' = 2.5; docs/spec/mf.md §1.6, §4.2) → CMT mid-training of MF-XL/2 from random weights on the teacher's 8-step
trajectories (4 trajectories × 28 pairs `nonadjacent28` = 112 pairs per iteration, 200k iterations, lr 1e-4
constant; §4.5) → Mean Flow post-training of XL/2 from the mid-trained EMA (the MF recipe with batch 64; §4.5).
All stages: Adam β (0.9, 0.95), constant lr 1e-4, EMA 0.9999, no gradient clipping, bf16 autocast on CUDA with the
Mean Flow JVP in the network's dtype outside autocast's reach (it runs under no_grad on the unwrapped module).
Paper: CMT-XL/2 1-NFE FID 3.34 in 760 A100-h total (38 h teacher + 135 h mid + 587 h post).
Settings the paper does not state, and the choice made (docs/spec/mf.md §4.5 marks them unresolved):
  teacher epochs: 80 (the MF-B/4 ablation schedule); post-training length: 93 epochs, i.e. the 587 A100-h of
  Table 4 at MF-XL/2's throughput per image (1520 A100-h for 240 epochs) — both are plain Config fields.
Sized for: a multi-GPU node (torchrun, FSDP2; docs/scaling.md); wall time not measured here (no GPU run has been made).
Needs: --data, an ImageNet-256 latent dataset in EDM2's .npy format: one float32 [8, 32, 32] array per image
(sd-vae-ft-mse posterior mean, then std, of the ADM center crop scaled to [−1, 1] — SD's range, not EDM2's [0, 1]),
named 00000/img-mean-std-00000000.npy …, with dataset.json class labels (engine/data/image_dataset.py) — what
`python -m engine.pipelines.encode_latents --data imagenet256.zip --vae .../diffusion_pytorch_model.safetensors --out
datasets/imagenet256-sdvae-latents.zip` writes from an ADM-cropped 256² image dataset (EDM's format, e.g. from
NVlabs/edm2 `dataset_tool.py convert --transform=center-crop-dhariwal --resolution=256x256`). Each step
draws a fresh posterior sample ×0.18215 (engine/objectives/latent.py). With ENGINE_INCEPTION_WEIGHTS,
ENGINE_FID_STATS (ADM's VIRTUAL_imagenet256_labeled statistics) and ENGINE_VAE_WEIGHTS set, the run ends with 1-
and 2-step FID-50k; otherwise it prints the evaluation command.

    python recipes/imagenet256_cmt_mf.py --data datasets/imagenet256-sdvae-latents.zip
    torchrun --nproc_per_node=8 recipes/imagenet256_cmt_mf.py --data datasets/imagenet256-sdvae-latents.zip
    python recipes/imagenet256_cmt_mf.py --smoke        # synthetic latents and tiny DiTs, every stage (CI)
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from engine import dist
from engine.data import ImageDataset, write_latent_dataset
from engine.data.sampler import LatentSource
from engine.errors import EngineError
from engine.networks import DiT
from engine.objectives import CMTMeanFlow, LatentPosterior, MeanFlow
from engine.pipelines.meanflow import LatentMeanFlowSettings, latent_smoke
from engine.pipelines.recipe import Run, check_fid_inputs, missing_input, parse_flags, stop_if_missing
from engine.solvers import mean_flow_uniform
from engine.training.stage_config import StageConfig

IMAGENET_TRAIN = 1_281_167


@dataclasses.dataclass
class Config(LatentMeanFlowSettings):
    num_classes: int = 1000
    teacher: str = "B/4"
    student: str = "XL/2"
    omega: float = 0.2                   # CFG folded into training, identical in all three stages (§4.5)
    kappa: float = 0.92
    t_start: float = 0.0
    t_end: float = 0.75
    teacher_kimg: float = 80 * IMAGENET_TRAIN / 1000          # 80 epochs [unresolved in the paper]
    mid_kimg: float = 200_000 * 112 / 1000                     # 200k iterations, in pairs
    post_kimg: float = 93 * IMAGENET_TRAIN / 1000              # derived from Table 4's 587 A100-h [see above]
    fid_samples: int = 50_000


def smoke(cfg: Config) -> Config:   # tiny DiTs instead of B/4 and XL/2
    return latent_smoke(cfg, num_classes=10, teacher_batch=16, teacher_kimg=0.064)


def network(cfg: Config, name: str) -> DiT:
    if cfg.tiny:  # smoke: 16 tokens, 2 heads, 1 block
        return DiT(input_size=cfg.latent_size, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                   num_classes=cfg.num_classes)
    return DiT.from_name(name, input_size=cfg.latent_size, in_channels=4, num_classes=cfg.num_classes)


def smoke_latents(out: str, cfg: Config) -> str:
    """A synthetic latent dataset (EDM2 .npy members, labels): class-dependent means, std 0.1–0.5 (deterministic)."""
    rng = np.random.default_rng(0)
    n = 64
    labels = np.arange(n) % cfg.num_classes
    centres = rng.normal(0, 4, size=(cfg.num_classes, 4, 1, 1))
    mean = centres[labels] + rng.normal(0, 1, size=(n, 4, cfg.latent_size, cfg.latent_size))
    std = rng.uniform(0.1, 0.5, size=mean.shape)
    path = os.path.join(out, "smoke-latents.zip")
    if dist.rank() == 0:  # under torchrun one rank writes it, the others wait
        write_latent_dataset(path, np.concatenate([mean, std], axis=1).astype(np.float32), labels, overwrite=True)
    dist.barrier()
    return path


def missing(args) -> list[str | None]:
    return [missing_input("--data", args.data,
                          "the ImageNet-256 latent dataset in EDM2's .npy format (float32 [8, 32, 32] sd-vae-ft-mse "
                          "posterior mean and std per image, of the ADM 256² center crop in [−1, 1], with "
                          "dataset.json labels), e.g. datasets/imagenet256-sdvae-latents.zip; make it with "
                          "`python -m engine.pipelines.encode_latents --data <ImageNet-256 zip> --vae "
                          "<sd-vae-ft-mse safetensors> --out datasets/imagenet256-sdvae-latents.zip`")]


def main(argv=None) -> dict:
    args = parse_flags(__doc__, argv, default_out="runs/imagenet256_cmt_mf")
    cfg = smoke(Config()) if args.smoke else Config()
    if not args.smoke and not args.dry_run:
        stop_if_missing("imagenet256_cmt_mf", missing(args))
    if not args.smoke:
        check_fid_inputs(args.device)
    run = Run(args, "imagenet256_cmt_mf", dataclasses.asdict(cfg))
    if args.dry_run:
        run.record(identity=False)
        return {}

    def stage_cfg(name, kimg, batch):
        return StageConfig(name=name, total_kimg=kimg, batch_size=batch, lr=cfg.lr, optimizer="adam",
                           betas=(0.9, 0.95), lr_schedule="constant", ema_beta=cfg.ema_beta,
                           log_kimg=cfg.log_kimg, ckpt_kimg=cfg.ckpt_kimg, eval_kimg=cfg.grid_kimg, seed=args.seed)

    # Every stage's budget at this --kimg-scale is checked before the first one trains (Run.plan); CMT trains on
    # trajectories_per_batch × the pair rule's pairs a step (the rule's count needs no teacher).
    pairs = len(CMTMeanFlow(None, teacher_kind="mf", pair_rule=cfg.pair_rule).pairs)
    stages = dict(pre=stage_cfg("pre_mf_teacher", cfg.teacher_kimg, cfg.teacher_batch),
                  mid=stage_cfg("mid_cmt", cfg.mid_kimg, cfg.trajectories_per_batch * pairs),
                  post=stage_cfg("post_mf", cfg.post_kimg, cfg.post_batch))
    run.plan(*stages.values())
    torch.manual_seed(args.seed)
    dataset = ImageDataset(smoke_latents(args.out, cfg) if args.smoke else args.data)
    if not dataset.is_latent or dataset.image_shape != [8, cfg.latent_size, cfg.latent_size]:
        raise EngineError(f"{dataset.path} holds {'latents' if dataset.is_latent else 'images'} of shape "
                          f"{dataset.image_shape}; this recipe needs SD-VAE latent moments [8, {cfg.latent_size}, "
                          f"{cfg.latent_size}]")
    if not dataset.has_labels:
        raise EngineError(f"{dataset.path} has no class labels (dataset.json); Mean Flow here is class-conditional")
    if dataset.label_dim > cfg.num_classes:
        raise EngineError(f"{dataset.path} has labels up to {dataset.label_dim - 1}; the networks here have "
                          f"{cfg.num_classes} classes")
    data = LatentSource(dataset)
    guidance = dict(omega=cfg.omega, kappa=cfg.kappa, t_start=cfg.t_start, t_end=cfg.t_end)

    def grid(ema):  # 2-step samples, latents shown as their first 3 channels ×(1/4) (decoding needs the VAE)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(16, 4, cfg.latent_size, cfg.latent_size, generator=g).to(run.device)
        y = torch.arange(16, device=run.device) % cfg.num_classes
        return (mean_flow_uniform(ema, z, 2, y)[:, :3] / 4).clamp(-1, 1)

    # Stage 1: the MF-B/4 teacher, with the post-training guidance baked in.
    pre = run.stage("cmt_mf", "pre", stages["pre"], network(cfg, cfg.teacher), LatentPosterior(MeanFlow(**guidance)),
                    data, grid=grid)
    teacher = pre.ema.eval().requires_grad_(False)
    # Stage 2: CMT into XL/2 from random weights on the teacher's 8-step trajectories.
    cmt = CMTMeanFlow(teacher, teacher_kind="mf", pair_rule=cfg.pair_rule,
                      trajectories_per_batch=cfg.trajectories_per_batch)
    mid = run.stage("cmt_mf", "mid", stages["mid"], network(cfg, cfg.student), LatentPosterior(cmt), data, grid=grid)
    # Stage 3: Mean Flow post-training from the mid-trained EMA, batch 64.
    post = run.stage("cmt_mf", "post", stages["post"], network(cfg, cfg.student),
                     LatentPosterior(MeanFlow(**guidance)), data, init=mid.ema, grid=grid)
    one, two = fid(post.ema, cfg, run, args.smoke)
    run.record_metrics("cmt_mf", one_step=one, two_step=two)
    return run.finish(["fid"] if one else [], [])


def fid(ema, cfg: Config, run, smoke_run: bool) -> tuple[dict, dict]:
    """1- and 2-step FID-50k (docs/spec/mf.md §7.2: uniform random labels, EMA, SD-VAE decode), each with its detector
    record, when the detector, the reference statistics and the VAE are given by environment; otherwise the
    command that computes them later."""
    from engine.evaluate import recipe_fid
    release = os.path.join(run.out, "cmt_mf", "post_mf", "ema.safetensors")
    vae = os.environ.get("ENGINE_VAE_WEIGHTS")
    res = []
    if not smoke_run and vae:
        from engine.perceptual.vae import LatentDecoder
        decode = LatentDecoder.from_file(vae, convention="sd").to(run.device)
        res = recipe_fid(ema.eval(), (4, cfg.latent_size, cfg.latent_size), [(1.0,), (1.0, 0.5)], cfg.fid_samples,
                         run.device, decode=decode)
    if not res:
        print(f"FID: python -m engine.evaluate --net {release} --stats VIRTUAL_imagenet256_labeled.npz "
              f"--stats-preprocessing nvidia --inception inception-2015-12-05.pt "
              f"--vae sd-vae-ft-mse/diffusion_pytorch_model.safetensors --latent-convention sd --schedules 1 1,0.5  "
              f"(or set ENGINE_INCEPTION_WEIGHTS, ENGINE_FID_STATS, ENGINE_FID_STATS_PREPROCESSING and "
              f"ENGINE_VAE_WEIGHTS to have the recipe compute it)")
        return {}, {}
    return res[0], res[1]


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
