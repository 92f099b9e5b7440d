"""Public losses: label-smoothed cross-entropy on logits, and fused on ``hidden @ W.T``.

Per token (DESIGN.md, "The math"), with target distribution t and smoothing a over V classes,
q = (1 - a) t + a / V and

    loss = (sum_v q_v) lse - sum_v q_v z_v + z_loss lse^2
         = ((1 - a) |t| + a) lse - (1 - a) sum_k w_k z_{i_k} - (a / V) sum_v z_v + z_loss lse^2

where |t| = sum_k w_k (1 for hard labels). Only lse (and, with a softcap, sum_v z_v) needs a
pass over the vocabulary: that is the implementation's job (ls_jax/logit_stats.py). The
target logits are a gather, and without a softcap sum_v z_v = h . sum_v W_v + sum_v b_v.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ls_jax.logit_stats import LogitStats, apply_softcap, reference_logit_stats, stats_from_logits
from ls_jax.targets import Labels, check_arrays, check_options, dense_targets, sparse_targets

IMPLS = ("auto", "reference", "xla", "pallas")


class TokenStats(NamedTuple):
    """Per-token side outputs, each shaped like the labels' batch dims ``[...]``.

    lse: float32 log-sum-exp of the (capped) logits. max_logit: float32, no gradient.
    prediction: int32 argmax class. valid: bool, the tokens that count in the loss.
    The top-class probability is :attr:`confidence`.
    """

    lse: jax.Array
    max_logit: jax.Array
    prediction: jax.Array
    valid: jax.Array

    @property
    def confidence(self) -> jax.Array:
        """float32 top-class probability ``exp(max_logit - lse)`` per token."""
        return jnp.exp(self.max_logit - self.lse)


def _weighted_sum(weights, z):
    """``sum_k weights[n, k] * z[n, k]`` over the last axis, a zero weight counting 0 even on a
    -inf logit (a padding entry, or a class masked out by a -inf bias; not NaN)."""
    return (weights * jnp.where((weights == 0) & jnp.isinf(z), 0.0, z)).sum(-1)


def _combine(stats: LogitStats, logit_sum, target_dot, target_mass, valid, out_of_range,
             batch_shape, num_classes, label_smoothing, z_loss, reduction, return_stats):
    """Per-token loss [N] from its parts, masked, reduced; optionally with TokenStats."""
    a = label_smoothing
    loss = ((1.0 - a) * target_mass + a) * stats.lse - (1.0 - a) * target_dot
    if a > 0:
        loss = loss - (a / num_classes) * logit_sum
    if z_loss > 0:
        loss = loss + z_loss * jnp.square(stats.lse)
    loss = jnp.where(valid, loss, 0.0)
    loss = jnp.where(out_of_range, jnp.nan, loss)
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.sum() / jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    if not return_stats:
        return loss
    side = TokenStats(stats.lse, stats.max_logit, stats.argmax, valid)
    return loss, TokenStats(*(x.reshape(batch_shape) for x in side))


def smoothed_cross_entropy(
    logits, labels, *, label_smoothing: float = 0.0, ignore_index: int = -100, where=None,
    z_loss: float = 0.0, logit_softcap: Optional[float] = None, reduction: str = "none",
    return_stats: bool = False,
):
    """Label-smoothed cross-entropy of materialised logits ``[..., V]`` (any float dtype).

    labels: int class ids ``[...]``; a dense target distribution ``[..., V]`` (float); or
    sparse soft labels ``(ids [..., K] int, weights [..., K] float)``. Tokens whose label is
    ``ignore_index`` or where ``where`` is False contribute 0 and are not counted.
    Target: ``(1 - a) * t + a / V`` over all V classes (PyTorch / optax convention).
    ``z_loss`` adds ``z_loss * lse**2``; ``logit_softcap`` c applies ``c * tanh(z / c)`` first.
    Returns float32 losses ``[...]`` (reduction="none", the default, like optax) or a
    scalar ("sum"; "mean" over valid tokens, 0 when none); with ``return_stats`` also
    :class:`TokenStats`.
    """
    check_options(label_smoothing, z_loss, logit_softcap, reduction)
    logits = jnp.asarray(logits)
    check_arrays(logits=logits)
    if logits.ndim < 1:
        raise ValueError("logits must have a class axis [..., V]")
    batch_shape, v = logits.shape[:-1], logits.shape[-1]
    n = logits.size // v
    z = apply_softcap(logits.reshape(n, v).astype(jnp.float32), logit_softcap)
    dense = not isinstance(labels, tuple) and np.shape(labels) == logits.shape
    if dense:
        q, valid, out_of_range = dense_targets(labels, batch_shape, where)
        target_dot, target_mass = _weighted_sum(q, z), q.sum(-1)
    else:
        t = sparse_targets(labels, batch_shape, v, ignore_index, where)
        target_dot = _weighted_sum(t.weights, jnp.take_along_axis(z, t.ids, axis=-1))
        target_mass, valid, out_of_range = t.weights.sum(-1), t.valid, t.out_of_range
    stats = stats_from_logits(z, need_sum=label_smoothing > 0)
    return _combine(stats, stats.logit_sum, target_dot, target_mass, valid, out_of_range,
                    batch_shape, v, label_smoothing, z_loss, reduction, return_stats)


def _logit_stats_fn(impl: str, block_n, block_v, block_d, filter_eps):
    """The implementation behind ``impl`` as ``f(hidden, weight, bias, *, logit_softcap, need_sum)``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl == "reference":
        return reference_logit_stats
    if impl == "xla":
        from ls_jax.blocked import xla_logit_stats

        return lambda *args, **kw: xla_logit_stats(*args, block_v=block_v, **kw)
    from ls_jax.kernels import pallas_logit_stats

    return lambda *args, **kw: pallas_logit_stats(
        *args, block_n=block_n, block_v=block_v, block_d=block_d, filter_eps=filter_eps, **kw
    )


