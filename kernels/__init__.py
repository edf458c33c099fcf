"""Triton fast paths: the fused multistep DPM-Solver++ update (`dpm_solver.py`) and the fused EDM / consistency
preconditioning (`precond.py`), each with its PyTorch reference beside it and registered as `torch.library` ops.
`engine/ops.py` is the one dispatch point that chooses between kernel and reference; `runtime.py` launches a
kernel compiled on CUDA tensors and in Triton's interpreter on CPU tensors. Nothing here needs a GPU or even
Triton: without Triton the references are used."""
