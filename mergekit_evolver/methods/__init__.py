"""Tensor-level merge methods registered with mergekit: pure math, no I/O."""
