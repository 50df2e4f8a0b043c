"""Benchmarks and PyTorch references for line_jax (not imported by the library)."""
