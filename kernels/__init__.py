"""Pallas kernels behind ``impl="pallas"`` (installed as ``ls_jax.kernels``).

``forward`` and ``backward_fn(kind)``: the backend of the logit-statistics seam
(ls_jax/logit_stats.py), wired in ``ls_jax.dispatch``. Forward kernel in ``forward.py``,
backward kernels (dh and dW, or one atomic kernel) in ``backward.py``, the shared tile and
block plan in ``tiles.py``, padding in ``fused.py``.
"""

from .fused import backward_fn, forward

__all__ = ["backward_fn", "forward"]
