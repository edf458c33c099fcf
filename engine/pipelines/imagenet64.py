"""The paper's ImageNet-64 pipeline on EDM2's released networks (docs/spec/cm.md §8.2): CMT mid-training from the
EDM2-XL teacher, then either ECT post-training in ECT's ImageNet variant or ECD distilling an autoguided teacher.
recipes/imagenet64_cmt_ect.py holds the numbers; this module is the code.

Inputs, each named in one message when missing:
  * the ImageNet-64 dataset zip of EDM2's `dataset_tool.py convert --resolution=64x64
    --transform=center-crop-dhariwal` (EDM's zip layout with class labels), passed with --data;
  * the teacher: a released EDM2 ImageNet-64 XL reconstruction, by --teacher or by `teacher_file` in --weights;
  * for the ECD arm the guiding network (`guide_file` in --weights) and the guidance weight;
  * ImageNet VGG16 weights for LPIPS (`vgg16-397923af.pth`, engine/perceptual/lpips.py).
The teacher's EMA length, the guide and w are not given by the paper: they are required settings, and a run
without them stops naming the published values (engine/pipelines/edm2_presets.py) and where they come from. The closing
FID-50k and FD_DINOv2 of 1- and 2-step samples need the Inception and DINOv2 weights and EDM2's reference
statistics (img64.pkl); without them the recipe lists what is missing and where it goes.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import torch

from engine import dist
from engine.checkpoints.edm_snapshots import TEACHER_ONLY_KEYS, load_edm_pickle
from engine.checkpoints.files import in_weights_dir
from engine.data import ImageDataset, write_image_dataset
from engine.data.sampler import ImageDatasetSource
from engine.errors import EngineError
from engine.evaluate import recipe_metric_inputs, recipe_metrics
from engine.guidance import GuidedDenoiser
from engine.objectives import CMT, ECD, ECT, perceptual
from engine.pipelines.edm2_presets import GUIDED, PUBLISHED_URL, UNGUIDED, build_edm2_preset, with_unit_gains
from engine.pipelines.recipe import Run, missing_input, parse_flags, stop_if_missing
from engine.solvers import consistency_sampler
from engine.training.loop import initialise
from engine.training.stage_config import StageConfig

ARMS = ("ect", "ecd")
STATS_URL = "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/"


@dataclasses.dataclass
class EDM2Settings:
    dataset: str = "img64"                # EDM2's name: reference statistics img64.pkl
    resolution: int = 64
    channels: int = 3
    label_dim: int = 1000
    teacher_size: str = "xl"
    # Required choices the paper leaves open (None: the run stops and says what was published)
    teacher_file: str | None = None       # which EMA length of the released teacher (and the student's init)
    guide_file: str | None = None         # ECD's autoguidance guide
    guidance: float | None = None         # ECD's w
    arms: tuple[str, ...] = ARMS
    # Shared by all stages (ECT's ImageNet presets: Adam (0.9, 0.99), dropout 0.5 at resolutions ≤ 16)
    batch_size: int = 128
    betas: tuple[float, float] = (0.9, 0.99)
    dropout: float = 0.5
    dropout_res: int = 16
    P_mean: float = -0.8
    P_std: float = 1.6
    c: float = 0.06                       # pseudo-Huber constant of ECT's ImageNet variant (and ECD)
    mid_t: float = 1.526                  # the 2-step point of ECT's ImageNet script
    # CMT mid-training: DPM-Solver++ 3M, 16 NFE, no guidance, LPIPS, lr 7e-4 linear decay to 0
    nfe: int = 16
    trajectories_per_batch: int = 8
    mid_kimg: float = 6_400.0
    mid_lr: float = 7e-4
    mid_ema: float = 0.999
    # ECT post-training: Δt = 1/512, lr 1e-4 linear decay, snrpk weighting
    ect_kimg: float = 6_400.0
    ect_lr: float = 1e-4
    ect_q: float = 512
    ect_ema: float = 0.9999
    # ECD post-training from the CMT checkpoint: Δt = 1/256, constant lr 1e-4, Heun teacher steps, autoguided
    ecd_kimg: float = 12_800.0
    ecd_lr: float = 1e-4
    ecd_q: float = 256
    ecd_solver: str = "heun"
    ecd_ema: float = 0.9999
    ckpt_kimg: float = 640.0
    log_kimg: float = 12.8
    grid_kimg: float = 640.0
    fid_samples: int = 50_000

    @property
    def teacher_preset(self) -> str:
        return f"edm2-{self.dataset}-{self.teacher_size}"


def smoke_settings(s: EDM2Settings) -> EDM2Settings:
    return dataclasses.replace(s, resolution=16, label_dim=10, dropout_res=8, batch_size=32, trajectories_per_batch=2,
                               mid_kimg=0.064, ect_kimg=0.064, ecd_kimg=0.064, ckpt_kimg=0.032, log_kimg=0.032,
                               grid_kimg=0.064, teacher_file="smoke-teacher", guide_file="smoke-guide", guidance=1.7)


def required_choices(s: EDM2Settings, teacher_given: bool) -> list[str]:
    """What the run cannot start without choosing, with the published values and their source."""
    problems = []
    if s.teacher_file is None and not teacher_given:
        pub = UNGUIDED.get(f"{s.teacher_preset}-fid")
        problems.append(
            f"teacher_file: the EMA length of the EDM2-{s.teacher_size.upper()} ImageNet-64 teacher (and the "
            f"student's initialisation); the CMT paper does not give it (docs/spec/cm.md §8.2). "
            + (f"EDM2 publishes {pub.file} as the FID-optimal reconstruction ({pub.metric.upper()} {pub.value}, "
               f"generate_images.py preset {s.teacher_preset}-fid; {PUBLISHED_URL}{pub.file}). " if pub else "")
            + "Set teacher_file in the recipe's SETTINGS (looked up in --weights), or pass --teacher PATH")
    if "ecd" in s.arms and (s.guide_file is None or s.guidance is None):
        pub = GUIDED.get(f"edm2-{s.dataset}-s-autog-fid")
        problems.append(
            "guide_file and guidance: ECD distils an autoguided teacher whose guide and w the paper does not give. "
            + (f"EDM2 publishes autoguidance at ImageNet-64 only for its S net: {pub.net} guided by {pub.guide}, "
               f"w {pub.w} ({pub.metric.upper()} {pub.value}; generate_images.py preset edm2-{s.dataset}-s-autog-fid"
               f", {PUBLISHED_URL}); none for XL. " if pub else "")
            + "Choose a smaller, shorter-trained ImageNet-64 EDM2 guide and w in SETTINGS, or drop 'ecd' from arms")
    return problems


def _file(flag_value, name, what: str) -> tuple[str | None, str | None]:
    """(path, problem) of a pretrained file given by a flag, else by its published name in --weights."""
    path = flag_value or (in_weights_dir(name) if name else None)
    if path and os.path.exists(path):
        return path, None
    where = f"{PUBLISHED_URL}{name}" if name else ""
    return None, (f"{what}: {flag_value or name} not found" + ("" if flag_value else " in the --weights directory")
                  + (f" (from {where})" if where else ""))


def _smoke_inputs(out: str, s: EDM2Settings):
    """A synthetic labelled dataset zip and tiny random EDM2 teacher, guide and student (deterministic)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(64, 3, 4, 4, generator=g)
    img = torch.nn.functional.interpolate(low, size=s.resolution, mode="bilinear", align_corners=False)
    labels = torch.randint(0, s.label_dim, (64,), generator=g)
    path = os.path.join(out, "smoke-data.zip")
    if dist.rank() == 0:
        write_image_dataset(path, (img * 255).round().to(torch.uint8).numpy(), labels.numpy(), overwrite=True)
    dist.barrier()
    torch.manual_seed(0)
    teacher, guide = build_edm2_preset("edm2-tiny"), build_edm2_preset("edm2-tiny")
    for net in (teacher, guide):
        with_unit_gains(net)       # the released gains are not zero
    student = build_edm2_preset("edm2-tiny", use_fp16=False, logvar_channels=None, dropout=s.dropout,
                                dropout_res=s.dropout_res)
    from engine.perceptual.lpips import LPIPS
    return path, teacher.eval(), guide.eval(), initialise(student, teacher, ignore=TEACHER_ONLY_KEYS), LPIPS.random(0)


