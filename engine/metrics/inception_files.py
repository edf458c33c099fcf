"""The files the FID Inception detector comes in, read into `engine.metrics.inception.InceptionV3`'s tensor names
without running any code they carry.

Layouts (all hold TensorFlow's `inception-2015-12-05` weights; docs/spec/cm.md §7, docs/spec/edm2_latent.md §5.1):

  * `inception-2015-12-05.pt` — NVIDIA's TorchScript archive (StyleGAN2-ADA, ECT, CMT). Its tensors are read by
    name (`layers.<unit>.{weight, beta, mean, var}` per conv + batch-norm unit — TF's batch norm has no scale —
    and `output.{weight, bias}`); its scripted forward is never called.
  * `inception-2015-12-05.pkl` — the same network as a `torch_utils.persistence` pickle (EDM `fid.py`, EDM2).
    Read with the restricted unpickler of engine/checkpoints/unpickler.py (docs/spec/edm2_latent.md §2.5): persistent
    objects
    become passive records and `module_src` is kept as text, never executed. The tensors are taken from the
    record tree under NVIDIA's names, or from a TorchScript archive the pickle carries as bytes.
  * `pt_inception-2015-12-05-6726825d.pth` — pytorch-fid's state dict in torchvision's names
    (`Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, …, `fc.weight`). torchvision's
    batch norm has a scale γ: y = γ(c − m)/√(v + ε) + β. Our unit computes (c′ − m′)/√(v + ε) + β, so γ is
    folded into both the conv weight and the running mean: c′ = γc (weight γW), m′ = γm — exact for any sign
    of γ (an earlier version scaled the weight only, which is wrong whenever γ ≠ 1 and m ≠ 0).

When a file carries code (the TorchScript archive's `code/` folder, a pickle's `module_src`), the preprocessing
its own forward performs is read out of that text (`preprocessing_in_code`) and a file that preprocesses
differently from NVIDIA's detector — resize mode, padding, alignment, size or the (x − offset)/scale
constants — is refused with both named: its tensors are then not those of the detector the engine
implements. Code the reader cannot find the preprocessing in is recorded as unchecked, not refused.
"""
from __future__ import annotations

import io
import os
import re
import zipfile
from dataclasses import dataclass, field

import torch

from engine.checkpoints.files import CheckpointError, file_sha256, read_state_dict_file
from engine.checkpoints.unpickler import ContainerRecord, PersistentRecord, flatten, unpickle_file
from engine.metrics.fid_preprocessing import NVIDIA

__all__ = ["DETECTOR_FILES", "InceptionFile", "read_inception_file", "from_pytorch_fid", "PYTORCH_FID_NAMES",
           "preprocessing_in_code", "check_preprocessing_code"]

DETECTOR_FILES = ("inception-2015-12-05.pt", "inception-2015-12-05.pkl", "pt_inception-2015-12-05-6726825d.pth")


# ---------------------------------------------------------------------------------------------------------
# pytorch-fid's names

