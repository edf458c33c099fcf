"""Pre-generated teacher trajectories for CMT (beyond the paper, which notes this regime and does not build it).

With the trajectories on disk, a mid-training step is one back-propagated student evaluation per pair and no
teacher call at all. A store is a directory:

    meta.json          what was solved: teacher description, σ grid, solver order and rule, prior, shapes, seed
                       ("spec"), and what it was solved from ("inputs": content hashes of the teacher and the data)
    states.bin         memory-mapped [T, N + 1, *shape] (float32 or float16): x_0 = x_T … x_N of each trajectory
    seeds.npy          [T] int64: the seed of each trajectory's noise ε (torch.Generator on the CPU, float32)
    image_index.npy    [T] int64: the dataset image y of each trajectory (the data prior x_T = y + σ_max ε)
    labels.npy         [T] int64 class indices (only for labelled data)
    progress.json      the chunks written so far (atomically replaced after each chunk is flushed)

`write_store` fills it chunk by chunk with a progress bar; killed and rerun with the same arguments it resumes at
the first unwritten chunk (a half-written chunk is simply rewritten); rerun with different arguments it refuses.
What must match is the spec and the inputs, fingerprinted as training runs fingerprint --teacher and --data
(engine/checkpoints/identity.py: a weights file by its SHA-256, a dataset by the hash of its index; in-memory teachers
and data by a hash of their tensors), so a teacher of the same file name and size but other weights, or other data
of the same size, is refused too, on an incomplete store and on a complete one. A store written before inputs were
recorded names its teacher only by file name and size: it is resumed when two of its trajectories recomputed with
the given teacher and data match the stored ones (start states exactly, later states to 1 % relative RMS, which
devices and batch sizes stay well inside and another teacher or dataset does not), and refused otherwise.

Checked before anything is written: a class-conditional teacher needs labelled data (without labels it would be
solved for an all-zero label vector, which is no class), every label the store uses must be a class of the
teacher, and a new store must fit on its disk. states.bin gets its blocks when it is created (posix_fallocate):
a memory-mapped write into a sparse file on a full disk is SIGBUS ("Bus error"), not an error one can report; with
the blocks reserved, a full disk is an ENOSPC at creation, one line on the command line, with nothing left behind
(the fingerprints, label and disk helpers are store_checks.py's).

`regenerate(store, t, teacher)` recomputes trajectory t from its stored seed and image, and `TrajectorySource`
feeds the store to the `CachedCMT` objective (engine/objectives/cmt.py).

Command line (the dataset and teacher as the recipes take them; the dataset's labels are read only for a
class-conditional teacher, as EDM reads them only with --cond and engine/pipelines/edm_cm.py opens an unconditional
teacher's data: an unconditional teacher's trajectories do not depend on them):

    python -m engine.teacher.trajectory_cache --teacher edm-cifar10-32x32-uncond-vp.pkl --data cifar10-32x32.zip \\
        --out trajectories/cifar10 --trajectories 1000000 [--chunk 4096] [--batch 256] [--nfe 16] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from engine.checkpoints.identity import compare, plain
from engine.errors import EngineError
from engine.schedules import SIGMA_MAX, SIGMA_MIN, logsnr_sigmas
from engine.teacher.solver import TeacherSolver
from engine.teacher.store_checks import (DiskFull, describe_data, describe_teacher, disk_full, existing_parent,
                                         free_bytes, human_bytes, labels_of, remove_file, reserve_blocks,
                                         teacher_label_dim)

FORMAT = "engine-trajectory-store/1"
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclasses.dataclass
class StoreSpec:
    num_trajectories: int
    shape: list[int]                  # one image's shape, e.g. [3, 32, 32]
    nfe: int = 16
    order: int = 3
    third_order: str = "upstream"
    sigma_max: float = SIGMA_MAX
    sigma_min: float = SIGMA_MIN
    prior: str = "data"
    dtype: str = "float32"
    chunk: int = 4096
    seed: int = 0
    teacher: str = ""                 # a description of the teacher (file name and size, or architecture)
    num_images: int = 0               # size of the dataset the images were drawn from
    labelled: bool = False

    def sigmas(self) -> torch.Tensor:
        return logsnr_sigmas(self.nfe, self.sigma_max, self.sigma_min)

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_trajectories / self.chunk)


def trajectory_seed(seed: int, t: int) -> int:
    """The noise seed of trajectory t: a pure function of (store seed, t), 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}/trajectory/{t}".encode()).digest()[:8], "little") >> 1


