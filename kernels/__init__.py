"""Pallas kernels behind ``impl="pallas"`` (installed as ``ls_jax.kernels``).

``pallas_logit_stats(hidden, weight, bias, ...)`` -> :class:`ls_jax.logit_stats.LogitStats`:
forward kernel in ``forward.py``, backward (dh and dW kernels) in ``backward.py``, shared tile
and block plan in ``tiles.py``, custom_vjp wiring and padding in ``fused.py``.
"""

from .fused import pallas_logit_stats

__all__ = ["pallas_logit_stats"]
