"""Few-step evaluation with the published protocols: FID (Inception, docs/spec/cm.md §7) and FD_DINOv2
(docs/spec/edm2_latent.md
§5.1) of 1- and 2-step samples (or any listed σ schedule), with fixed seeds, across ranks.

    python -m engine.evaluate --net runs/x/cmt_ect/post_ect/ema.safetensors --stats refs/cifar10-32x32.npz \\
        --inception inception-2015-12-05.pt [--metrics fid] [--num-samples 50000] [--schedules 80 80,0.821] \\
        [--seed-start 0] [--batch 128] [--out eval/] [--save-samples] [--captions coco256-val.captions]
    torchrun --nproc_per_node=8 -m engine.evaluate ...        # the same samples, split over ranks

Protocol. Sample i (i = seed − seed_start) uses its own generator seeded with its seed: z ~ N(0, I) (CMT's
sampler, docs/spec/cm.md §3.5: x = σ_max·z, then f, re-noise at each intermediate σ with that generator's next
draw), a uniformly random class for class-conditional networks. Samples become uint8 as the reference code
does: clamp(x·127.5 + 128, 0, 255) then truncation. Global batches of `--batch` consecutive seeds are dealt to
ranks round-robin, so every batch is computed with the same composition at any world size: the samples, and so
the features and metrics, are identical on 1 or N processes. Statistics use the unbiased covariance of EDM /
EDM2 (the CMT/ECT code divides by N; docs/spec/cm.md §7.2 — a 2e-5 relative difference at 50k). EDM and EDM2
report the best of three seed ranges; run three times with --seed-start 0, 50000, 100000 for that.

Latent networks (4 channels) are decoded with the SD VAE under EDM2's latent convention (engine/perceptual/vae.py,
--vae);
the Python API takes any `decode` (latents → uint8 images, or floats in [−1, 1]).

What is sampled follows from what the network is (`network_kind`, from the classes the loaders build): consistency
models with σ schedules, Mean Flow networks with t schedules, diffusion denoisers (EDM's and EDM2's teachers, this
engine's pre-training stages) only with `--schedules heun[:N]`. A text-to-image MM-DiT is conditioned on captions of
a caption store (`--captions`, engine/data/captions.py), one per seed as U-ViT's COCO protocol draws them
(`caption_conditions`). What would sample and score nonsense is refused before the first sample, as are statistics
that are not covariances, of another dimension, or a count whose features do not fit in memory.

FID protocol. The Inception detector runs NVIDIA's preprocessing by default (`--fid-preprocessing nvidia`, what
EDM, EDM2, ECT and CMT report; `pytorch-fid` is the alternative, engine/metrics/inception.py), and a FID is
computed only against statistics of the same preprocessing (engine/metrics/reference_stats.py: statistics
record theirs; for files that do not, such as EDM's / EDM2's published ones, declare it with
`--stats-preprocessing nvidia`). Both are checked before any sample is drawn.

The report (`report.json`) names everything the number depends on: network file and hash, sample count, seed
range, schedules, detector files with hash, layout and preprocessing, statistics file and hash with its
preprocessing, covariance convention, world size.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from engine import dist
from engine.checkpoints.files import file_sha256, in_weights_dir
from engine.checks import positive_int_arg, seed_arg
from engine.data.image_grid import save_image_grid
from engine.errors import EngineError
from engine.metrics.frechet import FeatureStatistics, frechet_distance
from engine.metrics.reference_stats import METRICS, StatsError, check_fid_preprocessing, load_detectors, load_stats
from engine.solvers import consistency_sampler, edm2_sampler, mean_flow_sampler


def parse_schedule(text: str) -> tuple:
    """'80' → (80,): one step; '80,0.821' → two steps (σ_max, then re-noise to 0.821); 'heun' or 'heun:N' →
    ('heun', N): EDM2's deterministic Heun sampler with N steps (default 32, 2N − 1 calls) for a diffusion
    network (a teacher's reference samples; docs/spec/edm2_latent.md §4.1)."""
    if text.startswith("heun"):
        n = text.partition(":")[2] or "32"
        if not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"heun:N needs a positive step count, got {text!r}")
        return ("heun", int(n))
    try:
        s = tuple(float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"a schedule is comma-separated σ values, got {text!r}") from e
    if not s or any(b >= a for a, b in zip(s[:-1], s[1:])) or s[-1] <= 0:
        raise argparse.ArgumentTypeError(f"a schedule's σ values must be positive and decreasing, got {text!r}")
    return s


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[−1, 1] floats → uint8 as the reference metric code: clamp(x·127.5 + 128, 0, 255), truncated."""
    return (x.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def is_flow_map(net) -> bool:
    """A Mean Flow network `net(z, t, r, labels)` (engine.networks.DiT), as opposed to a consistency function."""
    return bool(getattr(net, "mean_flow", False))


def default_schedules(net) -> list[tuple[float, ...]]:
    """1 and 2 steps: σ (80,), (80, 0.821) for consistency models; t (1,), (1, 0.5) for Mean Flow."""
    return [(1.0,), (1.0, 0.5)] if is_flow_map(net) else [(80.0,), (80.0, 0.821)]


def network_kind(net) -> str | None:
    """What `net` samples as, from the wrapper and backbone the loaders build — only from the allow-lists of
    engine/checkpoints/registry.py, so the classes say what the file was:

      'consistency'  CMPrecond (ECT / CMT students; a reference ECMPrecond .pkl), or EDM2Precond without the
                     uncertainty head (the 512² and ImageNet-64 students drop it: engine/checkpoints/edm_snapshots.py);
      'diffusion'    EDMPrecond (EDM's teachers, this engine's EDM-loss pre-training stages), or EDM2Precond with
                     the head (EDM2's loss trains it: EDM2's snapshots and pre-training): denoisers D(x, σ);
      'flow map'     a Mean Flow DiT / MM-DiT (mean_flow=True);
      'velocity'     a flow-matching DiT / MM-DiT (mean_flow=False: the SiT teachers);
      None           anything else: a bare backbone, a plain callable given to the API."""
    from engine.networks import DiT, MMDiT
    from engine.precond import CMPrecond, EDM2Precond, EDMPrecond
    if isinstance(net, (DiT, MMDiT)):
        return "flow map" if net.mean_flow else "velocity"
    if isinstance(net, EDM2Precond):
        return "diffusion" if net.logvar_channels else "consistency"
    if isinstance(net, EDMPrecond):
        return "diffusion"
    if isinstance(net, CMPrecond):
        return "consistency"
    return None


def is_text_to_image(net) -> bool:
    """Whether `net` is conditioned on caption features (the MM-DiT: engine/networks/mmdit.py `context_shape`)."""
    return getattr(net, "context_shape", None) is not None


def _schedule_text(schedule) -> str:
    return f"heun:{schedule[1]}" if schedule[0] == "heun" else ",".join(f"{s:g}" for s in schedule)


def check_network(net, schedules, conditions=None, where: str = "the network") -> None:
    """Refuse, before any sample is drawn, what would sample without error and score nonsense: a diffusion
    denoiser under few-step σ schedules (one denoising step from σ = 80 is a blur, its FID in the thousands),
    EDM2's Heun sampler on a flow map, a flow-matching velocity network (no sampler here), and a text-to-image
    network without captions (every sample would be of the null caption)."""
    kind = network_kind(net)
    cls = type(net).__name__
    few_step = [_schedule_text(s) for s in schedules if s[0] != "heun"]
    if kind == "diffusion" and few_step:
        what = "EDM2Precond with its uncertainty head: EDM2-loss" if cls == "EDM2Precond" else "EDMPrecond: EDM-loss"
        raise EngineError(f"{where} is a diffusion denoiser ({what} training), not a consistency model or flow map: "
                          f"the schedules {' '.join(few_step)} would score single denoiser calls on noise, not "
                          f"its samples; sample it with --schedules heun[:N] (EDM2's Heun sampler, 32 steps "
                          f"by default)")
    if kind == "velocity":
        raise EngineError(f"{where} is a flow-matching velocity network ({cls} with mean_flow=False: a SiT "
                          f"teacher), not a flow map or consistency model; this evaluation has no sampler for it")
    if kind == "flow map" and len(few_step) < len(schedules):
        raise EngineError(f"{where} is a Mean Flow network ({cls}): it is sampled with t schedules (default 1 "
                          f"1,0.5), not heun, which is EDM2's sampler for diffusion denoisers")
    if is_text_to_image(net) and conditions is None:
        raise EngineError(f"{where} is a text-to-image {cls}: give the captions to condition its samples on "
                          f"(--captions <caption store>, python -m engine.pipelines.encode_captions; the API's "
                          f"`conditions`); without them every sample would be of the null caption")


def caption_conditions(store, seed: int = 0):
    """U-ViT's evaluation prompts as a function of the sample's seed: a uniformly random image of the caption
    store (engine/data/captions.py) and one of its captions, uniformly; its CLIP features are the sample's
    condition (sample_batch `conditions`). The COCO recipe's grids and FID-30k draw with it too
    (recipes/coco_t2i_cmt_mf.py)."""
    def conditions(seeds):
        rows = []
        for s in seeds:
            h = int.from_bytes(hashlib.sha256(f"{seed}/eval-caption/{int(s)}".encode()).digest()[:16], "little")
            i = h % len(store)
            rows.append(store.offsets[i] + (h >> 64) % int(store.counts([i])[0]))
        return torch.from_numpy(np.stack([np.asarray(store.captions[r], dtype=np.float32) for r in rows]))
    return conditions


# Until every batch is in, rank 0 keeps one entry per batch — its index, its first images, each detector's features
# (float32) — and sorts them, so that the statistics do not depend on the world size (evaluate). An upper estimate of
# an entry's Python overhead, beside its arrays:
_BATCH_ENTRY_BYTES = 1024


def held_bytes(num: int, batch: int, feature_dims, sample_bytes: int = 0) -> int:
    """What evaluating `num` samples keeps in rank 0's memory, at least: every sample's float32 features, its
    image when samples are kept (`sample_bytes`), and the batches' entries."""
    return num * (4 * sum(feature_dims) + sample_bytes) + -(-num // batch) * _BATCH_ENTRY_BYTES


def check_sample_count(num: int, batch: int, feature_dims, sample_bytes: int = 0) -> None:
    """Refuse a --num-samples whose features (and kept samples) cannot be held in this machine's memory before a
    single one is drawn: the run would otherwise sample for hours and fail at the end (or at the start: a
    MemoryError). The bound is the physical memory (os.sysconf), which no count may exceed whatever else runs."""
    need = held_bytes(num, batch, feature_dims, sample_bytes)
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):   # no sysconf (not POSIX): nothing to compare with
        return
    if need > have:
        per = 4 * sum(feature_dims) + sample_bytes
        raise EngineError(f"--num-samples {num}: evaluation holds {need / 2**30:.4g} GiB until the end (each "
                          f"sample's features{' and image' if sample_bytes else ''}, {per} bytes, and an entry per "
                          f"batch of {batch}), more than this machine's {have / 2**30:.4g} GiB of memory; the "
                          f"published protocols use 50000 samples (COCO: 30000)")