def trajectory_noise(seed_t: int, shape) -> torch.Tensor:
    """ε of one trajectory, drawn on the CPU in float32 so that it is the same on every device."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed_t)))


def image_indices(seed: int, num_images: int, start: int, count: int) -> np.ndarray:
    """Dataset images of trajectories [start, start + count): consecutive epochs of seeded permutations."""
    from engine.data.sampler import ResumableSampler
    return ResumableSampler(num_images, seed=seed).indices(start, count).numpy()


class StoreError(EngineError):
    pass


class TrajectoryStore:
    """An opened store: `states[t]` is trajectory t as a numpy view [N + 1, *shape] (memory-mapped)."""

    def __init__(self, path: str, mode: str = "r"):
        self.path = path
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise StoreError(f"{path} is not a trajectory store: {meta_path} is missing "
                             f"(write one with `python -m engine.teacher.trajectory_cache`)")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise StoreError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        self.spec = StoreSpec(**meta["spec"])
        self.inputs = meta.get("inputs")   # None for a store written before inputs were recorded
        s = self.spec
        full = (s.num_trajectories, s.nfe + 1, *s.shape)
        states_path = os.path.join(path, "states.bin")
        expected = int(np.prod(full)) * np.dtype(DTYPES[s.dtype]).itemsize
        if not os.path.exists(states_path) or os.path.getsize(states_path) != expected:
            size = os.path.getsize(states_path) if os.path.exists(states_path) else "missing"
            raise StoreError(f"{states_path}: expected {expected} bytes for {full} {s.dtype}, found {size}")
        self.states = np.memmap(states_path, dtype=DTYPES[s.dtype], mode=mode, shape=full)
        self.seeds = np.load(os.path.join(path, "seeds.npy"), mmap_mode=mode)
        self.image_index = np.load(os.path.join(path, "image_index.npy"), mmap_mode=mode)
        self.labels = np.load(os.path.join(path, "labels.npy"), mmap_mode=mode) if s.labelled else None

    def __len__(self) -> int:
        return self.spec.num_trajectories

    def done_chunks(self) -> set[int]:
        p = os.path.join(self.path, "progress.json")
        if not os.path.exists(p):
            return set()
        with open(p) as f:
            return set(json.load(f)["chunks_done"])

    def complete(self) -> bool:
        return len(self.done_chunks()) == self.spec.num_chunks

    def mark_done(self, chunks: set[int]) -> None:
        tmp = os.path.join(self.path, "progress.json.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"chunks_done": sorted(chunks)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(self.path, "progress.json"))
        except OSError as e:
            remove_file(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):   # the chunks already counted stay counted
                raise disk_full(self.path, "recording the chunks written", "the store is intact; free space and "
                                 "rerun the command to resume it") from None
            raise


# ---- what a store is made from ------------------------------------------------------------------------------------

def _used_images(spec: StoreSpec) -> np.ndarray:
    """The dataset images the store's trajectories start from (every image once T reaches the dataset's size)."""
    if spec.num_trajectories >= spec.num_images:
        return np.arange(spec.num_images)
    return np.unique(image_indices(spec.seed, spec.num_images, 0, spec.num_trajectories))


def _check_labels(spec: StoreSpec, teacher, data) -> None:
    """Labels fit the teacher, for every trajectory of the store, before any is solved (TeacherSolver would find
    an out-of-range index only in the batch holding it, after earlier chunks were written)."""
    label_dim = teacher_label_dim(teacher)
    if not spec.labelled:
        if label_dim:
            raise StoreError(f"the teacher is class-conditional ({label_dim} classes) but the data has no labels: its "
                             f"trajectories would be solved for an all-zero label vector, which is no class; use the "
                             f"labelled dataset it was trained on")
        return
    idx = _used_images(spec)
    labels = labels_of(data, idx)
    bad = (labels < 0) | (labels >= label_dim) if label_dim else labels < 0
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        allowed = f"[0, {label_dim}) for this teacher of {label_dim} classes" if label_dim else ">= 0"
        raise StoreError(f"class labels must be in {allowed}, but image {int(idx[first])} of the data is labelled "
                         f"{int(labels[first])} ({int(bad.sum())} of the {len(idx)} images the store uses are out "
                         f"of range); use the dataset the teacher was trained on")


# ---- disk space -------------------------------------------------------------------------------------------------

def store_bytes(spec: StoreSpec) -> int:
    """The bytes a store of `spec` takes: states.bin and its int64 [T] arrays (a 128-byte .npy header each)."""
    states = spec.num_trajectories * (spec.nfe + 1) * math.prod(spec.shape) * np.dtype(DTYPES[spec.dtype]).itemsize
    return states + (3 if spec.labelled else 2) * (128 + 8 * spec.num_trajectories)


def _check_space(path: str, spec: StoreSpec) -> None:
    """A new store must fit in the free space of its disk: checked before any file is created."""
    needed, free = store_bytes(spec), free_bytes(path)
    if free is not None and needed > free:
        raise StoreError(f"{path}: a store of {spec.num_trajectories} trajectories of {spec.nfe + 1} states "
                         f"{tuple(spec.shape)} {spec.dtype} needs {needed} bytes ({human_bytes(needed)}), but {free} "
                         f"bytes ({human_bytes(free)}) are free on the disk of {existing_parent(path)}; write fewer "
                         f"--trajectories, use --dtype float16, or choose another --out")


# ---- writing ------------------------------------------------------------------------------------------------------

def _write_meta(path: str, spec: StoreSpec, inputs: dict | None) -> None:
    meta = {"format": FORMAT, "spec": dataclasses.asdict(spec)}
    if inputs is not None:
        meta["inputs"] = inputs
    tmp = os.path.join(path, "meta.json.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, "meta.json"))
    except BaseException:
        remove_file(tmp)
        raise


def _create(path: str, spec: StoreSpec, inputs: dict) -> None:
    """Make the store's files, meta.json last (a directory without it is not a store yet, and is made anew). On any
    failure the files made here, and the directory if it was made here, are removed."""
    made_dir = not os.path.isdir(path)
    os.makedirs(path, exist_ok=True)
    names = ["states.bin", "seeds.npy", "image_index.npy"] + (["labels.npy"] if spec.labelled else [])
    try:
        full = (spec.num_trajectories, spec.nfe + 1, *spec.shape)
        states_path = os.path.join(path, "states.bin")
        with open(states_path, "wb") as f:
            reserve_blocks(f.fileno(), math.prod(full) * np.dtype(DTYPES[spec.dtype]).itemsize, states_path,
                     "nothing was left behind; free space or choose another --out")
        seeds = np.array([trajectory_seed(spec.seed, t) for t in range(spec.num_trajectories)], dtype=np.int64)
        np.save(os.path.join(path, "seeds.npy"), seeds)
        np.save(os.path.join(path, "image_index.npy"),
                image_indices(spec.seed, spec.num_images, 0, spec.num_trajectories).astype(np.int64))
        if spec.labelled:
            np.save(os.path.join(path, "labels.npy"), np.zeros(spec.num_trajectories, dtype=np.int64))
        _write_meta(path, spec, inputs)
    except BaseException as e:
        for name in names:
            remove_file(os.path.join(path, name))
        if made_dir:
            try:
                os.rmdir(path)
            except OSError:
                pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(e, DiskFull):
            raise disk_full(path, "creating the store", "nothing was left behind; free space or choose another "
                             "--out") from None
        raise


def _start_states(spec: StoreSpec, data, ts: np.ndarray, index: np.ndarray, seeds: np.ndarray, device):
    eps = torch.stack([trajectory_noise(seeds[t], spec.shape) for t in ts]).to(device)
    images, labels = data.batch(torch.as_tensor(index[ts]), device)
    if tuple(images.shape[1:]) != tuple(spec.shape):
        raise StoreError(f"the dataset's images are {tuple(images.shape[1:])}, the store holds {tuple(spec.shape)}")
    x_T = spec.sigma_max * eps if spec.prior == "noise" else images.float() + spec.sigma_max * eps
    return x_T, labels


def write_store(path: str, spec: StoreSpec, teacher, data, device="cpu", batch: int = 256,
                progress: bool = True, *, teacher_fingerprint: dict | None = None) -> "TrajectoryStore":
    """Create (or resume) the store at `path`: `spec.num_trajectories` teacher solves of `teacher` from images of
    `data` (a source with `len` and `batch(indices, device)`, as the loop takes). `teacher_fingerprint` describes
    the teacher's weights where they came from a file (the command line passes its `file_fingerprint`); without it,
    the teacher object's weights are hashed. Everything is checked (module docstring) before anything is written."""
    if spec.prior not in ("data", "noise"):
        raise ValueError(f"prior must be 'data' or 'noise', got {spec.prior!r}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {spec.dtype!r}")
    probe_images, probe_labels = data.batch(torch.tensor([0]), "cpu")
    spec = dataclasses.replace(spec, num_images=len(data), shape=[int(s) for s in spec.shape],
                               labelled=probe_labels is not None)
    if list(probe_images.shape[1:]) != spec.shape:
        raise StoreError(f"the dataset's images are {tuple(probe_images.shape[1:])}, the spec says {spec.shape}")
    exists = os.path.exists(os.path.join(path, "meta.json"))
    if not exists:
        _check_space(path, spec)
    _check_labels(spec, teacher, data)
    inputs = plain({"teacher": teacher_fingerprint or describe_teacher(teacher), "data": describe_data(data)})
    if exists:
        store = TrajectoryStore(path)            # read-only until every check has passed
        if store.spec != spec:
            diff = {k: (getattr(store.spec, k), getattr(spec, k)) for k in dataclasses.asdict(spec)
                    if getattr(store.spec, k) != getattr(spec, k)}
            raise StoreError(f"{path} holds a store made with other settings (stored, requested): {diff}; "
                             f"use another --out or remove it")
        if store.inputs is None:
            _check_unrecorded_inputs(store, teacher, data, device)
        else:
            diff = compare(store.inputs, inputs)
            if diff:
                raise StoreError(f"{path} holds trajectories of another teacher or data; refusing to add to it with: "
                                 + "; ".join(diff) + ". Rerun with the --teacher and --data it was made with, or "
                                 "use another --out")
        todo = [c for c in range(spec.num_chunks) if c not in store.done_chunks()]
        if todo:
            states_path = os.path.join(path, "states.bin")
            with open(states_path, "r+b") as f:   # a store made before blocks were reserved is sparse
                reserve_blocks(f.fileno(), os.fstat(f.fileno()).st_size, states_path,
                         "the store is unchanged; free space and rerun the command to resume it")
            if store.inputs is None:
                # recorded from now on; an incomplete store cannot have fed a training run, whose identity holds
                # the store's fingerprint (TrajectorySource.fingerprint), so none is orphaned by the change
                _write_meta(path, store.spec, inputs)
        del store
    else:
        _create(path, spec, inputs)
    store = TrajectoryStore(path, mode="r+")
    solver = TeacherSolver(teacher, spec.sigmas(), spec.order, third_order=spec.third_order)
    done = store.done_chunks()
    todo = [c for c in range(spec.num_chunks) if c not in done]
    bar = tqdm(total=spec.num_trajectories, initial=spec.num_trajectories - sum(
        min(spec.chunk, spec.num_trajectories - c * spec.chunk) for c in todo), unit="traj", disable=not progress,
        desc="trajectories")
    try:   # closed however the loop ends (Ctrl-C included), so its last line is printed by this command
        for c in todo:
            lo, hi = c * spec.chunk, min((c + 1) * spec.chunk, spec.num_trajectories)
            for b in range(lo, hi, batch):
                ts = np.arange(b, min(b + batch, hi))
                x_T, labels = _start_states(spec, data, ts, store.image_index, store.seeds, device)
                traj = solver(x_T, labels)                                   # [N + 1, m, ...]
                store.states[ts[0]:ts[-1] + 1] = traj.transpose(0, 1).to("cpu", torch.float32).numpy()
                if store.labels is not None:
                    store.labels[ts[0]:ts[-1] + 1] = labels.cpu().numpy()
                bar.update(len(ts))
            store.states.flush()
            if store.labels is not None:
                store.labels.flush()
            done.add(c)
            store.mark_done(done)   # only now is the chunk counted as written
    finally:
        bar.close()
    return TrajectoryStore(path)


