"""The latent VGG of E-LatentLPIPS, trained as the CMT authors did (docs/spec/edm2_latent.md §6.5;
engine/pipelines/latent_vgg.py): VGG16_Latent_GN from scratch as an ImageNet classifier on EDM2's final latents of
the ImageNet-512 latent dataset, a fresh VAE posterior sample each draw, no flips or crops; SGD momentum 0.9,
weight decay 1e-4, batch 256, lr 0.1 × 0.1 at epochs 30, 60 and 90, 100 epochs (≈ 500 k iterations), float32.
The authors report 95 % train / 64 % validation top-1. Top-1 is logged every epoch on --val (the validation split
encoded as the training set) or, without it, on 1 % of the training latents held out.
Output: <out>/latent_vgg16.safetensors — what recipes/imagenet512_cmt_ecd.py reads (put it in --weights).
Sized for: one or more GPUs (torchrun); trunk 14.96 GMAC per latent; wall time not measured here.

    python recipes/imagenet512_latent_vgg.py --data datasets/img512-sd.zip --val datasets/img512-val-sd.zip
    python recipes/imagenet512_latent_vgg.py --smoke     # a few steps on synthetic latents (CI)
"""
from engine.pipelines.latent_vgg import LatentVGGSettings, run_latent_vgg

SETTINGS = LatentVGGSettings()

if __name__ == "__main__":
    from engine.cli import run_main
    run_main(lambda argv: run_latent_vgg(__doc__, SETTINGS, "imagenet512_latent_vgg", argv))