def sample_batch(net, seeds: list[int], shape, schedule, label_dim: int, device, decode=None,
                 conditions=None) -> torch.Tensor:
    """uint8 samples for `seeds` (one generator each: the samples do not depend on the batch they are in). Each
    seed's generator draws, in order, its noise z, its class, and the fresh noise of every re-noising step; the
    samplers are engine/solvers.py's. `conditions(seeds)`, when given, is the batch's condition instead of a drawn
    class (caption features of text-to-image: recipes/coco_t2i_cmt_mf.py), a function of the seeds alone."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    labels = None
    if conditions is not None:
        labels = conditions(seeds).to(device)
    elif label_dim:
        labels = torch.tensor([int(torch.randint(label_dim, (1,), generator=g)) for g in gens], device=device)
    if schedule[0] == "heun":  # a diffusion network through EDM2's sampler
        x = edm2_sampler(net, z, labels, num_steps=schedule[1])
    elif is_flow_map(net):     # the schedule lists the t each step starts from (docs/spec/mf.md §1.8)
        x = mean_flow_sampler(net, z, schedule, labels)
    else:                  # σ_max, then the σ each re-noised step starts from (docs/spec/cm.md §3.5)
        renoise = [torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device) for _ in schedule[1:]]
        x = consistency_sampler(net, z, schedule[1:], sigma_max=schedule[0], labels=labels, noise=renoise)
    if decode is not None:
        x = decode(x)  # uint8 images (engine.perceptual.vae.LatentDecoder), or floats in [−1, 1]
    return x if x.dtype == torch.uint8 else to_uint8(x)


def check_statistics(detectors: dict, stats, stats_preprocessing: str | None = None) -> dict:
    """What the metrics will be computed against, checked before sampling: every metric has statistics of the
    detector's dimension, and the FID statistics share the detector's preprocessing (StatsError naming both
    otherwise; load_stats has checked that they are finite, and each Σ a covariance). Returns
    {metric: preprocessing} for the report."""
    if stats is None:
        return {}
    missing = [m for m in detectors if m not in stats]
    if missing:
        raise StatsError(f"the reference statistics {stats.get('path', '')} have no {', '.join(missing)} entry")
    for m, d in detectors.items():
        dim = getattr(d, "feature_dim", None)
        if dim is not None and len(stats[m][0]) != dim:
            raise StatsError(f"the reference statistics {stats.get('path', '')} hold {len(stats[m][0])}-dimensional "
                             f"{m} features; the {m} detector's are {dim}-dimensional: statistics of another "
                             f"detector, or not of one")
    return {"fid": check_fid_preprocessing(stats, detectors["fid"], stats_preprocessing)} if "fid" in detectors else {}


def evaluate(net, shape, schedules, num: int, seed_start: int = 0, batch: int = 128, detectors=None,
             stats=None, device="cpu", decode=None, progress: bool = True, keep_samples: bool = False,
             stats_preprocessing: str | None = None, conditions=None) -> dict:
    """Samples and metrics for each schedule; on rank 0 the result dict, on other ranks None.

    `detectors`: {metric: feature network}; `stats`: reference statistics (engine.metrics.reference_stats);
    `stats_preprocessing`: the FID preprocessing of statistics that do not record one (check_statistics);
    `conditions`: the samples' conditions as a function of their seeds (sample_batch)."""
    detectors = detectors or {}
    check_statistics(detectors, stats, stats_preprocessing)
    check_network(net, schedules, conditions)
    label_dim = int(getattr(getattr(net, "model", net), "label_dim", 0) or 0)
    nbatches = (num + batch - 1) // batch
    mine = range(dist.rank(), nbatches, dist.world_size())
    out = {}
    for schedule in schedules:
        var = "t" if is_flow_map(net) else "σ"
        if schedule[0] == "heun":
            key = f"heun-{schedule[1]} ({2 * schedule[1] - 1} NFE)"
        else:
            key = f"{len(schedule)}-step" + ("" if len(schedule) < 2 else f" {var}=" + ",".join(f"{s:g}" for s in schedule))
        local = []
        t0 = time.time()
        for b in tqdm(mine, desc=key, disable=not progress or dist.rank() != 0):
            seeds = list(range(seed_start + b * batch, seed_start + min((b + 1) * batch, num)))
            images = sample_batch(net, seeds, shape, schedule, label_dim, device, decode, conditions)
            feats = {m: d(images).cpu() for m, d in detectors.items()}
            local.append((b, images.cpu() if keep_samples or b == 0 else None, feats))
        gathered = dist.gather_objects(local)
        if gathered is None:
            continue
        parts = sorted((p for rank_parts in gathered for p in rank_parts), key=lambda p: p[0])
        res = {"schedule": list(schedule), "seconds": time.time() - t0}
        if keep_samples:
            res["samples"] = torch.cat([p[1] for p in parts])
        res["grid"] = parts[0][1][:64]
        for m in detectors:
            acc = FeatureStatistics(detectors[m].feature_dim)
            for p in parts:
                acc.update(p[2][m])
            mu, sigma = acc.mu_sigma(unbiased=True)
            if stats is not None:
                res[m] = frechet_distance(mu, sigma, *stats[m])
        out[key] = res
    return out if dist.rank() == 0 else None


