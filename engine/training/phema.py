"""Post-hoc EMA reconstruction (Karras et al. 2024, §3 and App. C; docs/spec/edm2_latent.md §2.3).

A run that tracks power-function EMAs (StageConfig.snapshot_emas, EDM2: σ_rel 0.050 and 0.100) leaves a series of
snapshots; any other EMA profile (t_out, σ_out) is a linear combination of them. Snapshot i, taken at t_i images
with exponent γ_i, averages the training weights with the profile p_i(τ) = (γ_i+1)/t_i·(τ/t_i)^γ_i on [0, t_i].
The coefficients minimise ∫(Σ x_i p_i − p_out)² dτ, i.e. solve A x = b with the inner products

    ⟨a, b⟩ = (γ_a+1)(γ_b+1)·(t_a/t_b)^e / ((γ_a+γ_b+1)·max(t_a, t_b)),  e = γ_b if t_a < t_b else −γ_a

(A_ij = ⟨in_i, in_j⟩, b_i = ⟨in_i, out⟩), normalised to sum to 1; θ_out = Σ x_i θ_i over parameters in float32,
buffers taken from the last snapshot — as NVlabs/edm2's `reconstruct_phema.py` does.

    python -m engine.training.phema --in RUN/stage/snapshots --std 0.070 --out ema-0.070.safetensors
    python -m engine.training.phema --in edm2-raw-snapshots/ --std 0.05 --std 0.10 --out DIR [--kimg K] [--prefix P]

Inputs: this engine's snapshots (`<stage>-<images:012d>-<std>.safetensors`, the image count and σ_rel also in
their metadata) and EDM2's pickles (`network-snapshot-0134217-0.050.pkl`, `edm2-img64-xs-0134217-0.110.pkl`: kimg
in the name, mapped to images as EDM2 does, engine/training/ema.py `kimg_to_nimg`), read without running their code.
Outputs are safetensors releases (engine/checkpoints/releases.py), named as this engine's snapshots, written
atomically. An output never replaces a snapshot of --in (by name or through a link) nor an existing file other than
this command's own earlier output (same σ_rel, time and inputs): every destination is checked before anything is
reconstructed.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os

import numpy as np
import torch

from engine.checkpoints.files import short_list
from engine.checks import arg, finite
from engine.errors import EngineError
from engine.training.ema import kimg_to_nimg, parse_snapshot_name, snapshot_name, std_to_exp

__all__ = ["Snapshot", "power_function_correlation", "solve_coefficients", "list_snapshots", "reconstruct",
           "check_destination", "main"]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    path: str
    nimg: int          # images seen when it was taken
    std: float         # its σ_rel


def power_function_correlation(a_t, a_std, b_t, b_std) -> np.ndarray:
    """⟨p_a, p_b⟩ of power-function profiles (broadcasting), float64 (EDM2 paper Eq. 151)."""
    a_t, b_t = np.float64(a_t), np.float64(b_t)
    a_exp = np.vectorize(std_to_exp)(np.float64(a_std))
    b_exp = np.vectorize(std_to_exp)(np.float64(b_std))
    t_exp = np.where(a_t < b_t, b_exp, -a_exp)
    return (a_exp + 1) * (b_exp + 1) * (a_t / b_t) ** t_exp / ((a_exp + b_exp + 1) * np.maximum(a_t, b_t))


def solve_coefficients(in_t, in_std, out_t, out_std) -> np.ndarray:
    """Coefficients [inputs, outputs] reconstructing each output profile from the input profiles, each column
    summing to 1 (EDM2 Algorithm 3)."""
    col = lambda v: np.float64(v).reshape(-1, 1)
    row = lambda v: np.float64(v).reshape(1, -1)
    in_t, in_std = np.broadcast_arrays(np.float64(in_t), np.float64(in_std))
    out_t, out_std = np.broadcast_arrays(np.float64(out_t), np.float64(out_std))
    A = power_function_correlation(col(in_t), col(in_std), row(in_t), row(in_std))
    B = power_function_correlation(col(in_t), col(in_std), row(out_t), row(out_std))
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)


def _metadata_snapshot(path: str, name_nimg: int, name_std: float) -> Snapshot:
    from engine.checkpoints.releases import read_safetensors_metadata
    _, meta = read_safetensors_metadata(path)
    if "nimg" not in meta or "std" not in meta:
        raise EngineError(f"{path}: no image count / σ_rel in its metadata; not a snapshot of a stage's tracked EMAs")
    nimg, std = int(meta["nimg"]), float(meta["std"])
    if nimg != name_nimg or f"{std:.3f}" != f"{name_std:.3f}":
        raise EngineError(f"{path}: its name says {name_nimg} images, σ_rel {name_std:.3f}, its metadata {nimg} "
                          f"images, σ_rel {std}; was it renamed?")
    return Snapshot(path, nimg, std)


def list_snapshots(directory: str, prefix: str | None = None, stds=None) -> list[Snapshot]:
    """The snapshots in `directory` (optionally only `prefix`-named or of the given σ_rel), by (nimg, σ_rel)."""
    if not os.path.isdir(directory):
        raise EngineError(f"--in {directory}: not a directory of snapshots")
    found = []
    for name in sorted(os.listdir(directory)):
        parsed = parse_snapshot_name(name)
        path = os.path.join(directory, name)
        if parsed is None or not os.path.isfile(path):
            continue
        p, kimg, std = parsed
        if (prefix is not None and p != prefix) or (stds is not None and not any(abs(std - s) < 5e-4 for s in stds)):
            continue
        if name.endswith(".safetensors"):
            found.append(_metadata_snapshot(path, kimg, std))     # this engine's names carry images
        else:
            found.append(Snapshot(path, kimg_to_nimg(kimg), std))
    return sorted(found, key=lambda s: (s.nimg, s.std))


def _load(path: str):
    """A snapshot's network, float32, on the CPU."""
    if path.endswith(".safetensors"):
        from engine.checkpoints.releases import load_safetensors_network
        return load_safetensors_network(path).float()
    from engine.checkpoints.edm_snapshots import load_edm_pickle
    return load_edm_pickle(path, key="ema").float()