def _pytorch_fid_names() -> dict[str, str]:
    """pytorch-fid / torchvision name of each of our conv units (prefix of .conv.weight, .bn.*)."""
    m = {"layers.conv": "Conv2d_1a_3x3", "layers.conv_1": "Conv2d_2a_3x3", "layers.conv_2": "Conv2d_2b_3x3",
         "layers.conv_3": "Conv2d_3b_1x1", "layers.conv_4": "Conv2d_4a_3x3"}
    for ours, tv in (("mixed", "Mixed_5b"), ("mixed_1", "Mixed_5c"), ("mixed_2", "Mixed_5d")):
        m.update({f"layers.{ours}.conv": f"{tv}.branch1x1", f"layers.{ours}.tower.conv": f"{tv}.branch5x5_1",
                  f"layers.{ours}.tower.conv_1": f"{tv}.branch5x5_2",
                  f"layers.{ours}.tower_1.conv": f"{tv}.branch3x3dbl_1",
                  f"layers.{ours}.tower_1.conv_1": f"{tv}.branch3x3dbl_2",
                  f"layers.{ours}.tower_1.conv_2": f"{tv}.branch3x3dbl_3",
                  f"layers.{ours}.tower_2.conv": f"{tv}.branch_pool"})
    m.update({"layers.mixed_3.conv": "Mixed_6a.branch3x3", "layers.mixed_3.tower.conv": "Mixed_6a.branch3x3dbl_1",
              "layers.mixed_3.tower.conv_1": "Mixed_6a.branch3x3dbl_2",
              "layers.mixed_3.tower.conv_2": "Mixed_6a.branch3x3dbl_3"})
    for ours, tv in (("mixed_4", "Mixed_6b"), ("mixed_5", "Mixed_6c"), ("mixed_6", "Mixed_6d"),
                     ("mixed_7", "Mixed_6e")):
        m.update({f"layers.{ours}.conv": f"{tv}.branch1x1", f"layers.{ours}.tower_2.conv": f"{tv}.branch_pool"})
        for i in range(3):
            m[f"layers.{ours}.tower.conv{'' if i == 0 else f'_{i}'}"] = f"{tv}.branch7x7_{i + 1}"
        for i in range(5):
            m[f"layers.{ours}.tower_1.conv{'' if i == 0 else f'_{i}'}"] = f"{tv}.branch7x7dbl_{i + 1}"
    m.update({"layers.mixed_8.tower.conv": "Mixed_7a.branch3x3_1", "layers.mixed_8.tower.conv_1": "Mixed_7a.branch3x3_2",
              "layers.mixed_8.tower_1.conv": "Mixed_7a.branch7x7x3_1",
              "layers.mixed_8.tower_1.conv_1": "Mixed_7a.branch7x7x3_2",
              "layers.mixed_8.tower_1.conv_2": "Mixed_7a.branch7x7x3_3",
              "layers.mixed_8.tower_1.conv_3": "Mixed_7a.branch7x7x3_4"})
    for ours, tv in (("mixed_9", "Mixed_7b"), ("mixed_10", "Mixed_7c")):
        m.update({f"layers.{ours}.conv": f"{tv}.branch1x1", f"layers.{ours}.tower_conv": f"{tv}.branch3x3_1",
                  f"layers.{ours}.tower_mixed_conv": f"{tv}.branch3x3_2a",
                  f"layers.{ours}.tower_mixed_conv_1": f"{tv}.branch3x3_2b",
                  f"layers.{ours}.tower_1_conv": f"{tv}.branch3x3dbl_1",
                  f"layers.{ours}.tower_1_conv_1": f"{tv}.branch3x3dbl_2",
                  f"layers.{ours}.tower_1_mixed_conv": f"{tv}.branch3x3dbl_3a",
                  f"layers.{ours}.tower_1_mixed_conv_1": f"{tv}.branch3x3dbl_3b",
                  f"layers.{ours}.tower_2_conv": f"{tv}.branch_pool"})
    return m


PYTORCH_FID_NAMES = _pytorch_fid_names()


def from_pytorch_fid(state: dict) -> dict[str, torch.Tensor]:
    """pytorch-fid's FID Inception state dict → ours, batch-norm scale γ folded into weight and mean (module
    docstring). The products are formed in float64 and rounded once to float32."""
    out, missing = {}, []
    for ours, tv in PYTORCH_FID_NAMES.items():
        try:
            w, mean = state[f"{tv}.conv.weight"], state[f"{tv}.bn.running_mean"]
            out[f"{ours}.beta"] = state[f"{tv}.bn.bias"]
            out[f"{ours}.var"] = state[f"{tv}.bn.running_var"]
        except KeyError as e:
            missing.append(str(e))
            continue
        gamma = state.get(f"{tv}.bn.weight")
        if gamma is not None:
            g = gamma.double()
            w = (w.double() * g.reshape(-1, 1, 1, 1)).float()
            mean = (mean.double() * g).float()
        out[f"{ours}.weight"], out[f"{ours}.mean"] = w, mean
    if "fc.weight" not in state or "fc.bias" not in state:
        missing.append("fc.weight / fc.bias")
    if missing:
        raise ValueError(f"not pytorch-fid's Inception state dict: missing {', '.join(missing[:5])}"
                         f"{' …' if len(missing) > 5 else ''}")
    out["output.weight"], out["output.bias"] = state["fc.weight"], state["fc.bias"]
    if out["output.weight"].shape != (1008, 2048):
        raise ValueError(f"fc.weight is {tuple(out['output.weight'].shape)}, the FID Inception's is (1008, 2048) "
                         f"(torchvision's ImageNet Inception has 1000 classes and different weights)")
    return out


