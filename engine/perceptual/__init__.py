"""Perceptual models the objectives and evaluation measure with or decode through: LPIPS (lpips.py), E-LatentLPIPS
and its joint augmentation (elatentlpips.py, augment.py), the SD VAE (vae.py) and the CLIP text encoder
(clip_text.py). Each reads its published weight file from a local path (engine/checkpoints/files.py
`weights_file`); none is downloaded."""
