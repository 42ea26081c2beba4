"""The GPU stage service: the remaining layers, the heads and the losses (CUDA when present)."""