# ---------------------------------------------------------------------------------------------------------
# The preprocessing a detector's own code performs, read from its text

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")
# torch's grid_sampler enums (aten::grid_sampler, what a traced F.grid_sample records)
_MODES = {0: "bilinear", 1: "nearest", 2: "bicubic"}
_PADDINGS = {0: "zeros", 1: "border", 2: "reflection"}
EXPECTED_CODE = {"mode": "bilinear", "padding_mode": "border", "align_corners": False, "size": (299, 299),
                 "offset": NVIDIA.offset, "scale": NVIDIA.scale}


def _call_args(text: str, open_at: int) -> tuple[list[str], int]:
    """The top-level arguments (stripped) of the call whose '(' is at text[open_at], and the index past ')'."""
    depth, start, args, quote = 0, open_at + 1, [], None
    for i in range(open_at, len(text)):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                last = text[start:i].strip()
                return args + ([last] if last else []), i + 1
        elif ch == "," and depth == 1:
            args.append(text[start:i].strip())
            start = i + 1
    raise ValueError("unbalanced parentheses")


def _bind(args: list[str], names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for i, a in enumerate(args):
        m = re.match(r"(\w+)\s*=(?!=)\s*(.*)$", a, re.S)
        if m:
            out[m.group(1)] = m.group(2).strip()
        elif i < len(names):
            out[names[i]] = a
    return out


def _literal(text: str | None):
    """A Python/TorchScript literal as a value: 'x' → str, True/False, numbers; anything else → None."""
    if text is None:
        return None
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text in ("True", "False"):
        return text == "True"
    if _NUMBER.match(text):
        return float(text)
    return None


def _calls(text: str, names: str):
    """(start, args, end) of each call of a function whose name matches `names`; definitions are skipped."""
    # qualifier: "torch." / "x0." / "." (a method on a call's result, `x.sub_(128).div_(128)`) or none
    for m in re.finditer(rf"(?<!\w)((?:\w+\.)*|\.)({names})\s*\(", text):
        if re.search(r"\bdef\s+$", text[max(0, m.start() - 8):m.start()]):
            continue
        try:
            args, end = _call_args(text, m.end() - 1)
        except ValueError:
            continue
        yield m.start(), m.group(1), args, end


def preprocessing_in_code(text: str) -> dict | None:
    """What the first literal `grid_sample` call of `text` and the arithmetic after it do: {mode, padding_mode,
    align_corners, size, offset, scale} (entries it cannot read are absent), or None without such a call."""
    aliases = re.findall(r"(\w+)\s*=\s*(?:__torch__\.)?torch\.nn\.functional\.grid_sample\b", text)
    sample_names = "|".join(["grid_sample", "grid_sampler", *map(re.escape, aliases)])
    found, after = None, None
    for _, _, args, end in _calls(text, sample_names):
        b = _bind(args, ("input", "grid", "mode", "padding_mode", "align_corners"))
        mode, padding, align = (_literal(b.get(k)) for k in ("mode", "padding_mode", "align_corners"))
        if isinstance(mode, float):       # aten::grid_sampler(input, grid, int mode, int padding, align)
            mode, padding = _MODES.get(int(mode)), _PADDINGS.get(int(padding)) if isinstance(padding, float) else None
        if isinstance(mode, str) and isinstance(padding, str) and isinstance(align, bool):
            found, after = {"mode": mode, "padding_mode": padding, "align_corners": align}, end
            break
    if found is None:
        return None
    grid_aliases = re.findall(r"(\w+)\s*=\s*(?:__torch__\.)?torch\.nn\.functional\.affine_grid\b", text)
    for _, _, args, _ in _calls(text, "|".join(["affine_grid", "affine_grid_generator", *grid_aliases])):
        size = _bind(args, ("theta", "size", "align_corners")).get("size", "")
        dims = re.findall(r"[\w.]+", size.strip("[]()"))
        if len(dims) == 4 and all(_NUMBER.match(d) for d in dims[2:]):
            found["size"] = (int(float(dims[2])), int(float(dims[3])))
            break
    # The arithmetic right after the resize: (x − offset)/scale, written as calls (torch.sub_(x, 128), x.div_(128),
    # torch.mul(x, c)) or as Python operators in a pickle's module_src.
    rest = text[after:]
    ops = []
    for start, qual, args, _ in _calls(rest, r"sub_?|add_?|div_?|true_divide|mul_?"):
        name = re.match(r"(?:\w+\.)*\.?(\w+?)_?\s*\(", rest[start:]).group(1)
        function_form = qual in ("torch.", "")   # torch.sub(x, c) / sub(x, c), else a method: x.sub(c)
        value = _literal(args[1] if function_form and len(args) > 1 else args[0] if args else None)
        if isinstance(value, float):
            alpha = _literal(args[2]) if function_form and len(args) > 2 else None
            ops.append((start, name, value * (alpha if isinstance(alpha, float) else 1.0)))
    for m in re.finditer(r"[\w)\]]\s*([-+*/])\s*(\d+\.?\d*|\.\d+)(?![\w.])", rest):
        ops.append((m.start(1), {"-": "sub", "+": "add", "*": "mul", "/": "div"}[m.group(1)], float(m.group(2))))
    ops.sort()
    for _, name, value in ops:
        if "offset" not in found and name in ("sub", "add"):
            found["offset"] = value if name == "sub" else -value
        elif "scale" not in found and name in ("div", "true_divide", "mul"):
            found["scale"] = value if name != "mul" else 1.0 / value
    return found


def _describe(p: dict) -> str:
    size = "x".join(map(str, p["size"])) if "size" in p else "?"
    resize = (f"grid_sample({p.get('mode', '?')}, {p.get('padding_mode', '?')}, "
              f"align_corners={p.get('align_corners', '?')}) to {size}")
    off, sc = p.get("offset"), p.get("scale")
    return f"{resize}, then (x - {'?' if off is None else f'{off:g}'}) / {'?' if sc is None else f'{sc:g}'}"


def check_preprocessing_code(texts: dict[str, str], source: str) -> str:
    """Check the preprocessing in a detector file's code against NVIDIA's; ValueError naming both when it
    differs. Returns what was established, for the detector's record."""
    for where, text in texts.items():
        found = preprocessing_in_code(text)
        if found is None:
            continue
        wrong = [k for k, v in EXPECTED_CODE.items() if k in found and found[k] != v]
        if wrong:
            raise ValueError(
                f"{source}: its own forward ({where}) preprocesses as {_describe(found)}; the engine implements "
                f"NVIDIA's detector: {_describe(EXPECTED_CODE)} (differs in {', '.join(wrong)}). This is not "
                f"NVIDIA's inception-2015-12-05 detector, or it was modified; its tensors are not loaded")
        missing = [k for k in EXPECTED_CODE if k not in found]
        if missing:
            return f"partly checked: NVIDIA's {', '.join(k for k in EXPECTED_CODE if k in found)} found in " \
                   f"{where}; {', '.join(missing)} not found"
        return f"checked: {where} computes NVIDIA's preprocessing"
    return "unchecked: no literal grid_sample call in the file's code"


# ---------------------------------------------------------------------------------------------------------
# The layouts

@dataclass
class InceptionFile:
    """The detector's tensors in our names, and what the file was."""
    file: str
    layout: str
    state: dict[str, torch.Tensor]
    code_check: str
    sha256: str = field(default="")

    def record(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "layout": self.layout, "code_check": self.code_check}


def _torchscript_code(z: zipfile.ZipFile) -> dict[str, str]:
    return {n: z.read(n).decode("utf-8", "replace") for n in sorted(z.namelist())
            if "/code/" in f"/{n}" and n.endswith(".py")}


def _is_torchscript(z: zipfile.ZipFile) -> bool:
    return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def _forward_code(module) -> str:
    """The top module's TorchScript code with its tensor constants (`CONSTANTS.c0`, what tracing stores for
    Python numbers) written as numbers."""
    code, constants = module.code_with_constants
    values = getattr(constants, "const_mapping", {})

    def number(m):
        v = values.get(m.group(1))
        return repr(float(v)) if isinstance(v, torch.Tensor) and v.numel() == 1 else m.group(0)

    return re.sub(r"CONSTANTS\.(\w+)", number, code)


def _read_torchscript(f, source: str) -> tuple[dict, str]:
    """Tensors and code check of a TorchScript archive (a path or a file object): `torch.jit.load` reads its
    parameters and buffers and the code of its forward, which is checked (as printed by this torch, then as
    stored in the archive's code/ folder) and never called."""
    with zipfile.ZipFile(f) as z:
        stored = _torchscript_code(z)
    if hasattr(f, "seek"):
        f.seek(0)
    module = torch.jit.load(f, map_location="cpu")
    check = check_preprocessing_code({"the TorchScript forward": _forward_code(module), **stored}, source)
    return {k: v.detach().float() for k, v in module.state_dict().items()}, check


def _read_nvidia_pickle(path: str) -> tuple[dict, str, str]:
    """(state, layout, code check) of NVIDIA's persistent-class pickle, read without executing anything."""
    try:
        obj = unpickle_file(path)
    except CheckpointError as e:
        raise ValueError(f"{path}: not NVIDIA's inception-2015-12-05.pkl ({e})") from None
    records, blobs, found = [], [], []

    def walk(o, depth=0):
        if depth > 64:
            return
        if isinstance(o, (PersistentRecord, ContainerRecord)):
            records.append(o)
            found.append(getattr(o, "class_name", type(o).__name__))
            o = getattr(o, "state", {})
        if isinstance(o, (bytes, bytearray)) and o[:2] == b"PK":
            blobs.append(bytes(o))
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v, depth + 1)

    walk(obj)
    for blob in blobs:   # a TorchScript archive carried as bytes inside the pickle
        if zipfile.is_zipfile(io.BytesIO(blob)) and _is_torchscript(zipfile.ZipFile(io.BytesIO(blob))):
            state, check = _read_torchscript(io.BytesIO(blob), f"{path} (embedded TorchScript)")
            return state, "nvidia-pickle (embedded TorchScript)", check
    code: dict[str, str] = {}   # each distinct module_src once, named after the first (outermost) class using it
    for r in records:
        if isinstance(r, PersistentRecord) and isinstance(r.module_src, str) and r.module_src not in code.values():
            code[f"module_src of {r.class_name}"] = r.module_src
    for top in records:
        if not isinstance(getattr(top, "state", None), dict) or "_modules" not in top.state:
            continue
        flat: dict[str, torch.Tensor] = {}
        try:
            flatten(top, "", flat)
        except CheckpointError:
            continue
        prefixes = sorted((k[:-len("layers.conv.weight")] for k in flat if k.endswith("layers.conv.weight")), key=len)
        if prefixes:
            p = prefixes[0]
            state = {k[len(p):]: v.float() for k, v in flat.items() if k.startswith(p)}
            return state, "nvidia-pickle", check_preprocessing_code(code, path)
    raise ValueError(f"{path}: a pickle, but not NVIDIA's inception-2015-12-05.pkl: no network with the detector's "
                     f"tensors (layers.conv.weight, …) and no TorchScript archive inside; it holds "
                     f"{', '.join(dict.fromkeys(found)) or type(obj).__name__}")


def read_inception_file(path) -> InceptionFile:
    """The detector's tensors from any of the three layouts, in our names, and, where the file has code, its
    preprocessing checked against NVIDIA's (module docstring). The names and shapes are checked against the
    architecture by engine/metrics/inception.py."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory; expected the detector file ({' or '.join(DETECTOR_FILES)})")
    with open(path, "rb") as f:
        head = f.read(4)
    # By the first bytes, not zipfile.is_zipfile: that finds the end record of a zip a pickle carries inside it.
    if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = _is_torchscript(z)
        if scripted:
            state, check = _read_torchscript(path, path)
            layout = "nvidia-torchscript"
        else:
            state = read_state_dict_file(path)
            layout = "pytorch-fid" if "Conv2d_1a_3x3.conv.weight" in state else "state-dict"
            state = from_pytorch_fid(state) if layout == "pytorch-fid" else state
            check = "no code in this layout"
    else:
        if not head or head[0] != 0x80:
            raise ValueError(f"{path}: not a PyTorch file or pickle; expected {' or '.join(DETECTOR_FILES)}")
        state, layout, check = _read_nvidia_pickle(path)
    return InceptionFile(file=path, layout=layout, state=state, code_check=check, sha256=file_sha256(path))