def recipe_fid_inputs(device):
    """(detectors, stats, declared preprocessing) of the paper recipes' closing FID, from the environment
    (ENGINE_INCEPTION_WEIGHTS, ENGINE_FID_STATS, ENGINE_FID_PREPROCESSING, and ENGINE_FID_STATS_PREPROCESSING for
    statistics that do not record their preprocessing), checked against each other; None when the detector or
    the statistics are not given. Recipes call it before training too, so a mismatch stops the run at its
    start rather than after it."""
    inception, stats = os.environ.get("ENGINE_INCEPTION_WEIGHTS"), os.environ.get("ENGINE_FID_STATS")
    if not (inception and stats):
        return None
    detectors = load_detectors(["fid"], inception, device=device,
                               fid_preprocessing=os.environ.get("ENGINE_FID_PREPROCESSING", "nvidia"))
    stats, declared = load_stats(stats), os.environ.get("ENGINE_FID_STATS_PREPROCESSING")
    check_statistics(detectors, stats, declared)
    return detectors, stats, declared


def recipe_fid(net, shape, schedules, num: int, device, decode=None, progress: bool = True) -> list[dict]:
    """FID of each schedule as the paper recipes record it, [{"fid": value, "fid_detector": {...}}, ...] — the
    detector's file, SHA-256, layout and preprocessing and the statistics file beside each number — or [] when
    the detector and statistics are not given (recipe_fid_inputs)."""
    inputs = recipe_fid_inputs(device)
    if inputs is None:
        return []
    detectors, stats, declared = inputs
    res = evaluate(net, shape, schedules, num, detectors=detectors, stats=stats, device=device, decode=decode,
                   progress=progress, stats_preprocessing=declared)
    record = {**detectors["fid"].describe(), "stats": stats["path"], "stats_sha256": file_sha256(stats["path"])}
    return [{"fid": r["fid"], "fid_detector": record} for r in res.values()]


