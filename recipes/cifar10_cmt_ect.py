"""CMT → ECT on CIFAR-10 32×32 (unconditional, DDPM++ from the EDM teacher), the paper's settings (docs/spec/cm.md
§8.1).

Reproduces: CMT mid-training (16-NFE 3rd-order multistep DPM-Solver++ teacher trajectories, LPIPS, RAdam 2e-4
linear decay, EMA 0.999, batch 128, dropout 0.2, 38.4 Mimg) then ECT post-training (Δt = 1/4096, RAdam 1e-4 linear
decay, EMA 0.9999, 12.8 Mimg), initialised from the EDM teacher edm-cifar10-32x32-uncond-vp.pkl.
Sized for: a multi-GPU node (the paper's setting); wall time not measured here (no GPU run has been made).
Needs: --data datasets/cifar10-32x32.zip (EDM dataset_tool format), --teacher edm-cifar10-32x32-uncond-vp.pkl, and VGG16
ImageNet weights for LPIPS (engine/perceptual/lpips.py says where). Evaluation (FID) is a separate command.

    python recipes/cifar10_cmt_ect.py --data datasets/cifar10-32x32.zip --teacher edm-cifar10-32x32-uncond-vp.pkl
    python recipes/cifar10_cmt_ect.py --smoke        # a few steps on synthetic data and a tiny network
"""
from engine.pipelines.edm_cm import PaperSettings, run_paper_recipe

SETTINGS = PaperSettings(dataset="cifar10-32x32", resolution=32, q=4096)

if __name__ == "__main__":
    from engine.cli import run_main
    run_main(lambda argv: run_paper_recipe(__doc__, SETTINGS, "cifar10_cmt_ect", argv))
