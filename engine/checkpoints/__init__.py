"""Every file the engine reads and writes weights and runs in. Each concept has its own module:

  files.py          atomic writes, our weights-only state-dict checkpoints with SHA-256 sidecars, file hashes,
                    pretrained-weight lookup (`weights_file`): imports only torch
  state_dicts.py    fit checks of a state dict against a module and the strict copy (`load_network_state`)
  unpickler.py      the restricted unpickler of the reference formats and its passive records
                    (docs/spec/cm.md §6.2): imports no network
  registry.py       network descriptions ↔ modules, through the allow-lists `PRECONDS` / `BACKBONES`
  edm_snapshots.py  EDM / ECT / CMT / EDM2 `.pkl` snapshots and `training-state-*.pt` as our modules
  releases.py       safetensors releases with the description as metadata
  identity.py       run and stage identities, recorded at the start and compared on every rerun (docs/runs.md)

A stage's own checkpoints (what they hold, the ring they live in) are engine/training/run_state.py's.
The public names below load on first use, so importing `engine.checkpoints.files` pulls in no network.
"""
import importlib

_EXPORTS = {
    **dict.fromkeys(['TEACHER_ONLY_KEYS', 'NetworkRecord', 'ReferenceCheckpoint', 'build_edm_network',
                     'load_edm_pickle', 'load_edm_training_state', 'read_edm2_training_state', 'read_edm_pickle',
                     'StageStart'], 'edm_snapshots'),
    **dict.fromkeys(['CheckpointError', 'load_checkpoint', 'read_state_dict_file', 'save_checkpoint',
                     'weights_file'], 'files'),
    **dict.fromkeys(['BACKBONES', 'PRECONDS', 'build_from_description', 'describe_network'], 'registry'),
    **dict.fromkeys(['export_safetensors', 'load_safetensors_network', 'read_safetensors_metadata'], 'releases'),
    **dict.fromkeys(['load_network_state', 'mismatch_summary', 'state_mismatch'], 'state_dicts'),
    **dict.fromkeys(['ContainerRecord', 'PersistentRecord'], 'unpickler'),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"engine.checkpoints.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'engine.checkpoints' has no attribute {name!r}")
