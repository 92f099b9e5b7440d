"""Token-level calibration of a causal LM from the fused loss' statistics, without ``[N, V]`` logits."""

from functools import partial

import jax
import jax.numpy as jnp

from ls_jax.calibration.bins import CalibrationBins, bin_statistics
from ls_jax.losses import linear_smoothed_cross_entropy


def token_brier(
    hidden,
    weight,
    labels,
    stats,
    *,
    bias=None,
    ignore_index: int = -100,
    where=None,
    logit_softcap: float | None = None,
    impl: str = "auto",
    blocks=None,
) -> jax.Array:
    """Exact multi-class Brier score per token, ``sum_v p_v^2 - 2 p_label + 1``, from one more fused pass.

    ``sum_v p_v^2 = exp(lse(2z) - 2 lse(z))``, and ``2z`` is the same problem with hidden and bias
    doubled and the softcap doubled (``2c tanh(x / c) = 2c tanh(2x / 2c)``).

    Args:
      hidden: float ``[..., D]``, the final hidden states.
      weight: float ``[V, D]``, the output projection.
      labels: int ``[...]`` aligned with ``hidden``: the token each position predicts
        (``ignore_index`` for prompt / padding tokens).
      stats: the :class:`ls_jax.losses.TokenStats` ``[...]`` of the same (unsmoothed) problem.
      bias: optional float ``[V]``.
      ignore_index: the label of tokens not counted.
      where: optional bool ``[...]``, False for tokens not counted.
      logit_softcap: optional softcap ``c`` of the logits (``c tanh(z / c)``).
      impl, blocks: the implementation and block sizes, as in
        :func:`ls_jax.losses.linear_smoothed_cross_entropy`.

    Returns:
      float32 ``[...]``, the Brier score of each token (0 on tokens not counted).

    Raises:
      ValueError, TypeError: what :func:`ls_jax.losses.linear_smoothed_cross_entropy` raises for
        mismatched shapes, an unknown ``impl`` or bad ``blocks``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from ls_jax import calibration
      >>> from ls_jax.losses import linear_smoothed_cross_entropy
      >>> hidden = jax.random.normal(jax.random.key(0), (2, 3, 8))
      >>> weight = jax.random.normal(jax.random.key(1), (16, 8))
      >>> labels = jnp.array([[1, 5, -100], [3, 3, 7]])
      >>> _, stats = linear_smoothed_cross_entropy(hidden, weight, labels, reduction="none", return_stats=True)
      >>> brier = calibration.token_brier(hidden, weight, labels, stats)
      >>> logits = jnp.einsum("btd,vd->btv", hidden, weight)
      >>> dense = calibration.brier_score(logits[0, :1], labels[0, :1], from_logits=True)
      >>> print(brier.shape, abs(float(brier[0, 0]) - float(dense)) < 1e-5, float(brier[0, 2]))
      (2, 3) True 0.0
    """
    _, doubled = linear_smoothed_cross_entropy(
        2 * jnp.asarray(hidden),
        weight,
        labels,
        bias=None if bias is None else 2 * jnp.asarray(bias),
        logit_softcap=None if logit_softcap is None else 2 * logit_softcap,
        ignore_index=ignore_index,
        where=where,
        reduction="none",
        impl=impl,
        blocks=blocks,
        return_stats=True,
    )
    return jnp.exp(doubled.lse - 2 * stats.lse) - 2 * jnp.exp(stats.target_logprob) + 1


