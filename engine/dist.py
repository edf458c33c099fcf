"""The one place that talks to torch.distributed: process groups from torchrun's environment, per-rank sharding,
model wrapping (FSDP2 / DDP), the collectives the loop needs, and sharded checkpoints. Nothing else in the engine
imports torch.distributed. Without torchrun (no WORLD_SIZE) everything here is a single-process no-op.

    torchrun --nproc_per_node=N recipes/<name>.py ...          # every recipe
    torchrun --nproc_per_node=N -m engine.evaluate ...

Process group: NCCL when CUDA is available, gloo otherwise (CPU runs, CI).

Data parallelism. The global batch (a stage's `batch_size` pairs, and the images its objective consumes for them)
is divided evenly over the ranks; the sampler deals each rank a contiguous share of the global index list
(`ResumableSampler.indices(position, count, rank, world)`), and a step's random numbers are drawn for the global
batch from (seed, images seen) with each rank keeping its rows (engine.objectives.base.StepRNG). So a run's data and
noise do not depend on the world size, and a checkpoint resumes at any world size.

Wrapping (`Parallel(net, strategy, device)` after the network is built and initialised; `wrap` underneath):
  fsdp  FSDP2 `fully_shard` on every block (the modules whose class name ends in "Block": DiTBlock, UNetBlock)
        and on the root; on CUDA with bf16 parameters in compute and fp32 gradient reduction
        (MixedPrecisionPolicy); parameters, gradients and optimizer state are sharded DTensors;
  ddp   DistributedDataParallel (small models: one all-reduce per step, replicated state);
  auto  fsdp when distributed over two or more processes, nothing otherwise (an explicit fsdp or ddp is honoured
        under torchrun with one process too).
Forward-mode work (Mean Flow's JVP, sCM's tangents, their finite differences) runs on `jvp_view(net)`, always
without gradients, while the gradient-carrying forward goes through the wrapper (docs/spec/mf.md §2.7): so the
wrapper reduces gradients exactly once, for that forward. Under DDP the view is the wrapped module — the wrapper
cannot be traced by torch.func, and its reducer must not see a second forward. Under FSDP2 it is the sharded
module itself: its per-block hooks gather each unit's parameters around that unit's forward, under torch.func.jvp
too (tests/test_distributed.py), and code that reads weights directly (the DiT's dual-stream JVP) gathers them
with `unsharded`. A frozen teacher may be sharded too (`shard_frozen`): its parameters are gathered block by block
at each use.

Checkpoints (`save_sharded` / `load_sharded`): torch.distributed.checkpoint (DCP) directories of the logical,
fully-qualified state (model, EMA, optimizer), each rank writing its shards, written under a temporary name and
renamed into place by rank 0 after every rank has finished, so a directory that exists is complete. DCP reshards on
load, so a checkpoint written at world size 2 resumes at 1 and the reverse. `full_state` gathers a consolidated
state dict (the safetensors release export uses it).
"""
from __future__ import annotations

import contextlib
import copy
import os
import shutil

import torch
import torch.distributed as td
from torch import nn

from engine.errors import EngineError
from engine.checkpoints.state_dicts import load_network_state

STRATEGIES = ("auto", "fsdp", "ddp", "none")


# ---- process group ----------------------------------------------------------------------------------------------

def is_distributed() -> bool:
    return td.is_available() and td.is_initialized()


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def rank() -> int:
    return td.get_rank() if is_distributed() else 0


def init() -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) if there is one;
    return this rank's device (cuda:LOCAL_RANK, or cpu). Safe to call more than once."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if n > 1 and not is_distributed():
        backend = "nccl" if cuda else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is not None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's workers share the agent's key-value store across restarts; the process group's keys
            # (each rank's address) would survive from the failed attempt, and a restarted rank could read a dead
            # peer's address before the peer rewrites it (seen: gloo "Connection refused" after an elastic
            # restart). Each attempt therefore gets its own key prefix.
            store = td.PrefixStore(f"engine/attempt-{restart}/",
                                   td.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), n,
                                               is_master=False))
            td.init_process_group(backend=backend, store=store, rank=int(os.environ["RANK"]), world_size=n)
        else:
            td.init_process_group(backend=backend)
    return torch.device("cuda", local) if cuda else torch.device("cpu")


def shutdown() -> None:
    if is_distributed():
        td.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        td.barrier()


