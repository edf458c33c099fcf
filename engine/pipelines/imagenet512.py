"""The paper's headline pipeline, CMT at ImageNet 512×512 in EDM2's latent space (docs/spec/edm2_latent.md §10);
recipes/imagenet512_cmt_ecd.py holds the numbers, this module is the code.

  pre   EDM2-XXL as released (loaded, not retrained)
  mid   CMT: 16-NFE DPM-Solver++(3M) trajectories of the unguided XXL-0.070 from 80ε with uniform labels, every
        state → the trajectory's end under E-LatentLPIPS ('bgcfnc'), 8 trajectories × 16 = 128 pairs, Adam 2e-4
        linear decay, EMA 0.999; the student starts as the teacher (§7)
  post  ECD from the mid-trained EMA: one Heun step of the autoguided XXL-0.075 / M-0.155 (w 2.05) from t to
        r = t(1 − (1 + 8 sigmoid(−t))/1024), pseudo-Huber c = 0.06 weighted 1/t² + 1/σ_d², t ~ LogNormal(−0.8, 1.6),
        constant lr, EMA 0.9999, batch 128 (§8)
  eval  1 step (σ = 80) and 2 steps (80 → 1.526) of the post-trained EMA, decoded by the SD VAE, FID-50k and
        FD_DINOv2 against EDM2's img512.pkl (§5)

Where the paper and the released code disagree (§11) each choice is a setting of `Latent512Settings`, its default
named there. Data are real in mid-training only in name: the released code starts from 80ε with uniform labels
(the `mid_prior` / `mid_labels` settings); ECD trains on the latent dataset's posterior samples and labels.

Declared deviation: the released losses sanitise targets and gradients with nan_to_num (NaN → 0); this engine stops
on the first non-finite loss or gradient instead (engine/checks.py, STYLE.md: a NaN is a bug to see, not to hide).
"""
from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import torch

from engine import dist
from engine.checkpoints.edm_snapshots import TEACHER_ONLY_KEYS, latent_affine, read_edm_pickle
from engine.checkpoints.files import in_weights_dir, set_weights_dir, weights_dir
from engine.data import ImageDataset, write_image_dataset, write_latent_dataset
from engine.data.sampler import LatentSource
from engine.errors import EngineError
from engine.evaluate import recipe_metric_inputs, recipe_metrics
from engine.objectives import CMT, ECD, LatentPosterior, perceptual
from engine.perceptual.elatentlpips import ELatentLPIPS
from engine.perceptual.vae import BIAS, SCALE, VAE_FILES, LatentDecoder
from engine.pipelines.edm2_presets import PUBLISHED_URL, build_edm2_preset, with_unit_gains
from engine.pipelines.imagenet64 import STATS_URL
from engine.pipelines.recipe import Run, missing_input, parse_flags, stop_if_missing
from engine.training.loop import initialise
from engine.training.stage_config import StageConfig

IMAGENET_TRAIN = 1_281_167