def check_data(s: EDM2Settings, dataset, teacher, data_path: str) -> None:
    problems = []
    if (dataset.resolution, dataset.num_channels) != (s.resolution, s.channels):
        problems.append(f"{data_path} holds {dataset.num_channels}×{dataset.resolution}×{dataset.resolution} "
                        f"images; the recipe is for {s.channels}×{s.resolution}×{s.resolution}")
    if not dataset.has_labels or dataset.label_dim > teacher.label_dim:
        problems.append(f"{data_path} has {'no' if not dataset.has_labels else dataset.label_dim} class labels; "
                        f"the teacher is conditional on {teacher.label_dim} classes (EDM2's dataset_tool.py writes "
                        f"them to dataset.json)")
    if (teacher.unet.img_resolution, teacher.unet.img_channels) != (s.resolution, s.channels):
        problems.append(f"the teacher is a {teacher.unet.img_channels}×{teacher.unet.img_resolution}² network")
    if problems:
        raise EngineError("; ".join(problems))


def run_edm2_recipe(doc: str, settings: EDM2Settings, name: str, argv=None) -> dict:
    args = parse_flags(doc, argv, default_out=f"runs/{name}")
    s = smoke_settings(settings) if args.smoke else settings
    bad_arms = [a for a in s.arms if a not in ARMS]
    if bad_arms or not s.arms:
        raise EngineError(f"arms must be a non-empty subset of {ARMS}, got {s.arms}")
    files, problems = {}, []
    if not args.smoke:
        problems = required_choices(s, bool(args.teacher))
        problems += [p for p in [missing_input("--data", args.data, "the ImageNet-64 zip of EDM2's dataset_tool.py "
                                               "(convert --resolution=64x64 --transform=center-crop-dhariwal)")] if p]
        if not problems:
            for key, flag, fname, what in (("teacher", args.teacher, s.teacher_file, "the teacher"),
                                           ("guide", None, s.guide_file if "ecd" in s.arms else None, "the guide")):
                if fname or flag:
                    files[key], problem = _file(flag, fname, what)
                    problems += [problem] if problem else []
        if not args.dry_run:
            stop_if_missing(name, problems, "and ImageNet VGG16 weights for LPIPS (vgg16-397923af.pth, "
                                            "engine/perceptual/lpips.py).")
        metric_inputs, _ = recipe_metric_inputs(args.device, stats_names=(f"{s.dataset}.pkl",))  # checked now
    run = Run(args, name, dataclasses.asdict(s), inputs=files)     # the teacher and guide files are fingerprinted
    if args.dry_run:
        run.record(identity=False)
        return {}

    def stage(stage_name, kimg, lr, ema, schedule="linear"):
        return StageConfig(name=stage_name, total_kimg=kimg, batch_size=s.batch_size, lr=lr, optimizer="adam",
                           betas=s.betas, lr_schedule=schedule, ema_beta=ema, log_kimg=s.log_kimg,
                           ckpt_kimg=s.ckpt_kimg, eval_kimg=s.grid_kimg, seed=args.seed)

    stages = dict(mid=stage("mid_cmt", s.mid_kimg, s.mid_lr, s.mid_ema))
    if "ect" in s.arms:
        stages["post_ect"] = stage("post_ect", s.ect_kimg, s.ect_lr, s.ect_ema)
    if "ecd" in s.arms:
        stages["post_ecd"] = stage("post_ecd", s.ecd_kimg, s.ecd_lr, s.ecd_ema, "constant")
    # every stage's budget at this --kimg-scale, before the smoke inputs are written or the teacher loaded
    run.plan(*stages.values())
    if args.smoke:
        data_path, teacher, guide, student, lpips = _smoke_inputs(args.out, s)
    else:
        from engine.perceptual.lpips import LPIPS
        data_path, lpips = args.data, LPIPS()
        teacher = load_edm_pickle(files["teacher"], mode="teacher")
        student = load_edm_pickle(files["teacher"], mode="student",
                                  overrides=dict(dropout=s.dropout, dropout_res=s.dropout_res))
        guide = load_edm_pickle(files["guide"], mode="teacher") if "guide" in files else None
        student.train().requires_grad_(True)
    dataset = ImageDataset(data_path, use_labels=True)
    check_data(s, dataset, teacher, data_path)
    data, device = ImageDatasetSource(dataset), run.device
    teacher = teacher.to(device)

    def grid(ema):
        z = torch.randn(64, s.channels, s.resolution, s.resolution, generator=torch.Generator().manual_seed(0))
        labels = torch.arange(64, device=device) % s.label_dim
        return consistency_sampler(ema, z.to(device), (s.mid_t,), labels=labels,
                                   generator=torch.Generator(device).manual_seed(1)).clamp(-1, 1)

    arms = tuple(f"cmt_{a}" for a in s.arms)
    cmt = CMT(teacher, nfe=s.nfe, trajectories_per_batch=s.trajectories_per_batch,
              distance=perceptual(lpips.to(device)))
    mid = run.stage("cmt", "mid", stages["mid"], copy.deepcopy(student), cmt, data, init=student, grid=grid,
                    shared_by=arms)
    posts = {}
    if "ect" in s.arms:
        ect = ECT(P_mean=s.P_mean, P_std=s.P_std, q=s.ect_q, c=s.c, weighting="snrpk")
        posts["cmt_ect"] = run.stage("cmt_ect", "post", stages["post_ect"], copy.deepcopy(student), ect, data,
                                     init=mid.ema, grid=grid)
    if "ecd" in s.arms:
        guided = GuidedDenoiser(teacher, guide.to(device), s.guidance)
        ecd = ECD(guided, solver=s.ecd_solver, P_mean=s.P_mean, P_std=s.P_std, q=s.ecd_q, c=s.c)
        posts["cmt_ecd"] = run.stage("cmt_ecd", "post", stages["post_ecd"], copy.deepcopy(student), ecd, data,
                                     init=mid.ema, grid=grid)
    metrics = None if args.smoke else metric_inputs
    for arm, res in posts.items():
        one, two = _evaluate(res.ema, s, run, metrics)
        run.record_metrics(arm, one_step=one, two_step=two)
    if metrics is None:
        _say_how_to_evaluate(s, run, posts)
    return run.finish(["fid", "fd_dinov2"] if metrics else [], [])


