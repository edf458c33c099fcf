"""Training: the stage loop and the small units it calls.

  loop.py          `train_stage` (one stage: set-up, steps, checkpoints, release) and `train_step` (one step)
  stage_config.py  `StageConfig`, validated when built, and what a stage's result depends on
  run_state.py     `TrainingState` (what a checkpoint holds) and the checkpoint ring
  optimizers.py, lr_schedules.py, ema.py, phema.py, train_log.py   Adam/RAdam, LR schedules, EMAs (and
                   post-hoc EMA reconstruction, `python -m engine.training.phema`), JSONL/TensorBoard logs
  compiled.py, host_memory.py      regional torch.compile; the host allocator policy

It imports no network module: work a network family needs after an optimizer step is asked of the network
(`after_optimizer_step` hooks, run_state.py), and callers name the teacher-only keys. The public names load on
first use, so `import engine.training` is cheap.
"""
import importlib

_EXPORTS = {
    "train_stage": "loop", "train_step": "loop", "initialise": "loop", "StageResult": "loop",
    "NonFiniteError": "loop", "StageConfig": "stage_config", "TrainingState": "run_state",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"engine.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'engine.training' has no attribute {name!r}")
