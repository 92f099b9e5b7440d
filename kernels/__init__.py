"""Pallas kernels behind ``impl="pallas"`` (installed as ``ls_jax.kernels``)."""
