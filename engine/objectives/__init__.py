"""Training objectives: `objective(net, images, labels, rng) -> LossOutput` (engine/objectives/base.py).

    EDMLoss   teacher pre-training (docs/spec/cm.md §1.1)
    EDM2Loss  EDM2 pre-training with learned uncertainty (docs/spec/edm2_latent.md §2.1)
    CMT       consistency mid-training on teacher DPM-Solver++ trajectories (docs/spec/cm.md §3.1)
    CachedCMT CMT on trajectories pre-generated to disk (engine/teacher/trajectory_cache.py)
    KD        the KD-style ablation: (x_T, σ_max) → teacher endpoint
    SlowCMT   the "Slow CMT" ablation: one teacher solve per pair
    ECT       easy consistency tuning (docs/spec/cm.md §4.1)
    ECD       easy consistency distillation, one teacher Euler/Heun step per pair (docs/spec/cm.md §4.5)
    SCT, SCD  continuous-time consistency training / distillation with TrigFlow (docs/spec/mf.md §5)
    FlowMatching, MeanFlow, CMTMeanFlow   flow-map objectives for DiT-style networks (docs/spec/mf.md §1, §4)
    (their samplers and teacher solves, like every other, live in engine/solvers.py)
    Classification   cross-entropy, for the latent VGG of E-LatentLPIPS (engine/objectives/classification.py)
    LatentPosterior  any of them on VAE posterior samples of stored latent moments (engine/objectives/latent.py)
    REPA      flow matching, Mean Flow or CMT-MF plus REPA's representation alignment (engine/objectives/repa.py)
"""
from engine.objectives.base import LossOutput, Objective, StepRNG
from engine.objectives.classification import Classification
from engine.objectives.cmt import CMT, KD, CachedCMT, SlowCMT
from engine.objectives.distances import l2, perceptual, pseudo_huber, resolve_distance, squared_l2
from engine.objectives.ect import ECD, ECT
from engine.objectives.edm import EDM2Loss, EDMLoss
from engine.objectives.latent import LatentPosterior
from engine.objectives.meanflow import CMTMeanFlow, FlowMatching, MeanFlow
from engine.objectives.repa import REPA
from engine.objectives.scm import SCD, SCT

__all__ = ["Objective", "LossOutput", "StepRNG", "EDMLoss", "EDM2Loss", "CMT", "CachedCMT", "KD", "SlowCMT", "ECT",
           "ECD", "SCT", "SCD", "FlowMatching", "MeanFlow", "CMTMeanFlow", "LatentPosterior", "REPA", "Classification",
           "squared_l2", "l2", "pseudo_huber", "perceptual", "resolve_distance"]
