"""Triton fast paths: the fused multistep DPM-Solver++ update (`dpm_solver.py`) and the fused EDM / consistency
preconditioning (`precond.py`), each with its PyTorch reference beside it and registered as `torch.library` ops.
`engine/ops.py` is the one dispatch point that chooses between kernel and reference; `runtime.py` launches a
kernel compiled on CUDA tensors and in Triton's interpreter on CPU tensors. Nothing here needs a GPU or even
Triton: without Triton the references are used."""

if __name__ == "kernels":
    # Found as a top-level `kernels` because the repository root is on sys.path (`python -m` or `python -c` from
    # the checkout). This folder installs as engine.kernels (setup.py), and the name `kernels` belongs to Hugging
    # Face's package, which transformers and diffusers import: hand the name over to whatever else provides it,
    # or to nothing, so the checkout shadows no one (tests/test_packaging.py).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here])
    del sys.modules["kernels"]
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ is engine.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)