@torch.no_grad()
def _check_unrecorded_inputs(store: TrajectoryStore, teacher, data, device) -> None:
    """A store written before inputs were recorded (its meta.json names the teacher only by file name and size):
    the first and the last trajectory written are recomputed with `teacher` and `data` and must match — the start
    x_T exactly (it is y + σ_max·ε, rounded the same on every device), labels exactly, later states to 1 % relative
    RMS per state (another device or batch size stays far inside; another teacher's or image's trajectory does not).
    A store with nothing written holds nothing of any teacher."""
    spec = store.spec
    done = sorted(store.done_chunks())
    if not done:
        return
    dtype = torch.float16 if spec.dtype == "float16" else torch.float32
    for t in sorted({done[0] * spec.chunk, min((done[-1] + 1) * spec.chunk, spec.num_trajectories) - 1}):
        stored = torch.from_numpy(np.array(store.states[t])).float()
        x_T, labels = _start_states(spec, data, np.array([t]), store.image_index, store.seeds, device)
        problem = None
        if store.labels is not None and int(store.labels[t]) != int(labels[0]):
            problem = f"its label is {int(store.labels[t])}, the data's image {int(store.image_index[t])} is " \
                      f"labelled {int(labels[0])}"
        elif not torch.equal(x_T[0].cpu().to(dtype).float(), stored[0]):
            problem = f"its start x_T differs (the data's image {int(store.image_index[t])} is another)"
        else:
            solver = TeacherSolver(teacher, spec.sigmas(), spec.order, third_order=spec.third_order)
            ref = solver(x_T, labels)[:, 0].to("cpu", dtype).float()
            rel = max(float((ref[k] - stored[k]).norm() / stored[k].norm().clamp_min(1e-12))
                      for k in range(1, spec.nfe + 1))
            if rel > 1e-2:
                problem = f"its states differ by {rel:.1%} (relative RMS; the same teacher agrees within 1 %)"
        if problem:
            raise StoreError(f"{store.path} was written before stores recorded the hashes of their teacher and data "
                             f"(it names the teacher only as {spec.teacher!r}), and trajectory {t} recomputed with "
                             f"this teacher and data does not match: {problem}; rerun with the teacher and data it "
                             f"was made with, or write the store anew in another --out")