@dataclasses.dataclass
class Latent512Settings:
    latent_resolution: int = 64           # 512² images through the SD VAE (8×): 4 × 64 × 64 final latents
    label_dim: int = 1000
    # Released EDM2 files (PUBLISHED_URL), looked up in --weights; the stage each one serves (§7.1, §8, §11.6)
    teacher_file: str = "edm2-img512-xxl-0939524-0.070.pkl"      # mid teacher and the student's initialisation
    ecd_teacher_file: str = "edm2-img512-xxl-0939524-0.075.pkl"  # ECD's main net (autoguidance FID optimum)
    guide_file: str = "edm2-img512-m-0268435-0.155.pkl"          # ECD's guide
    guidance: float = 2.05
    teacher_fp16: bool = False            # the CMT code builds both XXL teachers in float32 (TF32 allowed)
    guide_fp16: bool = True               # ... and the guide as pickled: float16 compute on CUDA
    # E-LatentLPIPS of the mid-training loss (§6.3, §6.4)
    lpips_variant: str = "cmt"            # 'official' = mingukkang/elatentlpips (§6.2, §11.4)
    augment: str = "bgcfnc"
    color_matrix: str = "reference"       # the SNU code's 4×4 matrix on 4 latent channels; 'affine' = RGB-like
    shared_noise: bool = True             # one noise tensor for both arguments, as the SNU / CMT code
    # CMT mid-training (§7)
    nfe: int = 16
    trajectories_per_batch: int = 8       # × 16 = 128 pairs per iteration
    mid_prior: str = "noise"              # x_T = 80ε as the released 512 code; 'data' = y + 80ε (§11.9)
    mid_labels: str = "uniform"           # uniform random classes as the released code; 'data' = the dataset's
    mid_kimg: float = 12_800.0            # 12.8 M pairs = 100 k iterations (Tables 3, 8)
    mid_lr: float = 2e-4                  # linear decay to 0
    mid_betas: tuple[float, float] = (0.9, 0.999)
    mid_ema: float = 0.999                # plain per-step EMA (§11.8)
    # ECD post-training (§8)
    ecd_solver: str = "heun"              # 'euler' available
    P_mean: float = -0.8                  # ImageNet-64 ECT's values, not EDM2-512's (−0.4, 1.0) (§11.7)
    P_std: float = 1.6
    q: float = 1024                       # r = t(1 − (1 + 8 sigmoid(−t))/q) (§11.3)
    c: float = 0.06
    ecd_lr: float = 1e-4                  # the paper; run_ecd_512.sh passes 1e-6 (§11.1)
    ecd_betas: tuple[float, float] = (0.9, 0.99)
    ecd_ema: float = 0.9999
    ecd_kimg: float = 16_000.0            # Table 8 / the released checkpoint (tick 2500); B.5.1 says 12.8 M (§11.2)
    batch_size: int = 128
    # evaluation (§5)
    mid_t: float = 1.526
    fid_samples: int = 50_000
    eval_batch: int = 64
    closing_eval: bool = True             # False: train only; the run prints the evaluation command
    # distribution (docs/scaling.md, "ImageNet-512 headline")
    parallel: str = "auto"                # FSDP2 under torchrun
    shard_teacher: bool = True            # shard the frozen XXL teacher(s) and the guide too
    ckpt_kimg: float = 256.0
    log_kimg: float = 12.8
    grid_kimg: float = 1_280.0
    smoke: bool = False

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (4, self.latent_resolution, self.latent_resolution)


def smoke_settings(s: Latent512Settings) -> Latent512Settings:
    """32² latents (the augmentation's 43-tap filter bank reflects 21 pixels), tiny MP-UNets, two steps a stage."""
    return dataclasses.replace(s, latent_resolution=32, label_dim=10, nfe=4, trajectories_per_batch=2, mid_kimg=0.016,
                               batch_size=8, ecd_kimg=0.016, ckpt_kimg=0.008, log_kimg=0.008, grid_kimg=0.016,
                               fid_samples=8, eval_batch=8, guidance=1.5, mid_ema=0.5, ecd_ema=0.5, smoke=True)


# ---- inputs ----------------------------------------------------------------------------------------------------

def missing_inputs(s: Latent512Settings, args) -> list[str]:
    """Every input file the run lacks, one line each: what it is, its file name, where it goes."""
    out = [p for p in [missing_input("--data", args.data, "the ImageNet-512 latent dataset of EDM2's dataset_tool.py "
                                     "(convert --resolution=512x512 --transform=center-crop-dhariwal, then encode: "
                                     "img512-sd.zip, float32 [8, 64, 64] sd-vae-ft-mse mean and std per image with "
                                     "dataset.json labels)")] if p]
    for name, what, flag in ((s.teacher_file, "the mid-training teacher and student initialisation", args.teacher),
                             (s.ecd_teacher_file, "ECD's main teacher", None), (s.guide_file, "ECD's guide", None)):
        path = flag or in_weights_dir(name)
        if not path or not os.path.exists(path):
            out.append(f"{what}: {flag or name} not found" + ("" if flag else " in the --weights directory")
                       + f" (from {PUBLISHED_URL}{name})")
    for find in (ELatentLPIPS.weights_path, LatentDecoder.weights_path)[:2 if s.closing_eval else 1]:
        try:
            find()
        except FileNotFoundError as e:
            out.append(str(e))
    if s.closing_eval:
        out += recipe_metric_inputs(args.device, stats_names=("img512.pkl",),
                                    stats_where=f" (EDM2's {STATS_URL}img512.pkl)")[1]
    return out


