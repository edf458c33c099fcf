"""What every objective gives the loop, and the per-step random streams it draws from.

An objective is a small callable unit: `objective(net, images, labels, rng) -> LossOutput`. It owns its frozen
teacher (if any), never reaches into a wrapper's `.module`, and draws every random number from `rng`, whose
generators the loop reseeds from (seed, rank, images seen) at each step — so a resumed run replays exactly.

Units. `batch_size` in a stage is the number of *student samples (pairs) per step*; budgets in kimg count them,
as the paper's Mimg do (CMT: 128 pairs per iteration = 8 trajectories × 16). `images_per_step(batch_size)` is the
number of data images the objective consumes for that many pairs; the loader loads exactly that many, so nothing
loaded is discarded (unlike the reference CMT loss, docs/spec/cm.md §3.1 step 1).
"""
from __future__ import annotations

import contextlib

import dataclasses
import hashlib

import torch

from engine.networks.dropout import dropout_generator


step_profile = None     # the engine.training.step_profile.StepProfile timing the current step, if any


@contextlib.contextmanager
def phase(name: str):
    """Marks the enclosed work as the step phase `name`: objectives mark their teacher's work "teacher", the loop
    the rest. Timed only while the loop profiles the step (engine/training/step_profile.py); otherwise a no-op."""
    profile = step_profile
    if profile is None:
        yield
        return
    index = profile._open(name)
    try:
        yield
    finally:
        profile._close(index)


@dataclasses.dataclass
class LossOutput:
    """loss: per-pair losses [pairs] after weighting (the loop back-propagates their mean).
    Counters are per sample: a teacher call on a batch of 8 counts 8 teacher NFE."""
    loss: torch.Tensor
    pairs: int
    teacher_nfe: int = 0
    student_forward: int = 0      # student evaluations, with or without gradient
    student_backward: int = 0     # samples back-propagated through the student


