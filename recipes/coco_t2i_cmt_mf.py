"""CMT for Mean Flow on MS-COCO text-to-image at 256² (SD-VAE latents 4×32×32), the paper's Table 5 (App. B.6;
docs/spec/mf.md §4).

Reproduces: a REPA-trained SiT teacher — the MM-DiT of REPA's COCO code (engine/networks/mmdit.py, 24 joint
blocks at 768, text through joint attention with 77 × 768 CLIP tokens, REPA's alignment loss after block 8 with
weight 0.5, flow matching with t ~ U[0, 1], REPA's mean-over-elements loss, label dropout 0.1 to the null caption,
AdamW with weight decay 0 — i.e. Adam — lr 1e-4, β (0.9, 0.999), gradient clip 1, batch 256, 400k
iterations, EMA 0.9999: REPA train_t2i.py) → CMT mid-training of a
Mean Flow MM-DiT initialised from the teacher's EMA (docs/spec/mf.md §4.1) on the teacher's 8-step Heun trajectories
with CFG scale 2 on the velocity (4 trajectories × 28 pairs `nonadjacent28`, constant lr 1e-4, plain squared loss:
§4.2–4.5) → Mean Flow post-training from the mid-trained EMA with effective CFG scale 2. Baselines as Table 5: Mean
Flow from random initialisation and Mean Flow from the SiT's weights, each for the CMT arm's mid + post budget.
Every stage trains with REPA (the paper: all COCO models use it).

Settings the paper leaves open (docs/spec/mf.md §3.6, §4.5 mark them unresolved), each a Config field:
  omega / kappa / t_start / t_end — Mean Flow's guidance: ω 2, κ 0 on [0, 1] (effective scale ω/(1 − κ) = 2, the
  stated value; the interval "as the SiT teacher", which samples without one); teacher_guidance 2 (the teacher's
  CFG on the Heun velocity); r_init 'zero' — the SiT → Mean Flow initialisation's second time embedder (zero output
  layer, so the student starts as the SiT); mid_repa — REPA during mid-training, aligned with the caption's image
  (engine/objectives/repa.py says why that is a choice); mid / post / baseline lengths; post_batch 64.
Sized for: a multi-GPU node (torchrun, FSDP2); wall time not measured here (no GPU run has been made).

Needs: --data, a COCO 256² latent dataset in EDM2's .npy format (train2014 in sorted image-id order: U-ViT's center
crop, `python -m engine.pipelines.encode_latents`), and --captions, its caption store with REPA features (`python -m
engine.pipelines.encode_captions --captions annotations/captions_train2014.json --clip <clip-vit-large-patch14 dir>
--images <the 256² image zip> --dinov2 dinov2_vitb14_pretrain.pth --out ...`). FID: with --val (the val2014 caption
store), ENGINE_INCEPTION_WEIGHTS (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or the engine's other
Inception files), ENGINE_FID_STATS (U-ViT's fid_stats_mscoco256_val.npz) and ENGINE_VAE_WEIGHTS, the run ends with
1- and 2-step FID-30k on 30,000 val captions — U-ViT's protocol: uniformly random val images, one random caption
each (here a function of the sample's seed), pytorch-fid's preprocessing, which the recipe sets because U-ViT's
statistics are pytorch-fid's; otherwise it prints what is missing.

    python recipes/coco_t2i_cmt_mf.py --data datasets/coco256-train-latents.zip \
        --captions datasets/coco256-train.captions [--val datasets/coco256-val.captions]
    python recipes/coco_t2i_cmt_mf.py --smoke --out DIR     # synthetic latents, captions and features; every stage
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from engine import dist
from engine.data import ImageDataset, write_latent_dataset
from engine.data.captions import CaptionedLatentSource, CaptionStore, write_caption_store
from engine.data.sampler import LatentSource
from engine.evaluate import caption_conditions
from engine.networks.mmdit import MMDiT, init_from_sit
from engine.objectives import REPA, CMTMeanFlow, FlowMatching, LatentPosterior, MeanFlow
from engine.pipelines.meanflow import LatentMeanFlowSettings, latent_smoke
from engine.pipelines.recipe import Run, missing_input, parse_flags, stop_if_missing
from engine.solvers import mean_flow_uniform
from engine.training.stage_config import StageConfig

COCO_TRAIN = 82_783


@dataclasses.dataclass
class Config(LatentMeanFlowSettings):
    network: str = "REPA-COCO"
    repa_weight: float = 0.5                     # REPA's proj_coeff
    label_dropout: float = 0.1                   # REPA / U-ViT p_uncond
    teacher_kimg: float = 400_000 * 256 / 1000   # REPA train_t2i.py: 400k iterations
    teacher_lr: float = 1e-4
    teacher_grad_clip: float = 1.0
    teacher_guidance: float = 2.0                # CFG on the teacher's velocity in its trajectories [unresolved]
    mid_kimg: float = 100_000 * 112 / 1000       # [unresolved for COCO]
    mid_repa: bool = True                        # [unresolved: engine/objectives/repa.py]
    r_init: str = "zero"                         # SiT → MF second time embedder [unresolved, §3.6]
    post_kimg: float = 100_000 * 64 / 1000       # [unresolved for COCO]
    omega: float = 2.0                           # effective CFG scale ω/(1 − κ) = 2 (B.6) [unresolved split]
    kappa: float = 0.0
    t_end: float = 1.0
    fid_samples: int = 30_000

    @property
    def baseline_kimg(self) -> float:
        """The baselines' Mean Flow budget: the CMT arm's mid + post samples (Table 5 compares at equal cost)."""
        return self.mid_kimg + self.post_kimg


def smoke(cfg: Config) -> Config:
    return latent_smoke(cfg, teacher_batch=8, teacher_kimg=0.032, fid_samples=16)


def network(cfg: Config, mean_flow: bool) -> MMDiT:
    if cfg.tiny:   # smoke: 16 image tokens, 5 text tokens of 12, REPA after block 1 into 8 dims
        return MMDiT(input_size=cfg.latent_size, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                     context_dim=12, context_tokens=5, projector_dim=16, z_dim=8, encoder_depth=1,
                     mean_flow=mean_flow, r_init=cfg.r_init)
    return MMDiT.from_name(cfg.network, input_size=cfg.latent_size, mean_flow=mean_flow, r_init=cfg.r_init)


def smoke_data(out: str, cfg: Config) -> tuple[str, str]:
    """Synthetic latents (caption-dependent means), a caption store with 1–3 captions per image whose features
    encode the image's 'topic', and random REPA features (deterministic)."""
    rng = np.random.default_rng(0)
    n, topics = 32, 4
    topic = np.arange(n) % topics
    centres = rng.normal(0, 4, size=(topics, 4, 1, 1))
    mean = centres[topic] + rng.normal(0, 1, size=(n, 4, cfg.latent_size, cfg.latent_size))
    std = rng.uniform(0.1, 0.5, size=mean.shape)
    counts = 1 + np.arange(n) % 3
    codes = rng.normal(size=(topics, 5, 12))
    feats = np.concatenate([codes[topic[i]][None] + 0.1 * rng.normal(size=(c, 5, 12)) for i, c in enumerate(counts)])
    g = cfg.latent_size // 2
    latents, store = os.path.join(out, "smoke-latents.zip"), os.path.join(out, "smoke.captions")
    if dist.rank() == 0:
        write_latent_dataset(latents, np.concatenate([mean, std], axis=1).astype(np.float32), None, overwrite=True)
        write_caption_store(store, feats, np.concatenate([[0], np.cumsum(counts)]), rng.normal(size=(5, 12)),
                            [[f"topic {topic[i]} caption {k}" for k in range(c)] for i, c in enumerate(counts)],
                            repa=rng.normal(size=(n, g * g, 8)), overwrite=True)
    dist.barrier()
    return latents, store


