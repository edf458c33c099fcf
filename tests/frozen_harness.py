"""Run under torchrun (2 gloo processes): shard a student and frozen teachers as a stage does (dist.Parallel), with
the bf16 parameter policy forced on CPU as it applies on CUDA, and check that each frozen teacher still computes
in fp32 — equal to its unsharded copy — while the trained network does get the policy.
Usage: torchrun --nproc_per_node=2 frozen_harness.py OUT.json"""
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import dist  # noqa: E402
from engine.networks import DiT, SongUNet  # noqa: E402
from engine.precond import EDMPrecond  # noqa: E402


def main():
    device = dist.init()
    # the CUDA policy, forced on CPU: what a bf16 stage on GPUs does
    dist.mixed_precision = lambda device, bf16: (dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                      cast_forward_inputs=False) if bf16 else None)
    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10).eval()
    unet = EDMPrecond(SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 1],
                               num_blocks=1, attn_resolutions=[4])).eval()
    student = copy.deepcopy(dit).train()
    plain = [copy.deepcopy(dit), copy.deepcopy(unet)]
    par = dist.Parallel(student, "fsdp", device, frozen=[dit, unet], bf16=True)
    g = torch.Generator().manual_seed(1)
    z, t, r, y = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g), torch.rand(2, generator=g), \
        torch.tensor([1, 2])
    x, sigma = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([0.5, 3.0])
    out = {}
    with torch.no_grad():
        out["dit"] = (dit(z, t, r, y) - plain[0](z, t, r, y)).abs().max().item()
        out["unet"] = (unet(x, sigma) - plain[1](x, sigma)).abs().max().item()
        out["dit_dtype"] = str(dit(z, t, r, y).dtype)
        # the trained network gathers bf16 parameters under the forced policy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out["student_dtype"] = str(par.model(z, t, r, y).dtype)
    if dist.rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
    dist.barrier()


if __name__ == "__main__":
    main()