def recipe_metric_inputs(device, metrics=("fid", "fd_dinov2"), stats_names=(), stats_where: str = ""):
    """The detectors and reference statistics of a recipe's closing evaluation, each looked up as the rest of the
    engine does (ENGINE_INCEPTION_WEIGHTS, ENGINE_DINOV2_WEIGHTS, ENGINE_FID_STATS, else their published names in
    the --weights directory): ((detectors, stats, declared preprocessing), []) when all are present — checked
    against each other, so call it before training too — else (None, one line per missing file saying what it is
    and where it goes)."""
    missing, detectors = [], {}
    stats_path = os.environ.get("ENGINE_FID_STATS") or in_weights_dir(*stats_names)
    if not stats_path or not os.path.exists(stats_path):
        missing.append(f"reference statistics ({' or '.join(stats_names) or 'a .npz / .pkl file'})"
                       + (f": not found: {stats_path}" if stats_path else "")
                       + f"; set ENGINE_FID_STATS or put it in the --weights directory{stats_where}")
    for m in metrics:
        try:
            detectors.update(load_detectors([m], device=device,
                                            fid_preprocessing=os.environ.get("ENGINE_FID_PREPROCESSING", "nvidia")))
        except FileNotFoundError as e:
            missing.append(str(e))
    if missing:
        return None, missing
    stats, declared = load_stats(stats_path), os.environ.get("ENGINE_FID_STATS_PREPROCESSING")
    check_statistics(detectors, stats, declared)
    return (detectors, stats, declared), []


