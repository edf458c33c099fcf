"""Every format the engine reads and writes weights in, one import away. Each concept has its own module; this one
re-exports their public names (the names users and recipes have imported from here since the start):

  engine/files.py          the error type, atomic writes, our weights-only state-dict checkpoints, SHA-256 hashes,
                           pretrained-weight lookup (`weights_file`): imports only torch
  engine/state_dicts.py    fit checks of a state dict against a module and the strict copy (`load_network_state`)
  engine/unpickler.py      the restricted unpickler of the reference formats and its passive records
                           (docs/spec/cm.md §6.2): imports no network
  engine/registry.py       network descriptions ↔ modules, through the allow-lists `PRECONDS` / `BACKBONES`
  engine/edm_snapshots.py  EDM / ECT / CMT / EDM2 `.pkl` snapshots and `training-state-*.pt` as our modules
  engine/releases.py       safetensors releases with the description as metadata
  engine/run_state.py      a stage's training state and its ring of resumable checkpoints
"""
from engine.edm_snapshots import (TEACHER_ONLY_KEYS, NetworkRecord, ReferenceCheckpoint, build_edm_network,
                                  load_edm_pickle, load_edm_training_state, read_edm2_training_state, read_edm_pickle)
from engine.files import (CheckpointError, load_checkpoint, read_state_dict_file, save_checkpoint,
                          weights_file)
from engine.registry import BACKBONES, PRECONDS, build_from_description, describe_network
from engine.releases import export_safetensors, load_safetensors_network, read_safetensors_metadata
from engine.state_dicts import load_network_state, mismatch_summary, state_mismatch
from engine.unpickler import ContainerRecord, PersistentRecord

__all__ = [
    'CheckpointError', 'PRECONDS', 'BACKBONES', 'TEACHER_ONLY_KEYS',
    'NetworkRecord', 'ReferenceCheckpoint', 'read_edm_pickle', 'build_edm_network', 'load_edm_pickle',
    'load_edm_training_state', 'read_edm2_training_state', 'PersistentRecord', 'ContainerRecord',
    'describe_network', 'build_from_description', 'load_network_state', 'state_mismatch', 'mismatch_summary',
    'weights_file', 'read_state_dict_file', 'save_checkpoint', 'load_checkpoint',
    'export_safetensors', 'load_safetensors_network', 'read_safetensors_metadata',
]
