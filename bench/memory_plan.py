"""Memory per GPU of the paper's large runs under this engine's FSDP2 layout, computed; docs/scaling.md is this
script's output.

    python bench/memory_plan.py                        # print the plan
    python bench/memory_plan.py --write docs/scaling.md

What is computed and from what:
  * DiT (MF-B/4, MF-XL/2): parameter counts from the engine's own networks, built on the meta device; saved
    activations per sample measured by running one training forward of the engine's DiT on the meta device with
    autograd's saved-tensor hooks (storages counted once, parameters excluded), at batch 1 and 2 (the difference
    is the per-sample part), in fp32 and with bf16 weights and inputs (what bf16 autocast saves for matmuls);
  * EDM2-XXL / EDM2-M: parameters, the largest FSDP unit and saved activations (per sample, and the
    batch-independent normalised-weight copies MPConv makes each forward) measured on the engine's own EDM2UNet
    (engine/networks/edm2_unet.py) on the meta device, in float32 — the precision CMT's 512 code trains in — with
    the reference implementation's figures (docs/spec/edm2_latent.md §9.3) beside them;
  * E-LatentLPIPS (engine/perceptual/elatentlpips.py): what its VGG16_Latent_GN trunk saves for the input gradient of
  the
    student's output (meta device) plus what the 'bgcfnc' augmentation saves (measured on a CPU tensor), per pair
    at 64² latents — the mid-training loss network of the ImageNet-512 headline;
  * the FSDP2 layout of engine/dist.py: fp32 master weights, fp32 gradients, Adam's two moments and the EMA all
    sharded 1/W; each block's bf16 parameters gathered for its forward and backward, with the next block
    prefetched (2 blocks resident); a frozen teacher either replicated (fp32) or sharded like the student.
Allocator slack, CUDA context (~0.5–1 GB), the no-grad teacher transients and pixel LPIPS are not included.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

GiB = 2 ** 30
GPU_GIB = 80.0                      # H100/A100 80 GB (usable ≈ 79 GiB; kept as the round budget)
WORLDS = (8, 64, 256)

# docs/spec/edm2_latent.md §1.4 (parameters) and §9.3 (saved activations, reference implementation, fp32)
EDM2 = {
    "XXL": dict(params=1523.2e6, C=448, act_fp32_gib=0.98, weight_copies_gib=11.6),
    "M": dict(params=497.8e6, C=256, act_fp32_gib=0.56, weight_copies_gib=3.80),
}


def _saved(fn, own=()) -> int:
    """Bytes of the storages autograd keeps for backward while `fn()` runs (storages in `own` excluded)."""
    own = {p.untyped_storage()._cdata for p in own}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        if st._cdata not in own and st._cdata not in seen:
            seen.add(st._cdata)
            total += st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def edm2_facts(preset: str) -> dict:
    """Parameters, largest FSDP unit and fp32 saved activations (per sample; batch-independent) of the engine's
    EDM2 network on the meta device (ImageNet-512 latents 4 × 64 × 64, 1000 classes, no uncertainty head)."""
    from engine.dist import fsdp_units
    from engine.pipelines.edm2_presets import build_edm2_preset
    with torch.device("meta"):
        net = build_edm2_preset(preset, use_fp16=False, logvar_channels=None)
    net.train().requires_grad_(True)

    def forward(b):
        x, sigma = torch.randn(b, 4, 64, 64, device="meta"), torch.rand(b, device="meta")
        return lambda: net(x, sigma, torch.zeros(b, 1000, device="meta"))
    one, two = (_saved(forward(b), net.parameters()) for b in (1, 2))
    return dict(params=sum(p.numel() for p in net.parameters()),
                unit=max(sum(p.numel() for p in u.parameters()) for u in fsdp_units(net)),
                act_fp32=two - one, fixed=one - (two - one))


def elatentlpips_per_pair() -> float:
    """Bytes E-LatentLPIPS saves per pair for the student output's gradient: trunk (meta) + augmentation (CPU)."""
    from engine.networks.latent_vgg import LatentVGG
    from engine.perceptual.augment import JointAugment
    with torch.device("meta"):
        trunk = LatentVGG().features.requires_grad_(False)
    per = []
    for b in (1, 2):
        x = torch.randn(b, 4, 64, 64, device="meta", requires_grad=True)
        t = _saved(lambda: trunk(x), trunk.parameters())
        xc, yc = torch.randn(b, 4, 64, 64, requires_grad=True), torch.randn(b, 4, 64, 64)
        a = _saved(lambda: JointAugment("bgcfnc")(xc, yc, torch.Generator().manual_seed(0)))
        per.append(t + a)
    return per[1] - per[0]