def missing(args) -> list[str | None]:
    return [missing_input("--data", args.data, "the COCO 256² SD-VAE latent dataset: make it with `python -m "
                          "engine.pipelines.encode_latents --data <COCO train2014 256² zip> --vae <sd-vae-ft-mse "
                          "safetensors> --out ...`"),
            missing_input("--captions", args.captions, "its caption store with REPA features: make it with `python -m "
                          "engine.pipelines.encode_captions --captions annotations/captions_train2014.json --clip "
                          "<clip-vit-large-patch14 dir> --images <the same 256² zip> --dinov2 "
                          "dinov2_vitb14_pretrain.pth --out ...` (recipes/coco_t2i_cmt_mf.py docstring)")]


def main(argv=None) -> dict:
    extra = {"--captions": dict(default=None, help="the training latents' caption store (engine/data/captions.py)"),
             "--val": dict(default=None, help="the val2014 caption store, for FID-30k")}
    args = parse_flags(__doc__, argv, default_out="runs/coco_t2i_cmt_mf", extra=extra)
    cfg = smoke(Config()) if args.smoke else Config()
    if not args.smoke and not args.dry_run:
        stop_if_missing("coco_t2i_cmt_mf", missing(args))
    run = Run(args, "coco_t2i_cmt_mf", dict(dataclasses.asdict(cfg), baseline_kimg=cfg.baseline_kimg))
    if args.dry_run:
        run.record(identity=False)
        return {}

    def stage_cfg(name, kimg, batch, lr=cfg.lr, betas=(0.9, 0.95), optimizer="adam", clip=None):
        return StageConfig(name=name, total_kimg=kimg, batch_size=batch, lr=lr, optimizer=optimizer, betas=betas,
                           lr_schedule="constant", ema_beta=cfg.ema_beta, grad_clip=clip, log_kimg=cfg.log_kimg,
                           ckpt_kimg=cfg.ckpt_kimg, eval_kimg=cfg.grid_kimg, seed=args.seed)

    # CMT trains on trajectories_per_batch × the pair rule's pairs a step (the rule's count needs no teacher)
    pairs = len(CMTMeanFlow(None, teacher_kind="fm", pair_rule=cfg.pair_rule).pairs)
    stages = dict(pre=stage_cfg("pre_sit_teacher", cfg.teacher_kimg, cfg.teacher_batch, lr=cfg.teacher_lr,
                                betas=(0.9, 0.999), optimizer="adam", clip=cfg.teacher_grad_clip),
                  mid=stage_cfg("mid_cmt", cfg.mid_kimg, cfg.trajectories_per_batch * pairs),
                  post=stage_cfg("post_mf", cfg.post_kimg, cfg.post_batch),
                  baseline=stage_cfg("post_mf", cfg.baseline_kimg, cfg.post_batch))   # mf_random's and mf_sit's
    run.plan(*stages.values())   # every stage's budget at this --kimg-scale, before the smoke inputs are written
    torch.manual_seed(args.seed)
    latents_path, store_path = smoke_data(args.out, cfg) if args.smoke else (args.data, args.captions)
    latents, store = ImageDataset(latents_path), CaptionStore(store_path)
    if not latents.is_latent or latents.image_shape != [8, cfg.latent_size, cfg.latent_size]:
        raise SystemExit(f"{latents.path} holds {'latents' if latents.is_latent else 'images'} of shape "
                         f"{latents.image_shape}; this recipe needs SD-VAE latent moments [8, {cfg.latent_size}, "
                         f"{cfg.latent_size}]")
    data = CaptionedLatentSource(LatentSource(latents), store, seed=args.seed, repa=True)
    null = store.null_context()

    def net(mean_flow):
        n = network(cfg, mean_flow)
        n.set_null_context(null)
        return n

    grid_captions = caption_conditions(store)

    def grid(ema):  # 2-step samples for 16 training captions, latents shown as their first 3 channels ×(1/4)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(16, 4, cfg.latent_size, cfg.latent_size, generator=g).to(run.device)
        if not ema.mean_flow:      # the SiT: its 1-step Euler flow map, u(z, 1, 1)
            return (z - ema(z, torch.ones(16, device=run.device), None, grid_captions(range(16)).to(run.device))
                    )[:, :3].div(4).clamp(-1, 1)
        return (mean_flow_uniform(ema, z, 2, grid_captions(range(16)).to(run.device))[:, :3] / 4).clamp(-1, 1)

    with_repa = lambda objective, on=True: REPA(LatentPosterior(objective), cfg.repa_weight if on else 0.0)
    guidance = dict(omega=cfg.omega, kappa=cfg.kappa, t_start=cfg.t_start, t_end=cfg.t_end,
                    label_dropout=cfg.label_dropout)
    # Stage 1: the SiT teacher with REPA, shared by every arm.
    pre = run.stage("cmt_mf", "pre", stages["pre"], net(False),
                    with_repa(FlowMatching(label_dropout=cfg.label_dropout, time="uniform", reduce="mean")), data,
                    grid=grid, shared_by=("cmt_mf", "mf_sit"))
    teacher = pre.ema.eval().requires_grad_(False)
    sit_state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    # Stage 2: CMT mid-training from the SiT's weights on its 8-step Heun trajectories (CFG 2 on the velocity).
    cmt = CMTMeanFlow(teacher, teacher_kind="fm", pair_rule=cfg.pair_rule, guidance=cfg.teacher_guidance,
                      trajectories_per_batch=cfg.trajectories_per_batch)
    mid = run.stage("cmt_mf", "mid", stages["mid"], init_from_sit(net(True), sit_state), with_repa(cmt, cfg.mid_repa),
                    data, grid=grid)
    # Stage 3: Mean Flow post-training from the mid-trained EMA.
    post = run.stage("cmt_mf", "post", stages["post"], net(True), with_repa(MeanFlow(**guidance)), data, init=mid.ema,
                     grid=grid)
    # Baselines (Table 5): Mean Flow from random weights and from the SiT's, for the CMT arm's mid + post budget.
    base_random = run.stage("mf_random", "post", stages["baseline"], net(True), with_repa(MeanFlow(**guidance)), data,
                            grid=grid)
    base_sit = run.stage("mf_sit", "post", stages["baseline"], init_from_sit(net(True), sit_state),
                         with_repa(MeanFlow(**guidance)), data, grid=grid)
    for arm, res in (("cmt_mf", post), ("mf_random", base_random), ("mf_sit", base_sit)):
        one, two = fid(res.ema, arm, cfg, run, args)
        run.record_metrics(arm, one_step=one, two_step=two)
    return run.finish(["fid"] if run.results["runs"]["cmt_mf"].get("one_step") else [], [])