def recipe_metrics(net, shape, schedules, num: int, device, inputs, progress: bool = True, decode=None,
                   batch: int = 128) -> list[dict]:
    """Every metric of `inputs` (recipe_metric_inputs) for each schedule, with the detectors' and statistics'
    records beside the numbers: [{"fid": .., "fd_dinov2": .., "detectors": {...}, "stats": .., ...}, ...].
    `decode`: latents → uint8 images (engine.perceptual.vae.LatentDecoder) for latent-space networks."""
    detectors, stats, declared = inputs
    res = evaluate(net, shape, schedules, num, detectors=detectors, stats=stats, device=device, progress=progress,
                   stats_preprocessing=declared, decode=decode, batch=batch)
    if res is None:
        return []
    record = dict(detectors={m: d.describe() for m, d in detectors.items()}, stats=stats["path"],
                  stats_sha256=file_sha256(stats["path"]))
    return [{**{m: r[m] for m in detectors}, **record} for r in res.values()]


def _load_net(path: str, device):
    if path.endswith(".safetensors"):
        from engine.checkpoints.releases import load_safetensors_network
        net = load_safetensors_network(path)  # a CMPrecond consistency model or a Mean Flow DiT
    elif path.endswith(".pkl"):
        from engine.checkpoints.edm_snapshots import load_edm_pickle
        net = load_edm_pickle(path)  # the wrapper of the file: ECMPrecond → CMPrecond
    else:
        raise EngineError(f"--net: expected a release (.safetensors) or an EDM/ECT/CMT snapshot (.pkl), got {path}")
    return net.to(device).eval().requires_grad_(False)