def _evaluate(ema, s: EDM2Settings, run, inputs) -> tuple[dict, dict]:
    """1- and 2-step FID-50k and FD_DINOv2 of an arm's EMA (engine/evaluate.py's protocol)."""
    if inputs is None:
        return {}, {}
    res = recipe_metrics(ema.eval(), (s.channels, s.resolution, s.resolution), [(80.0,), (80.0, s.mid_t)],
                         s.fid_samples, run.device, inputs)
    return (res[0], res[1]) if res else ({}, {})


def _say_how_to_evaluate(s: EDM2Settings, run, posts: dict) -> None:
    """One message: the files the metrics need that are missing, where each goes, and the commands for later."""
    _, missing = recipe_metric_inputs(run.device, stats_names=(f"{s.dataset}.pkl",),
                                      stats_where=f" (EDM2's {STATS_URL}{s.dataset}.pkl)")
    if not run.lead:
        return
    stage = dict(cmt_ect="post_ect", cmt_ecd="post_ecd")
    lines = [f"python -m engine.evaluate --net {os.path.join(run.out, arm, stage[arm], 'ema.safetensors')} --metrics "
             f"fid,fd_dinov2 --stats {s.dataset}.pkl --stats-preprocessing nvidia --schedules 80 80,{s.mid_t:g}"
             for arm in posts]
    text = "FID / FD_DINOv2 not computed" + (" (--smoke)" if run.args.smoke else "")
    text += "".join(f"\n  missing: {m}" for m in missing)
    print(text + "\nto compute them later:" + "".join(f"\n  {c}" for c in lines), flush=True)