def fid(ema, arm: str, cfg: Config, run, args) -> tuple[dict, dict]:
    """1- and 2-step FID-30k on val captions (module docstring), each with its detector record; or the list of
    what is missing."""
    from engine.checkpoints.files import file_sha256
    from engine.evaluate import evaluate
    from engine.metrics.reference_stats import load_detectors, load_stats
    inception, stats_path, vae = (os.environ.get(k) for k in ("ENGINE_INCEPTION_WEIGHTS", "ENGINE_FID_STATS",
                                                              "ENGINE_VAE_WEIGHTS"))
    need = [what for what, ok in (("--val (the val2014 caption store)", args.val and os.path.exists(args.val)),
                                  ("ENGINE_INCEPTION_WEIGHTS", inception), ("ENGINE_FID_STATS (U-ViT's "
                                   "fid_stats_mscoco256_val.npz)", stats_path), ("ENGINE_VAE_WEIGHTS", vae)) if not ok]
    if args.smoke or need:
        if run.lead and arm == "cmt_mf":
            print(f"FID-30k not computed: missing {', '.join(need) if need else 'real data (--smoke)'}")
        return {}, {}
    from engine.perceptual.vae import LatentDecoder
    detectors = load_detectors(["fid"], inception, device=run.device, fid_preprocessing="pytorch-fid")
    stats = load_stats(stats_path)
    res = evaluate(ema.eval(), (4, cfg.latent_size, cfg.latent_size), [(1.0,), (1.0, 0.5)], cfg.fid_samples,
                   detectors=detectors, stats=stats, device=run.device,
                   decode=LatentDecoder.from_file(vae, convention="sd").to(run.device),
                   stats_preprocessing="pytorch-fid", conditions=caption_conditions(CaptionStore(args.val)))
    if res is None:
        return {}, {}
    record = {**detectors["fid"].describe(), "stats": stats_path, "stats_sha256": file_sha256(stats_path),
              "protocol": "U-ViT COCO: 30k val captions, pytorch-fid preprocessing"}
    one, two = ({"fid": r["fid"], "fid_detector": record} for r in res.values())
    return one, two


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