@dataclasses.dataclass
class StepRNG:
    """Generators for one training step: `device` for tensors (noise), `cpu` for host-side draws (dropout seeds,
    index choices) so that drawing a seed never synchronises with the device.

    Under data parallelism (`rank` of `world`, each rank holding an equal share of the global batch) the streams
    are seeded from (seed, images seen) alone and are the same on every rank; a batch-shaped draw (`randn`,
    `rand`: first dimension = this rank's rows) generates the numbers of the whole global batch and keeps this
    rank's rows, and per-step host draws (counts, offsets) are made identically everywhere, with `rows()` telling
    an objective where its rows sit in the global batch. A step's randomness therefore does not depend on the
    world size: N ranks see exactly the numbers one process sees for the same global batch, which is what lets a
    checkpoint resume at another world size and a 2-process run be checked against a 1-process run. What is
    genuinely per rank — the network's dropout masks, drawn on the local batch — is seeded from
    (seed, rank, images seen) through `seed()`."""
    device: torch.Generator
    cpu: torch.Generator
    rank: int = 0
    world: int = 1
    groups: int = 1     # local rows are `groups` equal blocks, block g a share of the global batch's block g

    def grouped(self, groups: int) -> "StepRNG":
        """The same streams for a batch laid out as `groups` blocks of this rank's rows — CMT's step-major pairs,
        entry j·m + b = (grid level j, trajectory b): a draw is made for every block of the global batch and this
        rank's rows are taken from each, so pair (j, b) gets the same numbers at any world size."""
        return dataclasses.replace(self, groups=int(groups))

    def seed(self) -> int:
        """A fresh 63-bit seed for this rank (e.g. for `engine.networks.dropout.dropout_generator`). Every rank
        draws from the shared host stream (so later draws stay aligned) and mixes in its rank."""
        s = int(torch.randint(0, 2 ** 63 - 1, (1,), generator=self.cpu).item())
        if self.rank == 0:
            return s
        return int.from_bytes(hashlib.sha256(f"{s}/{self.rank}".encode()).digest()[:8], "little") >> 1

    def dropout_pinned(self, device):
        """A step's dropout stream: the networks' dropout pinned to a fresh seed of this rank
        (engine/networks/dropout.py `dropout_generator`), for the whole objective call."""
        return dropout_generator(self.seed(), device)

    def rows(self, local: int) -> tuple[int, int]:
        """(offset, global count) of this rank's `local` rows in the global batch."""
        return self.rank * local, self.world * local

    def _rows_of(self, draw, shape, device, dtype) -> torch.Tensor:
        shape = tuple(shape)
        if self.world == 1:
            return draw(shape, generator=self.device, device=device, dtype=dtype)
        g = self.groups
        if shape[0] % g:
            raise ValueError(f"a draw of {shape[0]} rows is not {g} equal blocks")
        n = shape[0] // g
        full = draw((g, n * self.world, *shape[1:]), generator=self.device, device=device, dtype=dtype)
        return full[:, self.rank * n:(self.rank + 1) * n].reshape(shape)

    def randn(self, shape, device, dtype=torch.float32) -> torch.Tensor:
        """N(0, 1) numbers for this rank's rows (shape[0] = local rows) of the global batch's draw."""
        return self._rows_of(torch.randn, shape, device, dtype)

    def rand(self, shape, device, dtype=torch.float32) -> torch.Tensor:
        """U[0, 1) numbers for this rank's rows of the global batch's draw."""
        return self._rows_of(torch.rand, shape, device, dtype)

    @staticmethod
    def for_step(seed: int, rank: int, nimg: int, device: torch.device | str = "cpu", world: int = 1) -> "StepRNG":
        """Deterministic generators from (seed, images seen), sliced for `rank` of `world`: a step's randomness
        depends on nothing else (the digest keeps the single-process form "seed/0/nimg")."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        digest = hashlib.sha256(f"{seed}/0/{nimg}".encode()).digest()
        a, b = int.from_bytes(digest[:8], "little") >> 1, int.from_bytes(digest[8:16], "little") >> 1
        device = torch.device(device)
        dev = torch.Generator(device=device)
        dev.manual_seed(a)
        cpu = torch.Generator()
        cpu.manual_seed(b)
        return StepRNG(device=dev, cpu=cpu, rank=rank, world=world)


class Objective:
    """Base class: subclasses implement `__call__` and, where the loss consumes other than one image per pair,
    `images_per_step`. `set_progress(nimg)` lets schedule-dependent objectives (ECT's stage) follow the image
    count; `state_dict`/`load_state_dict` carry any state that is not a function of the image count."""

    name = "objective"

    def images_per_step(self, batch_size: int) -> int:
        return batch_size

    def frozen_networks(self) -> list:
        """The frozen networks the objective calls (its teacher, an ECD guide): what `shard_teacher` shards."""
        from torch import nn
        return [m for m in (getattr(self, "teacher", None), getattr(self, "guide", None)) if isinstance(m, nn.Module)]

    def set_progress(self, nimg: int) -> None:
        pass

    def log_values(self) -> dict:
        """Scalars worth logging (e.g. the ECT stage); host values only."""
        return {}

    def parameters(self) -> list:
        """Trained parameters the objective owns (optimised with the network's), e.g. an adaptive loss weight."""
        return []

    def to(self, device) -> "Objective":
        """Move owned modules (not frozen teachers, which the caller places) to `device`."""
        return self

    def identity_omits(self) -> set:
        """Names of settings left out of the stage identity (engine/training/stage_config.py describe_object): ones
        added
        to the engine after runs existed, while at the value those runs had, and ones that do not apply."""
        return set()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __call__(self, net, images: torch.Tensor, labels, rng: StepRNG) -> LossOutput:  # pragma: no cover
        raise NotImplementedError


class Wrapper(Objective):
    """An objective that transforms the batch (or the loss) around another, `inner`, and is otherwise that objective:
    everything the loop asks of it is the inner one's (engine/objectives/latent.py, engine/objectives/repa.py)."""

    def __init__(self, inner: Objective):
        self.inner = inner

    def images_per_step(self, batch_size: int) -> int:
        return self.inner.images_per_step(batch_size)

    def set_progress(self, nimg: int) -> None:
        self.inner.set_progress(nimg)

    def frozen_networks(self) -> list:
        return self.inner.frozen_networks()

    def log_values(self) -> dict:
        return self.inner.log_values()

    def parameters(self) -> list:
        return self.inner.parameters()

    def to(self, device) -> "Wrapper":
        self.inner.to(device)
        return self

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
