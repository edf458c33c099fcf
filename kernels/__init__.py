"""Triton fast paths. Each kernel sits behind the dispatch point in `engine/` with its PyTorch reference
beside it; nothing here is required on a CPU-only machine."""