def _smoke_inputs(out: str, s: Latent512Settings):
    """Synthetic EDM2-format latents, and random-weight latent VGG, SD VAE and Inception files in the published
    layouts under <out>/smoke-weights (which becomes the --weights directory), with reference statistics of
    the decoded latents (the loaders of the real path run on them). The EDM2 networks are tiny MP-UNets in
    memory: the EDM2 pickle reader is tested on files written in EDM2's layout (tests/test_edm2.py)."""
    from engine.metrics.reference_stats import dataset_stats, load_detectors, save_stats
    from engine.pipelines.smoke_weights import write_inception, write_latent_vgg, write_sd_vae
    wdir = os.path.join(out, "smoke-weights")
    rng = np.random.default_rng(0)
    n, r = 32, s.latent_resolution
    labels = np.arange(n) % s.label_dim
    # raw SD latents whose standardised means are class-dependent (final = raw·scale + bias, §3.1)
    final = rng.normal(0, 0.3, size=(s.label_dim, 4, 1, 1))[labels] + rng.normal(0, 0.4, size=(n, 4, r, r))
    scale, bias = np.asarray(SCALE).reshape(1, 4, 1, 1), np.asarray(BIAS).reshape(1, 4, 1, 1)
    raw_mean = (final - bias) / scale
    raw_std = rng.uniform(0.05, 0.2, size=raw_mean.shape) / scale
    data = os.path.join(out, "smoke-latents.zip")
    if dist.rank() == 0:
        if not os.path.exists(data):     # kept on a rerun: the run's identity fingerprints it
            write_latent_dataset(data, np.concatenate([raw_mean, raw_std], 1).astype(np.float32), labels)
        write_latent_vgg(wdir)
        write_sd_vae(wdir)
        write_inception(wdir)
        stats = os.path.join(wdir, "img512.pkl")
        if not os.path.exists(stats):
            decode = LatentDecoder.from_file(os.path.join(wdir, VAE_FILES[1]))
            images = decode(torch.from_numpy(final[:16]).float()).permute(0, 2, 3, 1).numpy()
            ref = write_image_dataset(os.path.join(wdir, "smoke-reference.zip"), images, labels[:16], overwrite=True)
            det = load_detectors(["fid"], inception=os.path.join(wdir, "pt_inception-2015-12-05-6726825d.pth"))
            save_stats(stats, dataset_stats(ImageDataset(ref), det, progress=False))
    dist.barrier()
    set_weights_dir(wdir)
    torch.manual_seed(0)
    tiny = dict(img_resolution=r, img_channels=4, label_dim=s.label_dim)
    teacher, ecd_teacher, guide = (build_edm2_preset("edm2-tiny", **tiny) for _ in range(3))
    for net in (teacher, ecd_teacher, guide):
        with_unit_gains(net)        # the released gains are not zero
    ecd_teacher.load_state_dict(teacher.state_dict())  # another EMA length of one training run
    student = build_edm2_preset("edm2-tiny", use_fp16=False, logvar_channels=None, **tiny)
    return data, teacher.eval(), ecd_teacher.eval(), guide.eval(), initialise(student, teacher, ignore=TEACHER_ONLY_KEYS)


def _released(s: Latent512Settings, args):
    path = lambda name, flag=None: flag or in_weights_dir(name)       # noqa: E731 - checked by missing_inputs
    files = dict(teacher=path(s.teacher_file, args.teacher), ecd_teacher=path(s.ecd_teacher_file),
                 guide=path(s.guide_file))
    ckpts = {name: read_edm_pickle(f) for name, f in files.items()}   # each file read once (the XXL is 3 GB)
    for name, ckpt in ckpts.items():
        check_latent_affine(ckpt)
    teacher, ecd_teacher, guide = (ckpts[n].network(mode="teacher") for n in ("teacher", "ecd_teacher", "guide"))
    student = ckpts["teacher"].network(mode="student", overrides=dict(dropout=0.0))
    teacher.use_fp16 = ecd_teacher.use_fp16 = s.teacher_fp16
    guide.use_fp16 = s.guide_fp16      # weights are held in float32 either way (engine/checkpoints/edm_snapshots.py)
    return args.data, teacher, ecd_teacher, guide, student.train().requires_grad_(True)