def edm2_largest_block_params(C: int) -> float:
    """The 8×8 decoder block0 (spec §1.3: input 8C, output 4C, attention): conv_res0 3×3 8C→4C, conv_res1 3×3
    4C→4C, conv_skip 1×1 8C→4C, emb_linear 4C→4C, attn_qkv 4C→12C, attn_proj 4C→4C (MPConv: no biases)."""
    i, o = 8 * C, 4 * C
    return 9 * i * o + 9 * o * o + i * o + o * o + o * 3 * o + o * o


def dit_facts(name: str) -> dict:
    """Parameters, largest FSDP unit and saved activations per sample of the engine's DiT (meta device)."""
    from engine.dist import fsdp_units
    from engine.networks import DiT
    with torch.device("meta"):
        net = DiT.from_name(name, input_size=32, in_channels=4, num_classes=1000)
    params = sum(p.numel() for p in net.parameters() if p.requires_grad)  # trained (the position table is fixed)
    unit = max(sum(p.numel() for p in u.parameters()) for u in fsdp_units(net))
    acts = {}
    for dtype in (torch.float32, torch.bfloat16):
        per = [saved_bytes(net.to(dtype), b, dtype) for b in (1, 2)]
        acts[dtype] = per[1] - per[0]
    return dict(params=params, unit=unit, act_fp32=acts[torch.float32], act_bf16=acts[torch.bfloat16])


def saved_bytes(net, batch: int, dtype) -> int:
    """Bytes of the storages autograd keeps for backward in one training forward (parameters excluded)."""
    x = torch.randn(batch, 4, 32, 32, device="meta", dtype=dtype)
    t = torch.rand(batch, device="meta", dtype=dtype)
    labels = torch.zeros(batch, dtype=torch.long, device="meta")
    net.requires_grad_(True)
    return _saved(lambda: net(x, t, t, labels), net.parameters())


def per_gpu(student_params: float, world: int, unit_params: float, samples: float, act_bytes: float,
            fixed_act_bytes: float = 0.0, teacher_params: float = 0.0, teacher_sharded: bool = False,
            teacher_unit: float = 0.0, compute_bytes: int = 2) -> dict:
    """Bytes per GPU, by component (see the module docstring for the layout); `compute_bytes` 2 for the bf16
    gathers of a bf16 stage, 4 for a float32 one (StageConfig.bf16 False)."""
    state = 20 * student_params / world                  # fp32 weights, grads, Adam m and v, EMA: 5 × 4 bytes
    gathered = 2 * compute_bytes * unit_params            # copies of 2 blocks (current + prefetched)
    if teacher_params:
        teacher = ((4 * teacher_params / world + 2 * compute_bytes * teacher_unit) if teacher_sharded
                   else 4 * teacher_params)
    else:
        teacher = 0.0
    acts = samples * act_bytes + fixed_act_bytes
    return dict(state=state, gathered=gathered, teacher=teacher, activations=acts,
                total=state + gathered + teacher + acts)


