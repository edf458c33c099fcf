"""Evaluation metrics of the embedded default runs (and the general Fréchet distance later FIDs reuse).

* `frechet_distance`, `feature_statistics`, `FeatureStatistics` — float64 Fréchet distance of feature sets.
* `flow_map_error` — E‖f(x_σ, σ) − Ψ_{σ→σ_end}(x_σ)‖² against the exact PF-ODE flow of a Gaussian mixture.
* `sliced_wasserstein` — sliced 2-Wasserstein distance between two sample sets (unequal sizes allowed).
* `DigitsMetrics` — classifier-feature FD and class histograms for digits samples; the classifier is trained
  once and cached (`load_digits_classifier`).
* `InceptionV3` (FID, NVIDIA's inception-2015-12-05 detector with NVIDIA's preprocessing by default; its
  `.pt` / `.pkl` / pytorch-fid `.pth` files are read by `inception_files.py`), `DINOv2` (FD_DINOv2, ViT-L/14),
  loaded from local weight files; `load_stats` / `save_stats` for EDM `.npz` and EDM2 `.pkl` reference
  statistics, which record their FID protocol (`python -m engine.metrics.reference_stats` computes them).
  Few-step FID runs: `python -m engine.evaluate`.
"""
from engine.metrics.digits_classifier import (DigitsClassifier, DigitsClassifierConfig, DigitsMetrics, class_histogram,
                                              default_cache_dir, digits_classifier_path, load_digits_classifier,
                                              to_classifier_input, train_digits_classifier)
from engine.metrics.dinov2 import DINOv2
from engine.metrics.flow_map import FlowMapError, flow_map_error, reference_ode_steps
from engine.metrics.frechet import FeatureStatistics, feature_statistics, frechet_distance
from engine.metrics.inception import InceptionV3
from engine.metrics.reference_stats import load_stats, save_stats
from engine.metrics.sliced_wasserstein import sliced_wasserstein, wasserstein_1d_squared

__all__ = ["frechet_distance", "feature_statistics", "FeatureStatistics", "flow_map_error", "FlowMapError",
           "reference_ode_steps", "sliced_wasserstein", "wasserstein_1d_squared", "DigitsMetrics",
           "DigitsClassifier", "DigitsClassifierConfig", "load_digits_classifier", "train_digits_classifier",
           "digits_classifier_path", "default_cache_dir", "to_classifier_input", "class_histogram", "InceptionV3",
           "DINOv2", "load_stats", "save_stats"]