def check_latent_affine(ckpt) -> None:
    """A released latent network was trained on raw SD-VAE moments mapped by its encoder's scale and bias; this
    engine maps the dataset's moments with engine/perceptual/vae.py's SCALE and BIAS (EDM2's defaults). A network
    whose encoder used other values would be fed latents of the wrong scale without any error, so it is refused."""
    affine = latent_affine(ckpt)
    if affine is None:
        raise EngineError(f"{ckpt.path} carries no StabilityVAEEncoder (its encoder: "
                          f"{(ckpt.entries.get('encoder') or {}).get('class_name', 'none')}); the ImageNet-512 "
                          "recipe needs EDM2's latent networks (edm2-img512-*.pkl)")
    scale, bias = affine
    if not (np.allclose(scale, SCALE, rtol=1e-6, atol=0) and np.allclose(bias, BIAS, rtol=1e-6, atol=1e-7)):
        raise EngineError(f"{ckpt.path}: its encoder maps raw latents with scale {np.round(scale, 6).tolist()} and "
                          f"bias {np.round(bias, 6).tolist()}; this engine's latent datasets use scale "
                          f"{list(SCALE)} and bias {list(BIAS)} (EDM2's defaults, engine/perceptual/vae.py)")


def check_data(s: Latent512Settings, dataset, nets: dict) -> None:
    problems = []
    want = [8, s.latent_resolution, s.latent_resolution]
    if not dataset.is_latent or list(dataset.image_shape) != want:
        problems.append(f"{dataset.path} holds {'latents' if dataset.is_latent else 'images'} of shape "
                        f"{list(dataset.image_shape)}; the recipe needs SD-VAE moments {want} (EDM2's encode)")
    if not dataset.has_labels:
        problems.append(f"{dataset.path} has no class labels (dataset.json)")
    for name, net in nets.items():
        u = net.unet
        if (u.img_resolution, u.img_channels, u.label_dim) != (s.latent_resolution, 4, s.label_dim):
            problems.append(f"{name} is a {u.img_channels}×{u.img_resolution}² network with {u.label_dim} "
                            f"classes; the recipe needs 4×{s.latent_resolution}² with {s.label_dim}")
    if problems:
        raise EngineError("; ".join(problems))


# ---- the pipeline ------------------------------------------------------------------------------------------------