def gather_objects(obj) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size() if rank() == 0 else None
    td.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (in place, returned)."""
    if world_size() > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
        t /= world_size()
    return t


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank if `flag` is true on any (so that all ranks take the same branch, e.g. stop on NaN)."""
    t = torch.as_tensor(flag, dtype=torch.float32).reshape(1).clone()
    if world_size() > 1:
        t = t.to(_collective_device())
        td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item() > 0)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if td.get_backend() == "nccl" else torch.device("cpu")


# ---- per-rank sharding ------------------------------------------------------------------------------------------

def local_share(total: int, what: str) -> int:
    """`total` items of the global batch divided over the ranks; a clear error when they do not divide evenly."""
    n = world_size()
    if total % n:
        raise ValueError(f"{what}: {total} per global batch cannot be divided evenly over {n} ranks ({total / n:g} "
                         f"each); choose a global batch that is a multiple of the world size")
    return total // n


def to_scalar_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly-DTensor scalar (FSDP's gradient norm is a replicated DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---- wrapping ---------------------------------------------------------------------------------------------------

def resolve_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown data-parallel strategy {strategy!r}; expected one of {STRATEGIES}")
    if not is_distributed() or (world_size() == 1 and strategy == "auto"):
        return "none"
    # an explicit 'fsdp' / 'ddp' is honoured under torchrun at any world size, one process included (the one-GPU
    # FSDP2-over-NCCL check of bench/gpu_check.py; tests/test_distributed.py)
    return "fsdp" if strategy == "auto" else strategy


def fsdp_units(net: nn.Module) -> list[nn.Module]:
    """The modules sharded as their own FSDP units: every module whose class name ends in 'Block' and that is not
    inside another such module (DiT's DiTBlock, the U-Nets' UNetBlock), in module order."""
    units, inside = [], set()
    for name, m in net.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if type(m).__name__.endswith("Block"):
            units.append(m)
            inside.add(name)
    return units


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (world_size(),))


def mixed_precision(device: torch.device, bf16: bool) -> dict | None:
    """FSDP2's mixed-precision policy for a trained network on `device`: bf16 parameters gathered for compute and
    fp32 gradient reduction on CUDA when the stage computes in bf16 (a stage with bf16=False, CMT at 512 in fp32 +
    TF32, gets none); inputs are not cast (σ, t and the preconditioning stay fp32; the loop's autocast decides the
    matmul dtype). None: the parameters are gathered in their own dtype."""
    if device.type == "cuda" and bf16:
        return dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return None