def token_bins(stats, labels, *, n_bins: int = 15, brier=None) -> CalibrationBins:
    """Equal-width :class:`CalibrationBins` of next-token predictions from their statistics.

    Confidence ``exp(max_logit - lse)``, correct ``prediction == label``, NLL ``-target_logprob``
    (unsmoothed, whatever the loss' smoothing), over the tokens ``stats.valid`` counts.

    Args:
      stats: :class:`ls_jax.losses.TokenStats` ``[...]`` (``return_stats=True`` of the fused loss).
      labels: int ``[...]``, the labels the statistics were made with.
      n_bins: number of bins.
      brier: optional float ``[...]`` from :func:`token_brier` (None: the bins carry NaN).

    Returns:
      :class:`CalibrationBins`, ``[n_bins + 1]`` per field.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from ls_jax import calibration
      >>> from ls_jax.losses import linear_smoothed_cross_entropy
      >>> hidden = jax.random.normal(jax.random.key(0), (2, 3, 8))
      >>> weight = jax.random.normal(jax.random.key(1), (16, 8))
      >>> labels = jnp.array([[1, 5, -100], [3, 3, 7]])
      >>> _, stats = linear_smoothed_cross_entropy(hidden, weight, labels, reduction="none", return_stats=True)
      >>> bins = calibration.token_bins(stats, labels, n_bins=5)
      >>> print(int(bins.count.sum()), abs(float(bins.nll_sum + stats.target_logprob.sum())) < 1e-5)
      5 True
    """
    correct = stats.prediction == jnp.asarray(labels)
    return bin_statistics(
        stats.confidence, correct, n_bins=n_bins, where=stats.valid, nll=-stats.target_logprob, brier=brier
    )


@partial(jax.jit, static_argnames=("n_bins", "ignore_index", "logit_softcap", "impl", "blocks", "with_brier"))
def token_calibration(
    hidden,
    weight,
    labels,
    *,
    n_bins: int = 15,
    bias=None,
    ignore_index: int = -100,
    where=None,
    logit_softcap: float | None = None,
    impl: str = "auto",
    blocks=None,
    with_brier: bool = True,
) -> CalibrationBins:
    """Equal-width :class:`CalibrationBins` of next-token predictions, without ``[N, V]`` logits.

    One pass of :func:`ls_jax.losses.linear_smoothed_cross_entropy` and, with ``with_brier``, one
    more for the exact Brier score (:func:`token_brier`). Merge the bins of successive batches
    (:meth:`CalibrationBins.merge`), then :meth:`CalibrationReport.from_bins`.

    Args:
      hidden: float ``[..., D]``, the final hidden states.
      weight: float ``[V, D]``, the output projection.
      labels: int ``[...]`` aligned with ``hidden``: the token each position predicts
        (``ignore_index`` for prompt / padding tokens).
      n_bins: number of bins (static).
      bias: optional float ``[V]``.
      ignore_index: the label of tokens not counted.
      where: optional bool ``[...]``, False for tokens not counted.
      logit_softcap: optional softcap ``c`` of the logits (``c tanh(z / c)``).
      impl, blocks: the implementation and block sizes, as in
        :func:`ls_jax.losses.linear_smoothed_cross_entropy`.
      with_brier: whether to compute the Brier score (one more fused pass) (static).

    Returns:
      :class:`CalibrationBins`, ``[n_bins + 1]`` per field.

    Raises:
      ValueError, TypeError: what :func:`ls_jax.losses.linear_smoothed_cross_entropy` raises for
        mismatched shapes, an unknown ``impl`` or bad ``blocks``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from ls_jax import calibration
      >>> from ls_jax.losses import linear_smoothed_cross_entropy
      >>> hidden = jax.random.normal(jax.random.key(0), (2, 3, 8))
      >>> weight = jax.random.normal(jax.random.key(1), (16, 8))
      >>> labels = jnp.array([[1, 5, -100], [3, 3, 7]])
      >>> report = calibration.CalibrationReport.from_bins(calibration.token_calibration(hidden, weight, labels))
      >>> logits = jnp.einsum("btd,vd->btv", hidden, weight).reshape(6, 16)
      >>> dense = calibration.calibration_report(logits, labels.reshape(6).clip(0), from_logits=True,
      ...                                        where=labels.reshape(6) != -100)
      >>> print(report.count, abs(report.ece - dense.ece) < 1e-5, abs(report.brier - dense.brier) < 1e-5)
      5 True True
    """
    common = dict(
        bias=bias, ignore_index=ignore_index, where=where, logit_softcap=logit_softcap, impl=impl, blocks=blocks
    )
    _, stats = linear_smoothed_cross_entropy(hidden, weight, labels, reduction="none", return_stats=True, **common)
    brier = token_brier(hidden, weight, labels, stats, **common) if with_brier else None
    return token_bins(stats, labels, n_bins=n_bins, brier=brier)
