"""The paper's consistency-model pipelines on EDM teachers (CIFAR-10, FFHQ 64, AFHQv2 64): CMT mid-training then
ECT post-training with the settings of docs/spec/cm.md §8.1. The recipe files in recipes/ hold the per-dataset numbers;
this module is the code they share.

A real run needs three files, and says which when one is missing:
  * the dataset zip in EDM's format (NVlabs/edm `dataset_tool.py`), passed with --data;
  * the EDM teacher snapshot (`edm-<dataset>-uncond-vp.pkl`), passed with --teacher;
  * ImageNet VGG16 weights for LPIPS (`vgg16-397923af.pth`, see engine/perceptual/lpips.py).
`--smoke` replaces them with a synthetic dataset zip, a tiny random teacher and a random LPIPS backbone and runs
every stage for a few steps (what CI runs). With ENGINE_INCEPTION_WEIGHTS and ENGINE_FID_STATS set, a real run ends
with 1- and 2-step FID-50k (engine/evaluate.py's protocol); otherwise it prints the evaluation command.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import torch

from engine import dist
from engine.checkpoints.edm_snapshots import TEACHER_ONLY_KEYS, read_edm_pickle
from engine.data import ImageDataset, write_image_dataset
from engine.data.sampler import ImageDatasetSource
from engine.errors import EngineError
from engine.networks import SongUNet
from engine.objectives import CMT, ECT, perceptual
from engine.pipelines.recipe import Run, check_fid_inputs, missing_input, parse_flags, stop_if_missing
from engine.precond import CMPrecond, EDMPrecond
from engine.solvers import consistency_sampler
from engine.training.loop import initialise
from engine.training.stage_config import StageConfig

EDM_TEACHERS = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"


@dataclasses.dataclass
class PaperSettings:
    dataset: str                          # e.g. 'cifar10-32x32' (EDM's dataset naming)
    resolution: int
    q: float                              # ECT Δt = 1/q, constant stage (docs/spec/cm.md §4.3)
    batch_size: int = 128
    dropout: float = 0.2
    nfe: int = 16                         # DPM-Solver++ 3rd-order multistep, logSNR grid 80 → 0.002
    trajectories_per_batch: int = 8       # 8 × 16 = 128 pairs
    mid_kimg: float = 38_400.0            # 300k iterations
    mid_lr: float = 2e-4
    mid_ema: float = 0.999
    mid_t_mid: float = 0.77569            # 2-step point after mid-training
    post_kimg: float = 12_800.0           # 100k iterations
    post_lr: float = 1e-4
    post_ema: float = 0.9999
    mid_t_post: float = 0.821             # 2-step point after ECT
    ckpt_kimg: float = 1_280.0
    log_kimg: float = 12.8
    grid_kimg: float = 1_280.0
    grid_images: int = 64                 # 2-step samples per grid (8 × 8), the same noise every time
    fid_samples: int = 50_000             # FID-50k at the end (when the detector and statistics are given)

    @property
    def teacher_file(self) -> str:
        return f"edm-{self.dataset}-uncond-vp.pkl"


def smoke_settings(s: PaperSettings) -> PaperSettings:
    """Two steps a stage of one trajectory's 16 pairs (CMT's batch is trajectories × nfe), 4 × 4 grids."""
    return dataclasses.replace(s, batch_size=16, trajectories_per_batch=1, mid_kimg=0.032, post_kimg=0.032,
                               ckpt_kimg=0.016, log_kimg=0.016, grid_kimg=0.032, grid_images=16)


def _missing(args, s: PaperSettings) -> list[str | None]:
    return [missing_input("--data", args.data, f"the {s.dataset} dataset zip in EDM's format (e.g. "
                                               f"datasets/{s.dataset}.zip, made with NVlabs/edm dataset_tool.py)"),
            missing_input("--teacher", args.teacher,
                          f"the EDM teacher {s.teacher_file} (from {EDM_TEACHERS}{s.teacher_file})")]


def _smoke_inputs(out: str, s: PaperSettings):
    """A synthetic dataset zip and a tiny random teacher with the dataset's resolution (deterministic)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(64, 3, 4, 4, generator=g)  # smooth random images: upsampled 4×4 colour fields
    img = torch.nn.functional.interpolate(low, size=s.resolution, mode="bilinear", align_corners=False)
    path = os.path.join(out, "smoke-data.zip")
    if dist.rank() == 0:  # under torchrun one rank writes it, the others wait
        write_image_dataset(path, (img * 255).round().to(torch.uint8).numpy(), overwrite=True)
    dist.barrier()
    torch.manual_seed(0)
    tiny = dict(img_resolution=s.resolution, in_channels=3, out_channels=3, model_channels=16,
                channel_mult=[1, 1], num_blocks=1, attn_resolutions=[s.resolution // 2])
    teacher = EDMPrecond(SongUNet(**tiny, augment_dim=9, dropout=0.0))
    # map_augment is teacher-only
    student = initialise(CMPrecond(SongUNet(**tiny, dropout=s.dropout)), teacher, ignore=TEACHER_ONLY_KEYS)
    from engine.perceptual.lpips import LPIPS
    return path, teacher, student, LPIPS.random(0)


def check_inputs(name: str, s: PaperSettings, dataset, teacher, data_path: str, teacher_path: str) -> None:
    """The dataset and the teacher must be what the recipe's settings are for: the paper's resolution, three
    channels, and each other's shape (a mismatch that happens to run would train the wrong thing)."""
    res, ch = teacher.model.img_resolution, teacher.model.img_channels
    problems = []
    if dataset.resolution != s.resolution:
        problems.append(f"{data_path} holds {dataset.resolution}×{dataset.resolution} images; {name} is for "
                        f"{s.resolution}×{s.resolution}")
    if res != s.resolution:
        problems.append(f"{teacher_path} was trained at {res}×{res}; {name} is for {s.resolution}×{s.resolution}")
    if dataset.num_channels != ch:
        problems.append(f"{data_path} has {dataset.num_channels}-channel images, the teacher {teacher_path} "
                        f"{ch}-channel ones")
    if getattr(teacher, "label_dim", 0):   # it would be fed zero labels, and the student trained without them
        problems.append(f"{teacher_path} is class-conditional ({teacher.label_dim} classes); {name} reproduces the "
                        f"paper's unconditional setting (its teacher: {s.teacher_file})")
    if problems:
        raise EngineError("; ".join(problems))


def run_paper_recipe(doc: str, settings: PaperSettings, name: str, argv=None) -> dict:
    args = parse_flags(doc, argv, default_out=f"runs/{name}")
    s = smoke_settings(settings) if args.smoke else settings
    if not args.smoke and not args.dry_run:
        stop_if_missing(name, _missing(args, s), "and ImageNet VGG16 weights for LPIPS (engine/perceptual/lpips.py).")
    if not args.smoke:
        check_fid_inputs(args.device)
    run = Run(args, name, dataclasses.asdict(s))
    if args.dry_run:
        run.record(identity=False)
        return {}

    def stage_cfg(stage, kimg, lr, ema):
        return StageConfig(name=stage, total_kimg=kimg, batch_size=s.batch_size, lr=lr, optimizer="radam",
                           lr_schedule="linear", ema_beta=ema, log_kimg=s.log_kimg, ckpt_kimg=s.ckpt_kimg,
                           eval_kimg=s.grid_kimg, seed=args.seed)

    stages = dict(mid=stage_cfg("mid_cmt", s.mid_kimg, s.mid_lr, s.mid_ema),
                  post=stage_cfg("post_ect", s.post_kimg, s.post_lr, s.post_ema))
    run.plan(*stages.values())   # both stages' budgets at this --kimg-scale, before the smoke inputs are written
    if args.smoke:
        data_path, teacher, student, lpips = _smoke_inputs(args.out, s)
    else:
        from engine.perceptual.lpips import LPIPS
        data_path = args.data
        snapshot = read_edm_pickle(args.teacher)        # read once: teacher and student come from it
        teacher = snapshot.network(mode="teacher")
        # The student starts as the teacher (docs/spec/cm.md §3.3): same weights, CM wrapper, dropout 0.2, no
        # augmentation labels (map_augment is ignored on load).
        student = snapshot.network(mode="student", drop_augment=True,
                                   overrides=dict(dropout=s.dropout)).train().requires_grad_(True)
        lpips = LPIPS()
    dataset = ImageDataset(data_path, use_labels=False)
    check_inputs(name, s, dataset, teacher, data_path, args.teacher or "the smoke teacher")
    data = ImageDatasetSource(dataset)
    teacher = teacher.to(run.device)
    distance = perceptual(lpips.to(run.device))

    def grid_fn(mid_t):
        def grid(ema):
            z = torch.randn(s.grid_images, 3, s.resolution, s.resolution, generator=torch.Generator().manual_seed(0))
            return consistency_sampler(ema, z.to(run.device), (mid_t,),
                                       generator=torch.Generator(run.device).manual_seed(1)).clamp(-1, 1)
        return grid

    mid = run.stage("cmt_ect", "mid", stages["mid"], copy.deepcopy(student),
                    CMT(teacher, nfe=s.nfe, trajectories_per_batch=s.trajectories_per_batch, distance=distance),
                    data, init=student, grid=grid_fn(s.mid_t_mid))
    post = run.stage("cmt_ect", "post", stages["post"], copy.deepcopy(student), ECT(q=s.q), data, init=mid.ema,
                     grid=grid_fn(s.mid_t_post))
    one, two = _fid(post.ema, s, run, args.smoke)
    run.record_metrics("cmt_ect", one_step=one, two_step=two)
    return run.finish(["fid"] if one else [], [])


def _fid(ema, s: PaperSettings, run, smoke: bool) -> tuple[dict, dict]:
    """1- and 2-step FID-50k of the post-trained EMA with the evaluation protocol of engine/evaluate.py, each with
    the detector record (file, SHA-256, preprocessing), when the Inception detector and the reference statistics
    are given (ENGINE_INCEPTION_WEIGHTS, ENGINE_FID_STATS); otherwise the command that computes them later."""
    from engine.evaluate import recipe_fid
    release = os.path.join(run.out, "cmt_ect", "post_ect", "ema.safetensors")
    res = [] if smoke else recipe_fid(ema.eval(), (3, s.resolution, s.resolution), [(80.0,), (80.0, s.mid_t_post)],
                                      s.fid_samples, run.device)
    if not res:
        print(f"FID: python -m engine.evaluate --net {release} --stats <refs/{s.dataset}.npz> "
              f"--inception inception-2015-12-05.pt --schedules 80 80,{s.mid_t_post:g}  (or set "
              f"ENGINE_INCEPTION_WEIGHTS and ENGINE_FID_STATS to have the recipe compute it; EDM's published "
              f"statistics also need ENGINE_FID_STATS_PREPROCESSING=nvidia / --stats-preprocessing nvidia)")
        return {}, {}
    return res[0], res[1]
