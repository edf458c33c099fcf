"""Pre-generated teacher trajectories for CMT (beyond the paper, which notes this regime and does not build it).

With the trajectories on disk, a mid-training step is one back-propagated student evaluation per pair and no
teacher call at all. A store is a directory:

    meta.json          what was solved: teacher description, σ grid, solver order and rule, prior, shapes, seed
    states.bin         memory-mapped [T, N + 1, *shape] (float32 or float16): x_0 = x_T … x_N of each trajectory
    seeds.npy          [T] int64: the seed of each trajectory's noise ε (torch.Generator on the CPU, float32)
    image_index.npy    [T] int64: the dataset image y of each trajectory (the data prior x_T = y + σ_max ε)
    labels.npy         [T] int64 class indices (only for labelled data)
    progress.json      the chunks written so far (atomically replaced after each chunk is flushed)

`write_store` fills it chunk by chunk with a progress bar; killed and rerun with the same arguments it resumes at
the first unwritten chunk (a half-written chunk is simply rewritten); rerun with different arguments it refuses.
`regenerate(store, t, teacher)` recomputes trajectory t from its stored seed and image, and `TrajectorySource`
feeds the store to the `CachedCMT` objective (engine/objectives/cmt.py).

Command line (the dataset and teacher as the recipes take them):

    python -m engine.teacher.trajectory_cache --teacher edm-cifar10-32x32-uncond-vp.pkl --data cifar10-32x32.zip \\
        --out trajectories/cifar10 --trajectories 1000000 [--chunk 4096] [--batch 256] [--nfe 16] [--seed 0]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from engine.errors import EngineError
from engine.schedules import SIGMA_MAX, SIGMA_MIN, logsnr_sigmas
from engine.teacher.solver import TeacherSolver

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
        with open(tmp, "w") as f:
            json.dump({"chunks_done": sorted(chunks)}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.path, "progress.json"))


def _create(path: str, spec: StoreSpec) -> None:
    os.makedirs(path, exist_ok=True)
    full = (spec.num_trajectories, spec.nfe + 1, *spec.shape)
    np.memmap(os.path.join(path, "states.bin"), dtype=DTYPES[spec.dtype], mode="w+", shape=full).flush()
    seeds = np.array([trajectory_seed(spec.seed, t) for t in range(spec.num_trajectories)], dtype=np.int64)
    np.save(os.path.join(path, "seeds.npy"), seeds)
    np.save(os.path.join(path, "image_index.npy"),
            image_indices(spec.seed, spec.num_images, 0, spec.num_trajectories).astype(np.int64))
    if spec.labelled:
        np.save(os.path.join(path, "labels.npy"), np.zeros(spec.num_trajectories, dtype=np.int64))
    tmp = os.path.join(path, "meta.json.tmp")  # written last: a store without meta.json is not a store yet
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "spec": dataclasses.asdict(spec)}, f, indent=1)
    os.replace(tmp, os.path.join(path, "meta.json"))


def _start_states(spec: StoreSpec, data, ts: np.ndarray, index: np.ndarray, seeds: np.ndarray, device):
    eps = torch.stack([trajectory_noise(seeds[t], spec.shape) for t in ts]).to(device)
    images, labels = data.batch(torch.as_tensor(index[ts]), device)
    if tuple(images.shape[1:]) != tuple(spec.shape):
        raise StoreError(f"the dataset's images are {tuple(images.shape[1:])}, the store holds {tuple(spec.shape)}")
    x_T = spec.sigma_max * eps if spec.prior == "noise" else images.float() + spec.sigma_max * eps
    return x_T, labels


def write_store(path: str, spec: StoreSpec, teacher, data, device="cpu", batch: int = 256,
                progress: bool = True) -> "TrajectoryStore":
    """Create (or resume) the store at `path`: `spec.num_trajectories` teacher solves of `teacher` from images of
    `data` (a source with `len` and `batch(indices, device)`, as the loop takes)."""
    if spec.prior not in ("data", "noise"):
        raise ValueError(f"prior must be 'data' or 'noise', got {spec.prior!r}")
    if spec.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {spec.dtype!r}")
    probe_images, probe_labels = data.batch(torch.tensor([0]), "cpu")
    spec = dataclasses.replace(spec, num_images=len(data), shape=[int(s) for s in spec.shape],
                               labelled=probe_labels is not None)
    if list(probe_images.shape[1:]) != spec.shape:
        raise StoreError(f"the dataset's images are {tuple(probe_images.shape[1:])}, the spec says {spec.shape}")
    if os.path.exists(os.path.join(path, "meta.json")):
        store = TrajectoryStore(path, mode="r+")
        if store.spec != spec:
            diff = {k: (getattr(store.spec, k), getattr(spec, k)) for k in dataclasses.asdict(spec)
                    if getattr(store.spec, k) != getattr(spec, k)}
            raise StoreError(f"{path} holds a store made with other settings (stored, requested): {diff}; "
                             f"use another --out or remove it")
    else:
        _create(path, spec)
        store = TrajectoryStore(path, mode="r+")
    solver = TeacherSolver(teacher, spec.sigmas(), spec.order, third_order=spec.third_order)
    done = store.done_chunks()
    todo = [c for c in range(spec.num_chunks) if c not in done]
    bar = tqdm(total=spec.num_trajectories, initial=spec.num_trajectories - sum(
        min(spec.chunk, spec.num_trajectories - c * spec.chunk) for c in todo), unit="traj", disable=not progress,
        desc="trajectories")
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
    bar.close()
    return TrajectoryStore(path)


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
        """What the store is (engine/checkpoints/identity.py): its specification and the hash of its chunk index."""
        import dataclasses

        from engine.checkpoints.identity import plain
        return {"store": plain(dataclasses.asdict(self.spec)), "chunks": sorted(self.store.done_chunks())}

    def batch(self, idx: torch.Tensor, device):
        i = np.asarray(idx, dtype=np.int64)
        traj = torch.from_numpy(np.ascontiguousarray(self.store.states[i])).float().to(device)
        labels = None if self.store.labels is None else torch.from_numpy(np.asarray(self.store.labels[i])).to(device)
        return traj, labels


def main(argv=None) -> None:
    from engine.checkpoints.edm_snapshots import load_edm_pickle
    from engine.checks import nonneg_int_arg, positive_int_arg
    from engine.cli import resolve_device
    from engine.data import ImageDataset
    from engine.data.sampler import ImageDatasetSource

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="EDM teacher snapshot (.pkl)")
    p.add_argument("--data", required=True, help="dataset zip or folder in EDM's format")
    p.add_argument("--out", required=True, help="store directory (created, or resumed)")
    p.add_argument("--trajectories", type=positive_int_arg, required=True)
    p.add_argument("--nfe", type=positive_int_arg, default=16)
    p.add_argument("--prior", choices=["data", "noise"], default="data")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--chunk", type=positive_int_arg, default=4096)
    p.add_argument("--batch", type=positive_int_arg, default=256)
    p.add_argument("--seed", type=nonneg_int_arg, default=0)
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
    dataset = ImageDataset(a.data)
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
    store = write_store(a.out, spec, teacher, data, a.device, a.batch)
    print(f"{a.out}: {len(store)} trajectories of {spec.nfe + 1} states {tuple(spec.shape)} {spec.dtype}")


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