@torch.no_grad()
def regenerate(store: TrajectoryStore, t: int, teacher, data, device="cpu") -> torch.Tensor:
    """Trajectory t recomputed from its stored seed and image: [N + 1, *shape], float32."""
    spec = store.spec
    x_T, labels = _start_states(spec, data, np.array([t]), store.image_index, store.seeds, device)
    solver = TeacherSolver(teacher, spec.sigmas(), spec.order, third_order=spec.third_order)
    return solver(x_T, labels)[:, 0].float()


class TrajectorySource:
    """A data source over a complete store: `batch(indices)` gives trajectories [m, N + 1, *shape] (float32) and
    their labels, for `CachedCMT`."""

    def __init__(self, path: str):
        self.store = TrajectoryStore(path)
        if not self.store.complete():
            missing = self.store.spec.num_chunks - len(self.store.done_chunks())
            raise StoreError(f"{path} is incomplete ({missing} of {self.store.spec.num_chunks} chunks unwritten); "
                             f"rerun the command that writes it to finish")
        self.spec = self.store.spec

    def __len__(self) -> int:
        return len(self.store)

    def fingerprint(self) -> dict:
        """What the store is (engine/checkpoints/identity.py): its specification, its chunk index and its inputs."""
        out = {"store": plain(dataclasses.asdict(self.spec)), "chunks": sorted(self.store.done_chunks())}
        if self.store.inputs is not None:   # absent from stores written before inputs were recorded: unchanged
            out["inputs"] = self.store.inputs
        return out

    def batch(self, idx: torch.Tensor, device):
        i = np.asarray(idx, dtype=np.int64)
        traj = torch.from_numpy(np.ascontiguousarray(self.store.states[i])).float().to(device)
        labels = None if self.store.labels is None else torch.from_numpy(np.asarray(self.store.labels[i])).to(device)
        return traj, labels