def linear_smoothed_cross_entropy(
    hidden, weight, labels: Labels, *, bias=None, label_smoothing: float = 0.0,
    ignore_index: int = -100, where=None, z_loss: float = 0.0,
    logit_softcap: Optional[float] = None, reduction: str = "mean", impl: str = "auto",
    block_n: Optional[int] = None, block_v: Optional[int] = None, block_d: Optional[int] = None,
    filter_eps: Optional[float] = None, return_stats: bool = False,
):
    """``smoothed_cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the logits.

    hidden: ``[..., D]``; weight: ``[V, D]`` (Hugging Face lm_head / tied-embedding layout);
    bias: ``[V]`` or None; labels: int ids ``[...]`` or sparse soft labels
    ``(ids [..., K], weights [..., K])``. bf16 or fp32 in; fp32 accumulation and lse.
    impl: "reference" (dense, materialises [N, V]: the oracle), "xla" (blocked over the
    vocabulary, O(N x block_v) extra memory), "pallas" (the fused GPU kernel; interpret
    mode elsewhere), "auto" (pallas on GPU, xla otherwise). block_v is used by xla and
    pallas, block_n / block_d / filter_eps by pallas only (None: the implementation's
    default). Differentiable in hidden, weight and bias (reverse mode; "reference" and "xla"
    also twice, e.g. jax.hessian; "pallas" once). Default reduction: "mean" over
    valid tokens. With ``return_stats`` returns ``(loss, TokenStats)``.
    """
    check_options(label_smoothing, z_loss, logit_softcap, reduction)
    hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
    bias = None if bias is None else jnp.asarray(bias)
    check_arrays(hidden=hidden, weight=weight, bias=bias)
    if weight.ndim != 2 or hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"need hidden [..., D] and weight [V, D]; got {hidden.shape} and {weight.shape}")
    v, d = weight.shape
    if bias is not None and jnp.shape(bias) != (v,):
        raise ValueError(f"bias must have shape ({v},), got {jnp.shape(bias)}")
    if not isinstance(labels, tuple) and jnp.issubdtype(  # NumPy's dtype: jnp.asarray would wrap int64 ids
            labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype, jnp.floating):
        raise ValueError("linear_smoothed_cross_entropy takes int labels or sparse (ids, weights) soft labels")
    batch_shape = hidden.shape[:-1]
    h = hidden.reshape(-1, d)
    t = sparse_targets(labels, batch_shape, v, ignore_index, where)
    a = float(label_smoothing)
    cap = None if logit_softcap is None else float(logit_softcap)
    sum_in_pass = a > 0 and cap is not None
    stats = _logit_stats_fn(impl, block_n, block_v, block_d, filter_eps)(
        h, weight, bias, logit_softcap=cap, need_sum=sum_in_pass
    )
    z_target = jnp.einsum("nd,nkd->nk", h, weight[t.ids], preferred_element_type=jnp.float32)
    if bias is not None:
        z_target = z_target + bias[t.ids].astype(jnp.float32)
    target_dot = _weighted_sum(t.weights, apply_softcap(z_target, cap))
    logit_sum = stats.logit_sum
    if a > 0 and not sum_in_pass:
        logit_sum = h.astype(jnp.float32) @ weight.astype(jnp.float32).sum(0)
        if bias is not None:
            logit_sum = logit_sum + bias.astype(jnp.float32).sum()
    return _combine(stats, logit_sum, target_dot, t.weights.sum(-1), t.valid, t.out_of_range,
                    batch_shape, v, a, float(z_loss), reduction, return_stats)