def reconstruct(snapshots: list[Snapshot], out_std, out_nimg: int | None = None, load=_load):
    """[(σ_rel, network)] for each σ_rel of `out_std` at `out_nimg` (default: the newest snapshot's time, which
    must be one of the snapshots' times), from the snapshots taken at or before it. Streams: one input network
    in memory at a time besides the outputs' float32 accumulators."""
    out_std = sorted({finite("std", float(s), "phema", low=0.0, high=0.2886, strict=True)
                      for s in np.atleast_1d(out_std)})
    if not snapshots:
        raise EngineError("phema: no snapshots to reconstruct from")
    times = sorted({s.nimg for s in snapshots})
    out_nimg = times[-1] if out_nimg is None else int(out_nimg)
    if out_nimg not in times:
        raise EngineError(f"phema: no snapshot was taken at {out_nimg} images; times available: "
                          f"{short_list([t // 1000 for t in times])} kimg")
    inputs = [s for s in snapshots if 0 < s.nimg <= out_nimg]
    coefs = solve_coefficients([s.nimg for s in inputs], [s.std for s in inputs], out_nimg, out_std)
    template, sums, buffers = None, [dict() for _ in out_std], {}
    for i, snap in enumerate(inputs):
        net = load(snap.path)
        params = {n: p.detach().float() for n, p in net.named_parameters()}
        if template is None:
            template, shapes = net, {n: p.shape for n, p in params.items()}
        elif {n: p.shape for n, p in params.items()} != shapes:
            raise EngineError(f"phema: {snap.path} holds another network than {inputs[0].path}")
        for j, acc in enumerate(sums):
            for n, p in params.items():
                if n in acc:
                    acc[n].add_(p, alpha=float(coefs[i, j]))
                else:
                    acc[n] = p * float(coefs[i, j])
        buffers = {n: b.detach().clone() for n, b in net.named_buffers()}
    outputs = []
    for std, acc in zip(out_std, sums):
        module = copy.deepcopy(template)
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(acc[n])
            for n, b in module.named_buffers():
                b.copy_(buffers[n])
        outputs.append((std, module.eval().requires_grad_(False)))
    return outputs