def _stored_labelled(out: str) -> bool:
    """Whether a store already at `out` holds labels (one begun before an unconditional teacher's data was read
    without them keeps them, so that it resumes); an unreadable meta.json is TrajectoryStore's to report."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            return bool(json.load(f)["spec"]["labelled"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def main(argv=None) -> None:
    from engine.checkpoints.edm_snapshots import load_edm_pickle
    from engine.checkpoints.identity import file_fingerprint
    from engine.checks import positive_int_arg, seed_arg
    from engine.cli import resolve_device
    from engine.data import ImageDataset
    from engine.data.sampler import ImageDatasetSource

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="EDM teacher snapshot (.pkl)")
    p.add_argument("--data", required=True, help="dataset zip or folder in EDM's format (its labels are used with a "
                                                 "class-conditional teacher)")
    p.add_argument("--out", required=True, help="store directory (created, or resumed)")
    p.add_argument("--trajectories", type=positive_int_arg, required=True)
    p.add_argument("--nfe", type=positive_int_arg, default=16)
    p.add_argument("--prior", choices=["data", "noise"], default="data")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--chunk", type=positive_int_arg, default=4096)
    p.add_argument("--batch", type=positive_int_arg, default=256)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    a = p.parse_args(argv)
    for flag, path in (("--teacher", a.teacher), ("--data", a.data)):
        if not os.path.exists(path):
            p.error(f"{flag} {path}: not found")
    try:
        a.device = resolve_device(a.device)
    except EngineError as e:
        p.error(str(e))
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file; a store is a directory")
    teacher = load_edm_pickle(a.teacher, mode="teacher").to(a.device).eval().requires_grad_(False)
    label_dim = teacher_label_dim(teacher) or 0
    dataset = ImageDataset(a.data, use_labels=label_dim > 0 or _stored_labelled(a.out))
    if label_dim and not dataset.has_labels:
        raise EngineError(f"the teacher {a.teacher} is class-conditional ({label_dim} classes) but --data {a.data} has "
                          f"no labels (dataset.json): its trajectories would be solved for an all-zero label vector, "
                          f"which is no class; use the labelled dataset it was trained on")
    data = ImageDatasetSource(dataset)
    shape = list(data.batch(torch.tensor([0]), "cpu")[0].shape[1:])
    model = getattr(teacher, "model", teacher)
    want = [getattr(model, "img_channels", shape[0]), getattr(model, "img_resolution", shape[1]),
            getattr(model, "img_resolution", shape[2])]
    if shape != want:
        raise EngineError(f"{a.data} holds images of shape {shape}; the teacher {a.teacher} was trained on {want}")
    spec = StoreSpec(num_trajectories=a.trajectories, shape=shape, nfe=a.nfe, prior=a.prior, dtype=a.dtype,
                     chunk=a.chunk, seed=a.seed,
                     teacher=f"{os.path.basename(a.teacher)} ({os.path.getsize(a.teacher)} bytes)")
    store = write_store(a.out, spec, teacher, data, a.device, a.batch, teacher_fingerprint=file_fingerprint(a.teacher))
    print(f"{a.out}: {len(store)} trajectories of {spec.nfe + 1} states {tuple(spec.shape)} {spec.dtype}")


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
