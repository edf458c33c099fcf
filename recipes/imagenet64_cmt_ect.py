"""CMT on ImageNet 64×64 (class-conditional, EDM2-XL), then ECT — and, as a second arm, ECD distilling the
autoguided teacher (docs/spec/cm.md §8.2; engine/pipelines/imagenet64.py).

Reproduces: the released EDM2-XL ImageNet-64 weights as teacher and initialisation (not retrained); CMT
mid-training 6.4 Mimg (3rd-order multistep DPM-Solver++, 16 NFE, no guidance, LPIPS, Adam (0.9, 0.99), lr 7e-4
linear decay to 0, EMA 0.999, batch 128, dropout 0.5 at resolutions ≤ 16); then
  * cmt_ect: ECT post-training 6.4 Mimg in ECT's ImageNet variant (snrpk weighting, c = 0.06, ln t ~ N(−0.8, 1.6²),
    Δt = 1/512, lr 1e-4 linear decay, EMA 0.9999; the paper: FID 2.02 / 1.48);
  * cmt_ecd: ECD post-training 12.8 Mimg from the CMT checkpoint (Heun teacher steps of the autoguided teacher,
    Δt = 1/256, constant lr 1e-4; the paper: FID 1.78 / 1.32);
each ending with FID-50k and FD_DINOv2 of 1-step and 2-step (σ 80 → 1.526) samples when the detectors and EDM2's
reference statistics are present.
Choices the paper leaves open are required settings below (None: the run stops and names what EDM2 published):
the teacher's EMA length (teacher_file) and ECD's guide and w.
Sized for: a multi-GPU node (the paper's setting); wall time not measured here (no GPU run has been made).
Needs: --data (EDM2's ImageNet-64 zip), the teacher and guide files (--weights DIR under their published names, or
--teacher), vgg16-397923af.pth for LPIPS; for the metrics inception-2015-12-05.pkl, dinov2_vitl14_pretrain.pth and
img64.pkl (all looked up in --weights too).

    python recipes/imagenet64_cmt_ect.py --data datasets/img64.zip --weights weights/
    torchrun --nproc_per_node=8 recipes/imagenet64_cmt_ect.py --data datasets/img64.zip --weights weights/
    python recipes/imagenet64_cmt_ect.py --smoke        # every stage for a few steps on a tiny MP-UNet (CI)
"""
from engine.pipelines.imagenet64 import EDM2Settings, run_edm2_recipe

SETTINGS = EDM2Settings(
    teacher_file=None,     # e.g. "edm2-img64-xl-0671088-0.040.pkl" (EDM2's FID-optimal XL; see the run's message)
    guide_file=None,       # ECD's autoguidance guide, e.g. a shorter-trained "edm2-img64-xs-…" reconstruction
    guidance=None,         # ECD's w
)

if __name__ == "__main__":
    from engine.cli import run_main
    run_main(lambda argv: run_edm2_recipe(__doc__, SETTINGS, "imagenet64_cmt_ect", argv))