def _fully_shard(net: nn.Module, device: torch.device, reshard_after_forward: bool = True,
                 bf16: bool = True) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = _mesh(device)
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    policy = mixed_precision(device, bf16)
    if policy is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(**policy)
    # FSDP2 cannot shard 0-d parameters (EDM2's emb_gain / out_gain): they stay whole on every rank, and the loop
    # averages their gradients itself (replicated_parameters)
    scalars = {p for p in net.parameters() if p.ndim == 0}
    if scalars:
        kw["ignored_params"] = scalars
    for unit in fsdp_units(net):
        fully_shard(unit, **kw)
    fully_shard(net, **kw)
    return net


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trained parameters of an FSDP2 model that FSDP leaves whole (0-d ones): their gradients must be averaged
    over the ranks by the caller. None for any other model."""
    if not (is_distributed() and is_sharded(model)):
        return []
    return [p for p in model.parameters() if p.requires_grad and not hasattr(p, "to_local")]


def wrap(net: nn.Module, strategy: str, device: torch.device, bf16: bool = True) -> nn.Module:
    """The network as the optimizer and the objective see it under `strategy` (see the module docstring); `bf16`:
    FSDP2 gathers bf16 parameters for compute on CUDA (the stage's bf16 setting)."""
    strategy = resolve_strategy(strategy)
    if strategy == "none":
        return net
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return _fully_shard(net, device, bf16=bf16)


class Parallel:
    """A stage's network as data parallelism holds it, and the way back to plain modules.

    `model` is what the optimizer and the objective see (the network itself without torchrun; FSDP2-sharded or
    DDP-wrapped under it). `also` are modules sharded like the model under FSDP (the EMA copy: its update is then
    shard-local); `frozen` modules sharded for their forwards only (a large teacher, a guide: `shard_frozen`).
    `gathered(module)` is the module with its full weights on every rank: itself where it is whole, else a plain
    copy built from a CPU shell of the network taken before wrapping (every rank takes part)."""

    def __init__(self, net: nn.Module, strategy: str, device: torch.device, also=(), frozen=(), bf16: bool = True):
        self.strategy, self.device, self.shell = resolve_strategy(strategy), device, None
        if self.strategy != "none":
            self.shell = copy.deepcopy(net.cpu())
            net.to(device)
            for module in frozen:
                # Frozen networks never get the bf16 parameter policy: a teacher solved in fp32 (CMT's trajectories)
                # would otherwise solve with bf16-rounded weights, and a DiT teacher, whose linears take their
                # input's dtype, would meet fp32 inputs with bf16 weights. Where the loop's autocast is on, it
                # casts their matmuls to bf16 as it does for unsharded teachers.
                shard_frozen(module, device, bf16=False)
        self.model = wrap(net, self.strategy, device, bf16=bf16)
        if self.strategy == "fsdp":
            for module in also:
                wrap(module, "fsdp", device, bf16=bf16)

    def gathered(self, module: nn.Module) -> nn.Module:
        if not (is_distributed() and is_sharded(module)) and type(module).__name__ != "DistributedDataParallel":
            return module
        return load_network_state(copy.deepcopy(self.shell), full_state(module)).to(self.device)


def shard_frozen(module: nn.Module, device: torch.device, bf16: bool = True) -> nn.Module:
    """Shard a frozen module (a large teacher) over the ranks; its forwards gather parameters block by block.
    Every rank must then call it the same number of times, which the objectives do (same code, local batch).
    A module already sharded (by an earlier stage) is left as it is."""
    if world_size() == 1 or is_sharded(module):
        return module
    return _fully_shard(module, device, bf16=bf16)


def unwrap(net: nn.Module) -> nn.Module:
    """The module itself under a DDP wrapper (forward-mode AD and direct weight reads run on it); FSDP2 shards in
    place, so an FSDP module is returned as is."""
    return net.module if type(net).__name__ == "DistributedDataParallel" else net


def jvp_view(net: nn.Module) -> nn.Module:
    """The module that forward-mode AD and other no-grad target passes run on (module docstring): the wrapped module
    under DDP, the network itself otherwise (FSDP2 shards in place and gathers in its hooks)."""
    return unwrap(net)


FUNC_JVP_THROUGH_FSDP2 = (2, 13)   # the first torch on which torch.func.jvp through FSDP2's hooks was verified


def check_func_jvp(net: nn.Module) -> None:
    """Refuse torch.func.jvp through an FSDP2-sharded network where torch cannot do it. On torch 2.11 the tangent
    pass fails inside FSDP2's hooks ("Cannot access storage of TensorWrapper"), or, after the prediction's forward,
    rewrites weights that forward saved for backward ("modified by an inplace operation"); both were seen with
    sCD on 2 gloo processes. The central difference (jvp='fd') needs no forward-mode AD and runs there."""
    if is_distributed() and is_sharded(net) and _torch_version() < FUNC_JVP_THROUGH_FSDP2:
        raise EngineError(f"torch.func.jvp through an FSDP2-sharded network needs torch ≥ "
                          f"{'.'.join(map(str, FUNC_JVP_THROUGH_FSDP2))} (this is {torch.__version__}): use jvp='fd', "
                          f"or StageConfig(parallel='ddp')")


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def unsharded(*modules: nn.Module):
    """Gather the FSDP-sharded parameters of `modules` (each its own unit, not its children's) for code that reads
    weights directly instead of calling forward (the DiT's dual-stream JVP); a no-op for unsharded modules."""
    sharded = [m for m in modules if is_distributed() and is_sharded(m)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


# ---- state ------------------------------------------------------------------------------------------------------

def full_state(module: nn.Module) -> dict:
    """A consolidated (unsharded) CPU state dict of `module`, on every rank. Sharded tensors are all-gathered one
    at a time (`full_tensor`) and moved to the CPU, so at most one full tensor sits on the device at once."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
            for k, v in unwrap(module).state_dict().items()}


def train_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts keyed by parameter name, sharded as the model is: the form DCP saves and
    reshards. Works for plain, DDP and FSDP models."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return get_state_dict(unwrap(model), optimizer)


def set_train_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(unwrap(model), optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def set_full_train_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    """Load a single-process checkpoint (full tensors; the optimizer's state keyed by parameter index, as
    `optimizer.state_dict()` writes it) into a sharded model and its optimizer: every rank reads the same file and
    keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    names = [n for n, p in unwrap(model).named_parameters() if p.requires_grad]
    by_name = {"state": {names[i]: v for i, v in optim_state["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in optim_state["param_groups"]]}
    set_state_dict(unwrap(model), optimizer, model_state_dict=model_state, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True))


def set_full_module_state(module: nn.Module, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(unwrap(module), state, options=StateDictOptions(full_state_dict=True))


def module_state(module: nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(unwrap(module))


def set_module_state(module: nn.Module, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(unwrap(module), state)


MANIFEST = "MANIFEST.sha256"


def _hash_files(directory: str, names: list[str]) -> dict[str, str]:
    from engine.checkpoints.files import file_sha256
    return {n: file_sha256(os.path.join(directory, n)) for n in names}


def _sharded_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n != MANIFEST and os.path.isfile(os.path.join(directory, n)))


def save_sharded(directory: str, state: dict, extra: dict) -> None:
    """Write `state` (nested dicts of possibly-sharded tensors) with DCP into `directory`, plus `extra` (plain
    Python values, rank 0's) as extra.pt, atomically: written to a hidden sibling, renamed when every rank is
    done. An existing `directory` is replaced. Before the rename, every file's SHA-256 goes into MANIFEST.sha256
    (the ranks hash a share of the files each), which `load_sharded` checks."""
    import torch.distributed.checkpoint as dcp
    parent, name = os.path.split(os.path.abspath(directory))
    tmp = os.path.join(parent, f".{name}.tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    dcp.save(state, checkpoint_id=tmp)
    if rank() == 0:
        from engine.checkpoints.files import save_checkpoint
        save_checkpoint(os.path.join(tmp, "extra.pt"), extra)
    barrier()
    files = _sharded_files(tmp)
    hashes = gather_objects(_hash_files(tmp, files[rank()::world_size()]))
    if rank() == 0:
        from engine.checkpoints.files import atomic_write
        merged = {k: v for part in hashes for k, v in part.items()}
        atomic_write(os.path.join(tmp, MANIFEST),
                     lambda f: f.write("".join(f"{merged[n]}  {n}\n" for n in sorted(merged)).encode()))
        _fsync_dir(tmp)
        old = None
        if os.path.exists(directory):
            old = os.path.join(parent, f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(directory, old)
        os.rename(tmp, directory)
        _fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_sharded(directory: str) -> bool:
    """Check a distributed checkpoint's files against its MANIFEST.sha256, each rank a share of them, all ranks
    agreeing: True when it matches, False for a checkpoint written before manifests existed,
    UnreadableCheckpoint (on every rank) when any file is missing, extra or changed."""
    from engine.checkpoints.files import UnreadableCheckpoint
    manifest = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest):
        return False
    recorded = {}
    for line in open(manifest, encoding="utf-8", errors="replace"):
        parts = line.split()
        if len(parts) == 2:
            recorded[parts[1]] = parts[0]
    files = _sharded_files(directory)
    problems = [f"{n} is not in the manifest" for n in files if n not in recorded]
    problems += [f"{n} is missing" for n in recorded if n not in files]
    mine = [n for n in files[rank()::world_size()] if n in recorded]
    problems += [f"{n} does not match its SHA-256" for n, h in _hash_files(directory, mine).items()
                 if h != recorded[n]]
    if any_rank(bool(problems)):
        raise UnreadableCheckpoint(f"{directory}: its files do not match {MANIFEST}"
                                   + (f" ({'; '.join(problems[:3])})" if problems else " (found by another rank)"))
    return True


def load_sharded(directory: str, state: dict, check=None) -> dict:
    """Fill `state` (the same structure save_sharded wrote, as this run shards it) from `directory` in place and
    return the extra values; `check(directory, extra)` may refuse them first. The files are checked against the
    manifest before anything is read. DCP reads each rank's shards from whatever layout wrote them; a failure to
    do so is a damaged checkpoint when nothing vouched for its bytes, and a misfit when the manifest did."""
    import torch.distributed.checkpoint as dcp

    from engine.checkpoints.files import CheckpointError, UnreadableCheckpoint, load_checkpoint
    if not os.path.isfile(os.path.join(directory, ".metadata")):
        raise FileNotFoundError(f"{directory} is not a complete distributed checkpoint (no .metadata)")
    verified = verify_sharded(directory)
    extra = load_checkpoint(os.path.join(directory, "extra.pt"), verify=verified)
    if check is not None:
        check(directory, extra)
    try:
        dcp.load(state, checkpoint_id=directory)
    except Exception as e:  # noqa: BLE001 - DCP raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e) else type(e).__name__
        if verified:
            raise CheckpointError(f"{directory} does not fit this stage: {first}") from None
        raise UnreadableCheckpoint(f"{directory}: {first}") from None
    return extra
