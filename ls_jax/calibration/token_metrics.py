"""Token-level calibration of a causal LM from the fused loss' statistics, without ``[N, V]`` logits."""

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from ls_jax.calibration.bins import CalibrationBins, bin_statistics
from ls_jax.losses import linear_smoothed_cross_entropy


def token_brier(hidden, weight, labels, stats, *, bias=None, ignore_index: int = -100, where=None,
                logit_softcap: Optional[float] = None, impl: str = "auto", blocks=None) -> jax.Array:
    """Exact multi-class Brier score per token ``sum_v p_v^2 - 2 p_label + 1`` ``[...]`` float32,
    given the :class:`ls_jax.losses.TokenStats` of the same (unsmoothed) problem, from one more
    fused pass: ``sum_v p_v^2 = exp(lse(2z) - 2 lse(z))``, and ``2z`` is the same problem with
    hidden and bias doubled and the softcap doubled (``2c tanh(x / c) = 2c tanh(2x / 2c)``)."""
    _, doubled = linear_smoothed_cross_entropy(
        2 * jnp.asarray(hidden), weight, labels, bias=None if bias is None else 2 * jnp.asarray(bias),
        logit_softcap=None if logit_softcap is None else 2 * logit_softcap, ignore_index=ignore_index,
        where=where, reduction="none", impl=impl, blocks=blocks, return_stats=True)
    return jnp.exp(doubled.lse - 2 * stats.lse) - 2 * jnp.exp(stats.target_logprob) + 1


def token_bins(stats, labels, *, n_bins: int = 15, brier=None) -> CalibrationBins:
    """Equal-width :class:`CalibrationBins` of next-token predictions from their
    :class:`ls_jax.losses.TokenStats` ``[...]``: confidence ``exp(max_logit - lse)``, correct
    ``prediction == label``, NLL ``-target_logprob`` (unsmoothed, whatever the loss' smoothing);
    ``brier`` from :func:`token_brier` or None."""
    correct = stats.prediction == jnp.asarray(labels)
    return bin_statistics(stats.confidence, correct, n_bins=n_bins, where=stats.valid,
                          nll=-stats.target_logprob, brier=brier)


@partial(jax.jit, static_argnames=("n_bins", "ignore_index", "logit_softcap", "impl", "blocks", "with_brier"))
def token_calibration(hidden, weight, labels, *, n_bins: int = 15, bias=None, ignore_index: int = -100,
                      where=None, logit_softcap: Optional[float] = None, impl: str = "auto",
                      blocks=None, with_brier: bool = True) -> CalibrationBins:
    """Equal-width :class:`CalibrationBins` of next-token predictions, without ``[N, V]`` logits.

    hidden [..., D], weight [V, D], labels [...] aligned with hidden (the token each position
    predicts; ``ignore_index`` or ``where=False`` for prompt / padding tokens): one pass of
    :func:`ls_jax.losses.linear_smoothed_cross_entropy` (``impl``, ``blocks`` as there) and, with
    ``with_brier``, one more for the exact Brier score (:func:`token_brier`). Merge the bins of
    successive batches, then :meth:`CalibrationReport.from_bins`.
    """
    common = dict(bias=bias, ignore_index=ignore_index, where=where, logit_softcap=logit_softcap, impl=impl,
                  blocks=blocks)
    _, stats = linear_smoothed_cross_entropy(hidden, weight, labels, reduction="none", return_stats=True, **common)
    brier = token_brier(hidden, weight, labels, stats, **common) if with_brier else None
    return token_bins(stats, labels, n_bins=n_bins, brier=brier)
