"""Reference statistics files, compatible with EDM and EDM2 in both directions, and the command that computes them
from a dataset (docs/spec/cm.md §7.2, docs/spec/edm2_latent.md §5.1).

  * `.npz` (EDM's `fid-refs/*.npz`): `mu` [2048] and `sigma` [2048, 2048], float64 — FID only;
  * `.pkl` (EDM2's `dataset-refs/*.pkl`): a plain pickle of `{num_images, fid: {mu, sigma},
    fd_dinov2: {mu, sigma}}` with NumPy arrays. Read with an unpickler that admits dicts, numbers and NumPy
    arrays only, so a hostile file cannot run code.

Reading checks what a Fréchet distance takes on trust (`load_stats`): an `.npz` is a zip archive, μ and Σ are
finite, and each Σ is a covariance — symmetric and positive semi-definite up to rounding (tolerances relative to
its scale, `_pair`) — so that a damaged or foreign file is named when it is read, not scored. The command checks
its --out and that --data holds images (not latents) before computing any feature.

Both conventions use the unbiased covariance (divides by N − 1). In memory a statistics set is
`{"num_images": int | None, "fid": (mu, sigma), "fd_dinov2": (mu, sigma), "detectors": {"fid": {...}},
"path": str}` (metrics absent when not computed).

Statistics carry their protocol. Files written here record, for FID, the detector file, its SHA-256, its layout
and the preprocessing that ran (engine/metrics/inception.py: "nvidia" or "pytorch-fid") — in a `.pkl` under the
top-level key "detectors", in an `.npz` as the string arrays `fid_preprocessing`, `fid_detector_file`,
`fid_detector_sha256`, `fid_detector_layout` (EDM's and EDM2's readers look only at mu / sigma and ignore both).
`check_fid_preprocessing` refuses a FID between features and statistics of different preprocessing, naming
both. Files without the record — EDM's and EDM2's published statistics, and this engine's before it wrote one —
are refused until the user declares their preprocessing (`--stats-preprocessing nvidia` for the published ones,
which NVIDIA's detector computed).

    python -m engine.metrics.reference_stats --data datasets/cifar10-32x32.zip --out refs/cifar10-32x32.pkl \\
        --inception inception-2015-12-05.pt [--fid-preprocessing nvidia] [--dinov2 dinov2_vitl14_pretrain.pth] \\
        [--batch 64]
"""
from __future__ import annotations

import argparse
import io
import os
import pickle

import numpy as np
import torch
from tqdm import tqdm

from engine.checkpoints.files import atomic_write, file_sha256
from engine.checks import positive_int_arg
from engine.errors import EngineError
from engine.metrics.frechet import FeatureStatistics

METRICS = ("fid", "fd_dinov2")


class StatsError(EngineError):
    pass


class _NumpyOnly(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"a statistics file may hold only dicts, numbers and NumPy arrays; it asks for "
                                     f"{module}.{name}")


# A covariance read from a file is symmetric and positive semi-definite up to rounding. Both tolerances are relative
# to the matrix's scale (its largest entry, which for a covariance is its largest variance): far above what float64
# accumulation of Σ fᵀf leaves (relative ~D·ε ≈ 5e-13 for D = 2048), far below any real defect: a transposed block,
# another file's bytes, σ = −I. frechet_distance symmetrises its inputs and clips eigenvalues at rounding level, so
# a defect it cannot see would otherwise give a FID silently.
_SYMMETRY_RTOL = 1e-6
_PSD_RTOL = 1e-6


