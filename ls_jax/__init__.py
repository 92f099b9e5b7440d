"""ls_jax: label-smoothed, memory-efficient cross-entropy for JAX/Flax.

Public losses: :func:`smoothed_cross_entropy` (materialised logits) and
:func:`linear_smoothed_cross_entropy` (fused ``hidden @ W.T``; never holds ``[N, V]``).
"""

from ls_jax.logit_stats import LogitStats
from ls_jax.losses import TokenStats, linear_smoothed_cross_entropy, smoothed_cross_entropy

__all__ = ["LogitStats", "TokenStats", "linear_smoothed_cross_entropy", "smoothed_cross_entropy"]