def _sample_shape(net, path: str) -> tuple[int, int, int]:
    """(C, H, W) of the network's samples, refused when they are not images or SD VAE latents."""
    m = getattr(net, "model", net)
    channels = getattr(m, "in_channels", None) or m.init_kwargs.get("in_channels", 3)
    if getattr(m, "img_resolution", None) is None:   # MLPNet: vector data (engine/networks/mlp.py)
        raise EngineError(f"--net {path}: a {type(m).__name__} on {channels}-D points (the Gaussian-mixture "
                          f"recipes' networks), not images: FID and FD_DINOv2 do not apply; compare its samples with "
                          f"the data by the sliced Wasserstein distance (engine/metrics/sliced_wasserstein.py), as "
                          f"engine/pipelines/gmm.py evaluate does")
    if channels not in (1, 3, 4):
        raise EngineError(f"--net {path} generates {channels}-channel samples: neither images (1 or 3 channels) nor "
                          f"SD VAE latents (4), so no detector can score them")
    return channels, m.img_resolution, m.img_resolution


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description="FID / FD_DINOv2 of few-step samples (see the module docstring)")
    p.add_argument("--net", required=True)
    p.add_argument("--stats", default=None, help="reference statistics (.npz EDM or .pkl EDM2)")
    p.add_argument("--metrics", default="fid", help="comma list of fid, fd_dinov2, or 'none' (samples only)")
    p.add_argument("--inception", default=None, help="inception-2015-12-05.pt / .pkl, or pytorch-fid's .pth")
    p.add_argument("--fid-preprocessing", default="nvidia", choices=["nvidia", "pytorch-fid"],
                   help="the Inception detector's input protocol (default nvidia: what the papers report)")
    p.add_argument("--stats-preprocessing", default=None, choices=["nvidia", "pytorch-fid"],
                   help="the FID preprocessing of --stats when the file does not record it (EDM's / EDM2's "
                        "published statistics: nvidia)")
    p.add_argument("--dinov2", default=None)
    p.add_argument("--vae", default=None, help="SD VAE safetensors, for latent networks")
    p.add_argument("--latent-convention", choices=["edm2", "sd"], default="edm2",
                   help="edm2: standardised latents, decoder output in [0, 1]; sd: latents × 0.18215, output in "
                        "[−1, 1] (Mean Flow / DiT, docs/spec/mf.md §7.1)")
    p.add_argument("--captions", default=None,
                   help="text-to-image networks: the caption store whose captions condition the samples, one per "
                        "seed as U-ViT's protocol draws them (python -m engine.pipelines.encode_captions; COCO: the "
                        "val2014 store)")
    p.add_argument("--num-samples", type=positive_int_arg, default=50_000)
    p.add_argument("--seed-start", type=seed_arg, default=0)
    p.add_argument("--schedules", nargs="+", type=parse_schedule, default=None,
                   help="σ lists for consistency models (default 80 80,0.821); t lists for Mean Flow (default 1 "
                        "1,0.5); "
                        "heun[:N] for a diffusion network (EDM2's sampler, 32 steps = 63 NFE)")
    p.add_argument("--batch", type=positive_int_arg, default=128)
    p.add_argument("--out", default="eval")
    p.add_argument("--save-samples", action="store_true", help="also write samples.npz (uint8, in seed order)")
    a = p.parse_args(argv)
    device = dist.init()
    # Every input is checked before the first sample is drawn: a mistake costs seconds, not the sampling.
    metrics = [] if a.metrics == "none" else a.metrics.split(",")
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise EngineError(f"--metrics: unknown {', '.join(bad)}; known: {', '.join(METRICS)} or none")
    if metrics and not a.stats:
        raise EngineError("--stats is needed to compute " + ", ".join(metrics))
    if not os.path.exists(a.net):
        raise EngineError(f"--net: {a.net} not found")
    from engine.cli import check_run_directory
    check_run_directory(a.out)
    stats = load_stats(a.stats) if metrics else None
    detectors = load_detectors(metrics, a.inception, a.dinov2, device, a.fid_preprocessing)
    checked = check_statistics(detectors, stats, a.stats_preprocessing)
    net = _load_net(a.net, device)
    shape = _sample_shape(net, a.net)
    schedules = a.schedules or default_schedules(net)
    conditions = captions = None
    if a.captions is not None:
        if not is_text_to_image(net):
            raise EngineError(f"--captions: {a.net} is not a text-to-image network ({type(net).__name__}); its "
                              f"samples are conditioned on classes drawn from their seeds")
        from engine.data.captions import CaptionStore
        captions = CaptionStore(a.captions)
        if tuple(captions.captions.shape[1:]) != tuple(net.context_shape):
            raise EngineError(f"--captions {a.captions} holds caption features {tuple(captions.captions.shape[1:])}; "
                              f"{a.net} takes {tuple(net.context_shape)}")
        conditions = caption_conditions(captions)
    check_network(net, schedules, conditions, where=f"--net {a.net}")
    decode = None
    if shape[0] == 4:
        from engine.perceptual.vae import LatentDecoder
        try:
            decode = LatentDecoder.from_file(a.vae, convention=a.latent_convention).to(device)
        except FileNotFoundError as e:
            raise EngineError(f"{a.net} generates {shape[0]}-channel latents: {e}") from None
    # A kept sample is a uint8 image: 3 channels at 8× the latents' resolution after the SD VAE (engine/perceptual/vae.py).
    image_bytes = 3 * (8 * shape[1]) ** 2 if decode is not None else shape[0] * shape[1] * shape[2]
    check_sample_count(a.num_samples, a.batch, [d.feature_dim for d in detectors.values()],
                       image_bytes * len(schedules) if a.save_samples else 0)
    res = evaluate(net, shape, schedules, a.num_samples, a.seed_start, a.batch, detectors, stats, device,
                   decode=decode, keep_samples=a.save_samples, stats_preprocessing=a.stats_preprocessing,
                   conditions=conditions)
    if res is not None:
        os.makedirs(a.out, exist_ok=True)
        report = {"net": a.net, "net_sha256": file_sha256(a.net), "num_samples": a.num_samples,
                  "seeds": [a.seed_start, a.seed_start + a.num_samples - 1], "batch": a.batch,
                  "world_size": dist.world_size(), "uint8": "clamp(x*127.5+128, 0, 255), truncated",
                  "covariance": "unbiased (N-1)",
                  "stats": None if not metrics else {"file": a.stats, "sha256": file_sha256(a.stats),
                                                     "fid_preprocessing": checked.get("fid"),
                                                     "recorded": stats.get("detectors", {})},
                  "detectors": {mm: d.describe() for mm, d in detectors.items()},
                  "results": {}}
        if captions is not None:
            report["captions"] = {"store": a.captions, "fingerprint": captions.fingerprint(),
                                  "protocol": "U-ViT: per seed, a uniformly random image of the store and one of "
                                              "its captions (engine.evaluate.caption_conditions, seed 0)"}
        samples = {}
        for key, r in res.items():
            report["results"][key] = {k: v for k, v in r.items() if k not in ("samples", "grid")}
            name = key.split(" ")[0]
            save_image_grid(r["grid"].float() / 127.5 - 1, os.path.join(a.out, f"grid-{name}.png"))
            if a.save_samples:
                samples[name] = r["samples"].numpy()
        if a.save_samples:
            np.savez(os.path.join(a.out, "samples.npz"), **samples)
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        for key, r in report["results"].items():
            print(key, " ".join(f"{mm}={r[mm]:.4f}" for mm in metrics))
    dist.barrier()
    dist.shutdown()
    return res


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