def plan() -> dict:
    b4, xl2 = dit_facts("B/4"), dit_facts("XL/2")
    xxl, m = edm2_facts("edm2-img512-xxl"), edm2_facts("edm2-img512-m")
    lpips = elatentlpips_per_pair()
    rows = []

    def add(run, world, global_units, unit_name, samples_per_unit, **kw):
        per_rank_units = global_units / world
        feasible = per_rank_units >= 1 and global_units % world == 0
        units_used = per_rank_units if feasible else 1          # at least one whole unit per rank
        mem = per_gpu(samples=units_used * samples_per_unit, world=world, **kw)
        rows.append(dict(run=run, world=world, global_units=global_units, unit=unit_name,
                         per_rank=per_rank_units, feasible=feasible,
                         min_global=world * samples_per_unit, samples_per_gpu=units_used * samples_per_unit,
                         **{k: v / GiB for k, v in mem.items()}))

    for W in WORLDS:
        # The ImageNet-512 headline (recipes/imagenet512_cmt_ecd.py), float32 throughout as the CMT 512 code.
        # Mid-training (spec §7.2): 128 pairs = 8 trajectories × 16, XXL teacher, E-LatentLPIPS on every pair.
        common = dict(student_params=xxl["params"], unit_params=xxl["unit"], act_bytes=xxl["act_fp32"] + lpips,
                      fixed_act_bytes=xxl["fixed"], teacher_params=xxl["params"], teacher_unit=xxl["unit"],
                      compute_bytes=4)
        add("ImageNet-512 CMT mid-training (XXL), teacher replicated", W, 8, "trajectories", 16, **common)
        add("ImageNet-512 CMT mid-training (XXL), teacher sharded (recipe default)", W, 8, "trajectories", 16,
            **dict(common, teacher_sharded=True))
        # ECD post-training (spec §8): 128 samples, the XXL-0.075 teacher and the M guide, pseudo-Huber on latents
        add("ImageNet-512 ECD post-training (XXL + M guide), sharded (recipe default)", W, 128, "samples", 1,
            **dict(common, act_bytes=xxl["act_fp32"], teacher_params=xxl["params"] + m["params"],
                   teacher_unit=max(xxl["unit"], m["unit"]), teacher_sharded=True))
        # MF-XL/2 CMT mid-training (docs/spec/mf.md §4.5): 112 pairs = 4 trajectories × 28, B/4 teacher replicated
        dit_common = dict(student_params=xl2["params"], unit_params=xl2["unit"], act_bytes=xl2["act_bf16"])
        add("MF-XL/2 CMT mid-training (B/4 teacher)", W, 4, "trajectories", 28,
            **dict(dit_common, teacher_params=b4["params"]))
        # MF-XL/2 post-training (batch 64) and Mean Flow from scratch (batch 256)
        add("MF-XL/2 post-training", W, 64, "samples", 1, **dit_common)
        add("MF-XL/2 from scratch (batch 256)", W, 256, "samples", 1, **dit_common)
    return dict(b4=b4, xl2=xl2, xxl=xxl, m=m, lpips=lpips, rows=rows)