def _pair(d, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(μ [D], Σ [D, D]) of one metric, checked: finite, Σ symmetric and positive semi-definite."""
    try:
        mu, sigma = np.asarray(d["mu"], dtype=np.float64), np.asarray(d["sigma"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise StatsError(f"{where}: expected 'mu' and 'sigma' as numeric arrays") from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise StatsError(f"{where}: mu {mu.shape} and sigma {sigma.shape} do not form [D] and [D, D]")
    for name, a in (("mu", mu), ("sigma", sigma)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise StatsError(f"{where}: {name} has {bad} non-finite entries (NaN or inf); these are not statistics "
                             f"of any features: recompute them with python -m engine.metrics.reference_stats")
    scale = float(np.abs(sigma).max(initial=0.0))
    asymmetry = float(np.abs(sigma - sigma.T).max(initial=0.0))
    if asymmetry > _SYMMETRY_RTOL * scale:
        raise StatsError(f"{where}: sigma is not symmetric (max |Σ − Σᵀ| = {asymmetry:.3g} against max |Σ| = "
                         f"{scale:.3g}), so it is not a covariance; the file is damaged or holds something else")
    if scale > 0:
        # Σ + tol·I has a Cholesky factor when (up to rounding) every eigenvalue of Σ is > −tol: the PSD test at a
        # fraction of an eigendecomposition's cost; the smallest eigenvalue is computed only to name it.
        try:
            np.linalg.cholesky(sigma + _PSD_RTOL * scale * np.eye(len(sigma)))
        except np.linalg.LinAlgError:
            w = np.linalg.eigvalsh(sigma)
            raise StatsError(f"{where}: sigma is not positive semi-definite (smallest eigenvalue {w[0]:.3g}, largest "
                             f"{w[-1]:.3g}), so it is not a covariance; the file is damaged or holds something "
                             f"else") from None
    return mu, sigma


def _file_kind(head: bytes) -> str:
    """What a file whose first bytes are `head` is, for the messages of load_stats."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "a zip archive"
    if head.startswith(b"\x93NUMPY"):
        return "a single NumPy array (.npy)"
    if head.startswith(b"\x80"):
        return "a pickle"
    if not head:
        return "empty"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "binary data of another format"


def load_stats(path) -> dict:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference statistics {path} not found; compute them with "
                                f"`python -m engine.metrics.reference_stats --data <dataset.zip> --out {path}` or "
                                f"use EDM's / EDM2's published files")
    if os.path.isdir(path):
        raise StatsError(f"reference statistics {path} is a directory; expected an .npz (EDM) or .pkl (EDM2) file")
    with open(path, "rb") as f:
        kind = _file_kind(f.read(8))
    if path.endswith(".npz"):
        # np.load takes anything that is not a zip or .npy for a pickle and answers with advice about allow_pickle
        if kind != "a zip archive":
            raise StatsError(f"{path} is not an .npz archive (a zip of .npy arrays, as np.savez and EDM write): it "
                             f"is {kind}; give EDM's fid-refs .npz or EDM2's dataset-refs .pkl")
        try:
            with np.load(path, allow_pickle=False) as z:
                record = {v: str(z[f"fid_{k}"]) for k, v in _NPZ_RECORD.items() if f"fid_{k}" in z.files}
                return {"num_images": None, "fid": _pair(z, path), "path": path,
                        "detectors": {"fid": record} if record else {}}
        except (ValueError, OSError) as e:
            if isinstance(e, StatsError):
                raise
            raise StatsError(f"{path}: not a readable .npz ({e})") from e
    if kind == "a zip archive":
        raise StatsError(f"{path} is a zip archive, not a statistics pickle: if it is EDM's .npz statistics, name "
                         f"it .npz")
    with open(path, "rb") as f:
        try:
            obj = _NumpyOnly(f).load()
        except Exception as e:
            raise StatsError(f"{path}: not a statistics pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or not any(m in obj for m in METRICS):
        raise StatsError(f"{path}: expected {{num_images, fid: {{mu, sigma}}, fd_dinov2: {{mu, sigma}}}}")
    out = {"num_images": None if obj.get("num_images") is None else int(obj["num_images"]), "path": path}
    for m in METRICS:
        if m in obj:
            out[m] = _pair(obj[m], f"{path}[{m!r}]")
    detectors = obj.get("detectors") or {}
    if not isinstance(detectors, dict) or not all(isinstance(v, dict) for v in detectors.values()):
        raise StatsError(f"{path}: 'detectors' must map each metric to a dict of strings")
    out["detectors"] = {m: {k: str(v) for k, v in d.items()} for m, d in detectors.items()}
    return out


# What an .npz records of the FID detector: array fid_<key> holds the record's entry <value>.
_NPZ_RECORD = {"preprocessing": "preprocessing", "detector_file": "file", "detector_sha256": "sha256",
               "detector_layout": "layout"}


def detector_record(detector) -> dict:
    """What a statistics file keeps of the detector that computed it: preprocessing, file name, SHA-256, layout."""
    d = detector.describe()
    record = {k: str(d[k]) for k in ("preprocessing", "sha256", "layout") if d.get(k)}
    if d.get("file"):
        record["file"] = os.path.basename(d["file"])
    return record


def check_fid_preprocessing(stats: dict, detector, declared: str | None = None) -> str:
    """The preprocessing both sides of a FID share, or StatsError naming both when they differ.

    `declared` is the user's statement of the statistics' preprocessing, needed for files that carry none
    (EDM's / EDM2's published statistics: "nvidia"); it must agree with a recorded one."""
    where = stats.get("path", "the reference statistics")
    ours = detector.preprocessing.name
    recorded = (stats.get("detectors") or {}).get("fid", {}).get("preprocessing")
    if recorded is None and declared is None:
        raise StatsError(
            f"{where} does not say which FID preprocessing computed it (EDM's and EDM2's published statistics, and "
            f"files this engine wrote before it recorded one, do not). Its features must come from the same "
            f"protocol as the detector's ({ours}): if it was computed with NVIDIA's detector — EDM's fid-refs and "
            f"EDM2's dataset-refs were — declare it with --stats-preprocessing nvidia (recipes: "
            f"ENGINE_FID_STATS_PREPROCESSING=nvidia), or recompute it with python -m engine.metrics.reference_stats")
    if recorded is not None and declared is not None and declared != recorded:
        raise StatsError(f"{where} records FID preprocessing {recorded!r}, but {declared!r} was declared for it")
    theirs = recorded or declared
    if theirs != ours:
        made = (stats.get("detectors") or {}).get("fid", {}).get("file")
        raise StatsError(
            f"FID preprocessing differs: the statistics {where} were computed with {theirs!r}"
            f"{f' ({made})' if made else ''}, the detector runs {ours!r} ({detector.describe().get('file', '?')}); "
            f"a Fréchet distance between features of different preprocessing is meaningless. Use "
            f"--fid-preprocessing {theirs} or recompute the statistics with {ours}")
    return ours


def save_stats(path, stats: dict) -> None:
    """Write atomically: `.npz` (FID only, EDM) or `.pkl` (EDM2)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".npz"):
        extra = [m for m in METRICS if m in stats and m != "fid"]
        if "fid" not in stats or extra:
            raise StatsError(f"{path}: an .npz holds FID statistics only (EDM's format); use .pkl for "
                             f"{', '.join(extra) or 'these statistics'}")
        mu, sigma = stats["fid"]
        record = (stats.get("detectors") or {}).get("fid", {})
        extra = {f"fid_{k}": np.array(str(record[v])) for k, v in _NPZ_RECORD.items() if record.get(v) is not None}
        buf = io.BytesIO()
        np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
        atomic_write(path, lambda f: f.write(buf.getvalue()))
        return
    obj = {"num_images": stats.get("num_images")}
    for m in METRICS:
        if m in stats:
            mu, sigma = stats[m]
            obj[m] = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if stats.get("detectors"):
        obj["detectors"] = {m: {k: str(v) for k, v in d.items()} for m, d in stats["detectors"].items()}
    atomic_write(path, lambda f: pickle.dump(obj, f, protocol=4))


def load_detectors(metrics, inception=None, dinov2=None, device="cpu", fid_preprocessing: str = "nvidia") -> dict:
    """{metric: feature network} for the requested metrics, from local weight files (named when missing);
    the Inception detector runs `fid_preprocessing` ("nvidia" or "pytorch-fid")."""
    out = {}
    for m in metrics:
        try:
            if m == "fid":
                from engine.metrics.inception import InceptionV3
                out[m] = InceptionV3.from_file(inception, preprocessing=fid_preprocessing).to(device)
            elif m == "fd_dinov2":
                from engine.metrics.dinov2 import DINOv2
                out[m] = DINOv2.from_file(dinov2).to(device)
            else:
                raise EngineError(f"unknown metric {m!r}; known: {', '.join(METRICS)}")
        except ValueError as e:
            # the detectors' readers (engine/metrics/inception_files.py, dinov2.py) name a wrong file in a plain
            # ValueError: an input error, which the command lines print as one line
            if isinstance(e, EngineError):
                raise
            raise EngineError(str(e)) from None
    return out


@torch.no_grad()
def dataset_stats(dataset, detectors: dict, batch: int = 64, device="cpu", progress: bool = True) -> dict:
    """Statistics over every image of an EDM-format dataset (engine.data.ImageDataset, uint8 CHW)."""
    acc = {m: FeatureStatistics(net.feature_dim) for m, net in detectors.items()}
    for lo in tqdm(range(0, len(dataset), batch), desc="reference features", disable=not progress):
        images = torch.from_numpy(np.stack([dataset[i][0] for i in range(lo, min(lo + batch, len(dataset)))]))
        images = images.to(device)
        for m, net in detectors.items():
            acc[m].update(net(images).cpu())
    out = {"num_images": len(dataset)}
    out.update({m: a.mu_sigma(unbiased=True) for m, a in acc.items()})
    if "fid" in detectors:
        out["detectors"] = {"fid": detector_record(detectors["fid"])}
    return out


def check_stats_out(path: str, metrics) -> None:
    """--out of the reference statistics, checked before any feature is computed: a file in a creatable, writable
    folder, and an .npz only for FID (save_stats writes EDM's .npz, FID only, or EDM2's .pkl)."""
    if os.path.isdir(path):
        raise StatsError(f"--out {path} is a directory; give the statistics file to write, e.g. "
                         f"{os.path.join(path, 'refs.pkl')}")
    if path.endswith(".npz") and list(metrics) != ["fid"]:
        raise StatsError(f"--out {path}: an .npz holds FID statistics only (EDM's format); use .pkl for "
                         f"{', '.join(metrics)}")
    from engine.cli import check_writable_under
    check_writable_under(path, os.path.dirname(os.path.abspath(path)), "the statistics")


def main(argv=None) -> None:
    from engine.data import ImageDataset
    p = argparse.ArgumentParser(description="Reference statistics of a dataset (EDM .npz or EDM2 .pkl)")
    p.add_argument("--data", required=True, help="dataset zip or folder in EDM's format")
    p.add_argument("--out", required=True, help=".pkl (EDM2: FID and FD_DINOv2) or .npz (EDM: FID only)")
    p.add_argument("--metrics", default=None, help="comma list of fid, fd_dinov2 (default: fid, plus "
                                                   "fd_dinov2 for a .pkl)")
    p.add_argument("--inception", default=None, help="inception-2015-12-05.pt / .pkl, or pytorch-fid's .pth")
    p.add_argument("--fid-preprocessing", default="nvidia", choices=["nvidia", "pytorch-fid"],
                   help="the Inception detector's input protocol (default nvidia: what the papers report)")
    p.add_argument("--dinov2", default=None, help="dinov2_vitl14_pretrain.pth")
    p.add_argument("--batch", type=positive_int_arg, default=64)
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    a = p.parse_args(argv)
    from engine.cli import resolve_device
    try:
        a.device = resolve_device(a.device)
    except EngineError as e:
        p.error(str(e))
    metrics = a.metrics.split(",") if a.metrics else (["fid"] if a.out.endswith(".npz") else list(METRICS))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise StatsError(f"--metrics: unknown {', '.join(unknown)}; known: {', '.join(METRICS)}")
    check_stats_out(a.out, metrics)
    if not os.path.exists(a.data):
        raise StatsError(f"--data: {a.data} not found")
    data = ImageDataset(a.data)
    if data.is_latent:
        # Reference statistics are of the real images, as the detectors see them: EDM2's dataset-refs are computed
        # from the image dataset, never from latents (decoding them would add the VAE's reconstruction error).
        raise StatsError(f"--data {a.data} holds {data.num_channels // 2}-channel VAE latents (python -m "
                         f"engine.pipelines.encode_latents), not images; reference statistics are computed from "
                         f"the images: give the image dataset the latents were encoded from")
    detectors = load_detectors(metrics, a.inception, a.dinov2, a.device, a.fid_preprocessing)
    stats = dataset_stats(data, detectors, a.batch, a.device)
    save_stats(a.out, stats)
    fid = f", FID preprocessing {a.fid_preprocessing}" if "fid" in metrics else ""
    print(f"{a.out}: {', '.join(metrics)} over {stats['num_images']} images{fid} (sha256 {file_sha256(a.out)[:16]})")


if __name__ == "__main__":
    from engine.cli import run_main
    run_main(main)