def run_latent512(doc: str, settings: Latent512Settings, name: str, argv=None) -> dict:
    args = parse_flags(doc, argv, default_out=f"runs/{name}")
    s = smoke_settings(settings) if args.smoke else settings
    files = {}
    if not args.smoke:
        problems = missing_inputs(s, args)
        if not args.dry_run:
            stop_if_missing(name, problems, "Put the published files in one directory and pass --weights DIR.")
        if not problems:
            files = dict(teacher=args.teacher or in_weights_dir(s.teacher_file),
                         ecd_teacher=in_weights_dir(s.ecd_teacher_file), guide=in_weights_dir(s.guide_file),
                         latent_vgg=ELatentLPIPS.weights_path())
    run = Run(args, name, dataclasses.asdict(s), inputs=files)      # every file that shapes a result, hashed
    if args.dry_run:
        run.record(identity=False)
        return {}

    def stage(stage_name, kimg, lr, betas, ema, schedule):
        return StageConfig(name=stage_name, total_kimg=kimg, batch_size=s.batch_size, lr=lr, optimizer="adam",
                           betas=betas, eps=1e-8, lr_schedule=schedule, ema_beta=ema, log_kimg=s.log_kimg,
                           ckpt_kimg=s.ckpt_kimg, eval_kimg=s.grid_kimg, seed=args.seed, bf16=False,
                           parallel=s.parallel, shard_teacher=s.shard_teacher)

    stages = dict(mid=stage("mid_cmt", s.mid_kimg, s.mid_lr, s.mid_betas, s.mid_ema, "linear"),
                  post=stage("post_ecd", s.ecd_kimg, s.ecd_lr, s.ecd_betas, s.ecd_ema, "constant"))
    # both stages' budgets at this --kimg-scale, before the smoke inputs are written or the released networks loaded
    run.plan(*stages.values())
    data_path, teacher, ecd_teacher, guide, student = (_smoke_inputs(args.out, s) if args.smoke
                                                       else _released(s, args))
    dataset = ImageDataset(data_path, use_labels=True)
    check_data(s, dataset, dict(teacher=teacher, ecd_teacher=ecd_teacher, guide=guide))
    data, device = LatentSource(dataset), run.device
    lpips = ELatentLPIPS(augment=s.augment, variant=s.lpips_variant, color_matrix=s.color_matrix,
                         shared_noise=s.shared_noise).to(device)

    def grid(ema):   # 2-step samples; latents shown as their first three channels (decoding costs an XXL forward)
        from engine.solvers import consistency_sampler
        z = torch.randn(16, *s.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
        labels = torch.arange(16, device=device) % s.label_dim
        x = consistency_sampler(ema, z, (s.mid_t,), labels=labels, generator=torch.Generator(device).manual_seed(1))
        return (x[:, :3] / 1.5).clamp(-1, 1)

    if device.type == "cuda":    # the CMT 512 code: float32 with TF32 matmuls and convolutions (§7.2)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cmt = CMT(teacher.to(device), nfe=s.nfe, trajectories_per_batch=s.trajectories_per_batch, prior=s.mid_prior,
              labels=s.mid_labels, num_classes=s.label_dim, distance=perceptual(lpips))
    mid = run.stage("cmt_ecd", "mid", stages["mid"], copy.deepcopy(student), LatentPosterior(cmt, convention="edm2"),
                    data, init=student, grid=grid)
    del cmt, teacher               # ECD holds its own XXL and the guide; the mid teacher's memory goes back
    ecd = ECD(ecd_teacher.to(device), solver=s.ecd_solver, guide=guide.to(device), guidance=s.guidance,
              P_mean=s.P_mean, P_std=s.P_std, q=s.q, c=s.c, weighting="snrpk")
    post = run.stage("cmt_ecd", "post", stages["post"], copy.deepcopy(student), LatentPosterior(ecd, convention="edm2"),
                     data, init=mid.ema, grid=grid)
    one, two = _evaluate(post.ema, s, run)
    run.record_metrics("cmt_ecd", one_step=one, two_step=two)
    return run.finish(["fid", "fd_dinov2"] if one else [], [])


def _evaluate(ema, s: Latent512Settings, run) -> tuple[dict, dict]:
    """1- and 2-step FID and FD_DINOv2 of decoded samples (engine/evaluate.py's protocol); in --smoke FID alone
    with the random-weight detector (a DINOv2 ViT-L stand-in would be a 1.2 GB file)."""
    metrics = ("fid",) if s.smoke else ("fid", "fd_dinov2")
    inputs, missing = recipe_metric_inputs(run.device, metrics=metrics, stats_names=("img512.pkl",))
    release = os.path.join(run.out, "cmt_ecd", "post_ecd", "ema.safetensors")
    at = lambda name: os.path.join(weights_dir() or "", name)      # noqa: E731
    command = (f"python -m engine.evaluate --net {release} --metrics fid,fd_dinov2 --stats {at('img512.pkl')} "
               f"--stats-preprocessing nvidia --inception {at('inception-2015-12-05.pkl')} --dinov2 "
               f"{at('dinov2_vitl14_pretrain.pth')} --vae {at(VAE_FILES[1])} --latent-convention edm2 "
               f"--schedules 80 80,{s.mid_t:g}")
    if not s.closing_eval or inputs is None:
        if run.lead:
            print("FID / FD_DINOv2 not computed" + "".join(f"\n  missing: {m}" for m in missing)
                  + f"\nto compute them later:\n  {command}", flush=True)
        return {}, {}
    decode = LatentDecoder.from_file(convention="edm2").to(run.device)
    res = recipe_metrics(ema.eval(), s.latent_shape, [(80.0,), (80.0, s.mid_t)], s.fid_samples, run.device, inputs,
                         decode=decode, batch=s.eval_batch)
    return (res[0], res[1]) if res else ({}, {})