def markdown(p: dict) -> str:
    b4, xl2 = p["b4"], p["xl2"]
    lines = [
        "# Scaling: torchrun, FSDP2, and a memory plan for the paper's large runs", "",
        f"Generated by `python bench/memory_plan.py --write docs/scaling.md` on {datetime.date.today().isoformat()} "
        "(the numbers below are computed by that script; see its docstring for every input).", "",
        "## Running on many GPUs", "",
        "Every recipe runs under torchrun as well as plain `python`:", "",
        "    torchrun --nproc_per_node=8 recipes/imagenet256_cmt_mf.py --data datasets/imagenet256-sdvae-latents.zip",
        "    torchrun --nnodes=8 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=$HOST:29500 \\",
        "        --max-restarts=3 recipes/imagenet256_cmt_mf.py --data ...", "",
        "* `engine/dist.py` is the only module that touches `torch.distributed`: NCCL on CUDA, gloo on CPU; FSDP2 "
        "`fully_shard` on every block and the root (bf16 compute, fp32 reduction on CUDA), or DDP "
        "(`StageConfig(parallel='ddp')`); a frozen teacher can be sharded too (`shard_teacher=True`).",
        "* A stage's `batch_size` is the **global** batch. The images (CMT: trajectories) it consumes are divided "
        "evenly over the ranks, with an error that names the numbers when they do not divide — the reference CMT "
        "code instead gives each GPU ⌊B/16/W⌋ trajectories and silently trains on nothing at 16 GPUs "
        "(docs/spec/cm.md §3.1).",
        "* A step's noise is drawn for the global batch from (seed, images seen) and each rank keeps its rows; "
        "dropout is seeded per rank. A run's data and noise therefore do not depend on the world size: a 2-process "
        "run reproduces a 1-process run (tests/test_distributed.py: 20 steps, per-step losses within 1e-5, float64 "
        "weights within 1e-9, for CMT, ECT, Mean Flow, sCT and sCD), and a checkpoint resumes at any world size.",
        "* Checkpoints under torchrun are torch.distributed.checkpoint directories (`ckpt-<images>/`, written under "
        "a hidden name and renamed when every rank is done); single-process runs write `ckpt-<images>.pt`. Either "
        "form resumes at any world size. The release is a consolidated EMA `ema.safetensors`.",
        "* Elastic restarts: with `--max-restarts`, a killed rank makes torchrun restart the job, which resumes from "
        "the newest checkpoint (tested with SIGKILL: the final weights equal an uninterrupted run's).",
        "* The JVP objectives (Mean Flow, sCT, sCD) predict with an ordinary forward through the wrapper and take "
        "their tangent without gradients on `engine.dist.jvp_view(net)`: the wrapped module under DDP, the FSDP2 "
        "module itself (its per-block hooks gather each unit's parameters, under torch.func.jvp too; the DiT's "
        "dual-stream JVP, which reads weights directly, gathers them with `dist.unsharded`), so gradients are "
        "reduced once per step; `jvp='fd'` (central differences, two ordinary forwards) needs no forward-mode "
        "support at all (engine/jvp.py).", "",
        "## Inputs", "",
        "| network | trained parameters | largest FSDP unit | saved activations / sample, fp32 | bf16 | source |",
        "|---|---|---|---|---|---|",
        f"| MF-B/4 (engine DiT) | {b4['params'] / 1e6:.1f} M | {b4['unit'] / 1e6:.1f} M | "
        f"{b4['act_fp32'] / 2**20:.0f} MiB | {b4['act_bf16'] / 2**20:.0f} MiB | measured on the meta device |",
        f"| MF-XL/2 (engine DiT) | {xl2['params'] / 1e6:.1f} M | {xl2['unit'] / 1e6:.1f} M | "
        f"{xl2['act_fp32'] / 2**20:.0f} MiB | {xl2['act_bf16'] / 2**20:.0f} MiB | measured on the meta device |",
        *(f"| EDM2-{k} (engine EDM2UNet) | {p[k.lower()]['params'] / 1e6:.1f} M | {p[k.lower()]['unit'] / 1e6:.1f} M "
          f"| {p[k.lower()]['act_fp32'] / GiB:.2f} GiB (+ {p[k.lower()]['fixed'] / GiB:.2f} GiB of normalised-weight "
          f"copies per step) | – | measured on the meta device; the reference implementation: "
          f"{EDM2[k]['act_fp32_gib']:.2f} + {EDM2[k]['weight_copies_gib']} GiB (docs/spec/edm2_latent.md §9.3) |"
          for k in ("XXL", "M")),
        f"| E-LatentLPIPS (VGG16_Latent_GN + 'bgcfnc'), per pair | 14.7 M (frozen) | – | "
        f"{p['lpips'] / 2**20:.0f} MiB | – | measured (trunk on the meta device, augmentation on CPU) |", "",
        "Mean Flow activations are counted for the training forward (the JVP runs under no_grad, one block at a time: "
        "its transient is a block's activations for the r ≠ t rows).", "",
        "## Memory per GPU (GiB) at the paper's global batch", "",
        "`units/GPU` is the global batch's trajectories (CMT) or samples divided by the GPU count; where it is below "
        "one (or does not divide), the paper's batch cannot be spread over that many GPUs and the row shows the "
        "memory at **one unit per GPU**, i.e. at the smallest global batch that works (`min global`, in pairs or "
        "samples). Columns: sharded training state (fp32 weights, gradients, Adam, EMA), gathered bf16 blocks, "
        "teacher, activations, total, and whether it fits an 80 GB GPU.", "",
        "| run | GPUs | units/GPU | samples/GPU | state | gathered | teacher | activations | total | fits 80 GB | "
        "min global |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        per = f"{r['per_rank']:g} {r['unit']}" + ("" if r["feasible"] else " ✗")
        lines.append(f"| {r['run']} | {r['world']} | {per} | {r['samples_per_gpu']:g} | {r['state']:.1f} | "
                     f"{r['gathered']:.1f} | {r['teacher']:.1f} | {r['activations']:.1f} | {r['total']:.1f} | "
                     f"{'yes' if r['total'] <= GPU_GIB else 'no'} | {r['min_global']:g} |")
    xxl_rows = {(r["run"], r["world"]): r for r in p["rows"]}
    r8 = xxl_rows[("ImageNet-512 CMT mid-training (XXL), teacher replicated", 8)]
    s8 = xxl_rows[("ImageNet-512 CMT mid-training (XXL), teacher sharded (recipe default)", 8)]
    e8 = xxl_rows[("ImageNet-512 ECD post-training (XXL + M guide), sharded (recipe default)", 8)]
    lines += ["", "## The ImageNet-512 headline on 8 GPUs", "",
              "`torchrun --standalone --nproc_per_node=8 recipes/imagenet512_cmt_ecd.py --data datasets/img512-sd.zip "
              "--weights weights/` runs both stages float32 (TF32 matmuls; `bf16=False`, so FSDP2 gathers float32 "
              "blocks) with `shard_teacher=True`:", "",
              f"* **mid-training**: one trajectory (16 pairs) per GPU; {s8['total']:.1f} GiB per GPU with the XXL "
              f"teacher sharded ({r8['total']:.1f} GiB replicated). The activations ({s8['activations']:.1f} GiB) are "
              f"16 pairs of the student's fp32 activations, E-LatentLPIPS's {p['lpips'] / 2**20:.0f} MiB per pair "
              "and the normalised-weight copies; the teacher's no-grad solve adds one block's transient at a time.",
              f"* **ECD**: 16 samples per GPU, the XXL-0.075 teacher and the M guide both sharded (weights held in "
              f"float32; the guide computes in float16 as EDM2 pickled it, `guide_fp16`): {e8['total']:.1f} GiB. "
              "The mid-training teacher is released before ECD starts.",
              "* **evaluation**: the post-trained EMA is gathered whole on every rank (6.1 GB fp32) and the SD VAE "
              "decoder (49.5 M parameters) decodes in chunks of 8; each rank samples its share of the 50 000 seeds.",
              "", "## Where CMT's per-device trajectory batch becomes the limit", "",
              "CMT's unit of work is a trajectory: its 16 (EDM2) or 28 (MF) pairs share one teacher solve and the "
              "engine keeps them on one rank. So the data-parallel width is capped by the trajectories per step:",
              "",
              f"* **EDM2-XXL, 8 trajectories × 16 = 128 pairs**: 8 GPUs is the limit of the paper's batch (one "
              f"trajectory, 16 pairs per GPU, {r8['total']:.1f} GiB with the teacher replicated — inside 80 GB, "
              "where activations of 16 pairs at fp32 dominate). At 64 and 256 GPUs the global batch must grow to "
              "≥ 1024 and ≥ 4096 pairs (one trajectory per GPU); memory per GPU then falls only in the sharded "
              f"state (the activations of 16 pairs and the {p['xxl']['fixed'] / GiB:.1f} GiB of normalised-weight "
              "copies stay "
              "per GPU).",
              "* **MF-XL/2, 4 trajectories × 28 = 112 pairs**: already at 8 GPUs half the ranks would get no "
              "trajectory; the smallest global batch at W GPUs is 28·W pairs (224 at 8, 1792 at 64, 7168 at 256). "
              "Per GPU, 28 pairs of XL/2 activations in bf16 fit easily, so memory is not what limits it.",
              "* ECD and Mean Flow post-training are per sample: the paper's 128 (ECD) and 64 (MF post) samples stop "
              "dividing above 128 and 64 GPUs.", "",
              "Scaling past these points without changing the recipe's batch would need a trajectory's pairs split "
              "over ranks (each rank re-solving or receiving the shared trajectory) — not implemented; the engine "
              "raises an error naming the numbers instead of training on a silently different batch.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", default=None, help="write the Markdown plan to this path")
    a = ap.parse_args(argv)
    text = markdown(plan())
    print(text)
    if a.write:
        with open(a.write, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