def _same_file(a: str, b: str) -> bool:
    """Whether `a` is `b`: the same inode (through symbolic or hard links), or for a path not yet there, the same
    resolved name."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_destination(path: str, indir: str, metadata: dict) -> None:
    """Refuse an output path that would replace what this command does not own: any snapshot in `indir` (by name,
    symbolic link or hard link: the run's own series, filtered out by --prefix / --in-std or not), and any existing
    file that is not this command's earlier output — a release whose σ_rel, image count and input names are
    `metadata`'s (rewriting it gives the same weights). Nothing is written here."""
    snapshots = [os.path.join(indir, n) for n in sorted(os.listdir(indir)) if parse_snapshot_name(n) is not None]
    hit = next((s for s in snapshots if _same_file(path, s)), None)
    if hit is not None:
        raise EngineError(f"--out {path} is the snapshot {hit} of --in {indir}; reconstructing into it would replace "
                          f"the run's own snapshot. Give another --out")
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        raise EngineError(f"--out {path} is a directory, not a file to write the reconstruction to; give "
                          f"another --out")
    from engine.checkpoints.releases import read_safetensors_metadata
    try:
        _, found = read_safetensors_metadata(path)
    except (EngineError, OSError, ValueError):
        found = None
    ours = found is not None and all(found.get(k) == v for k, v in metadata.items())
    if not ours:
        raise EngineError(f"--out {path} exists and is not this command's earlier output (σ_rel "
                          f"{metadata['std']:.3f} at {metadata['nimg']} images from the same snapshots); it is left "
                          f"as it is. Remove it or give another --out")


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m engine.training.phema", description=__doc__.split("\n\n")[0])
    parser.add_argument("--in", dest="indir", required=True, help="directory of snapshots")
    parser.add_argument("--std", type=arg(lambda v: finite("--std", float(v), "", 0.0, 0.2886, strict=True)),
                        action="append", required=True, help="σ_rel to reconstruct (repeatable)")
    parser.add_argument("--out", required=True,
                        help="output file (.safetensors, one --std) or directory (files named as the inputs)")
    parser.add_argument("--kimg", type=arg(lambda v: int(v)), default=None,
                        help="reconstruct at this snapshot time (default: the newest)")
    parser.add_argument("--prefix", default=None, help="use only inputs with this name prefix")
    parser.add_argument("--in-std", type=arg(lambda v: float(v)), action="append", default=None,
                        help="use only inputs of this σ_rel (repeatable)")
    parser.add_argument("--out-prefix", default="phema")
    args = parser.parse_args(argv)
    snaps = list_snapshots(args.indir, args.prefix, args.in_std)
    if not snaps:
        raise EngineError(f"--in {args.indir}: no snapshots named <prefix>-<images>-<std>.safetensors or "
                          f"<prefix>-<kimg>-<std>.pkl")
    out_nimg = None
    if args.kimg is not None:
        match = sorted({s.nimg for s in snaps if s.nimg // 1000 == args.kimg})
        if not match:
            raise EngineError(f"--kimg {args.kimg}: no snapshot at that time")
        out_nimg = match[0]
    single = args.out.endswith(".safetensors")
    if single and len(args.std) != 1:
        raise EngineError("--out names one file; give a directory to reconstruct several --std")
    nimg = out_nimg or max(s.nimg for s in snaps)
    inputs = [os.path.basename(s.path) for s in snaps if s.nimg <= nimg]
    meta = {std: dict(nimg=nimg, std=std, phema_inputs=inputs) for std in args.std}
    paths = {std: args.out if single else os.path.join(args.out, snapshot_name(args.out_prefix, nimg, std))
             for std in args.std}
    # every destination is checked before anything is reconstructed or written (docs/runs.md: check first)
    for std, path in paths.items():
        check_destination(path, args.indir, meta[std])
    from engine.checkpoints.releases import export_safetensors
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) if single else args.out, exist_ok=True)
    written = []
    for std, net in reconstruct(snaps, args.std, out_nimg):
        path = paths[std]
        export_safetensors(net, path, metadata=meta[std])     # atomically (engine/checkpoints/files.py)
        print(f"{path}: σ_rel {std:.3f} at {nimg} images from {len(inputs)} snapshots", flush=True)
        written.append(path)
    return written


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
