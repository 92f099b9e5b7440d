"""Public losses: label-smoothed cross-entropy on logits, and fused on ``hidden @ W.T``.

Per token (docs/design.md), with target distribution t and smoothing a over V classes,
q = (1 - a) t + a / V and

    loss = (sum_v q_v) lse - sum_v q_v z_v + z_loss lse^2
         = ((1 - a) |t| + a) lse - (1 - a) sum_k w_k z_{i_k} - (a / V) sum_v z_v + z_loss lse^2

where |t| = sum_k w_k (1 for hard labels). The loss is a function of three per-token
statistics of the logits - lse, the target term sum_k w_k z_{i_k} and the logit sum - which
the implementations compute (ls_jax/logit_stats.py, the dispatch table in ls_jax/dispatch.py);
:func:`token_loss` is the one place that combines them.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ls_jax.dispatch import ONE_PASS, logit_stats_fn, resolve
from ls_jax.logit_stats import LAYOUTS, BlockSizes, LogitStats, apply_softcap, vocab_axis, weighted_sum
from ls_jax.reference import stats_from_logits
from ls_jax.sharded import mesh_axes, resolve_mesh, sharded_logit_stats, sharded_one_pass
from ls_jax.targets import (
    Labels,
    check_arrays,
    check_options,
    dense_targets,
    is_static_zero,
    sparse_targets,
    token_weights,
)


class TokenStats(NamedTuple):
    """Per-token side outputs, each shaped like the labels' batch dims ``[...]``; no gradient.

    lse: float32 log-sum-exp of the (capped) logits. max_logit: float32. prediction: int32
    argmax class (lowest index on ties). valid: bool, the tokens that count in the loss.
    target_logprob: float32 unsmoothed log-probability of the target, ``sum_k w_k log p_{i_k}``
    (``log p_y`` for a hard label; 0 on ignored tokens): ``-target_logprob`` is the true NLL
    (perplexity) whatever the smoothing. The top-class probability is :attr:`confidence`.
    On ignored tokens (valid False) every field but valid is 0, whatever an implementation
    computed for them (so confidence reads 1 there: use it where valid).
    """

    lse: jax.Array
    max_logit: jax.Array
    prediction: jax.Array
    valid: jax.Array
    target_logprob: jax.Array

    @property
    def confidence(self) -> jax.Array:
        """float32 top-class probability ``exp(max_logit - lse)`` per token."""
        return jnp.exp(self.max_logit - self.lse)


class LossRows(NamedTuple):
    """Per-token coefficients of the loss in the statistics; every field ``[N]`` float32
    (``nan`` bool). ``weight``: the token's weight in the reduction (0: not counted)."""

    lse: jax.Array  # (1 - a) |t| + a
    target: jax.Array  # 1 - a
    logit_sum: jax.Array  # a / V
    z_loss: jax.Array
    weight: jax.Array
    nan: jax.Array  # an out-of-range label: NaN loss, no gradient


def token_loss(stats: LogitStats, rows: LossRows) -> jax.Array:
    """The one place that combines the statistics into the loss (module docstring's formula).

    Args:
      stats: :class:`ls_jax.logit_stats.LogitStats` ``[N]`` (lse, logit_sum, target used).
      rows: :class:`LossRows` ``[N]``, the per-token coefficients and weights.

    Returns:
      float32 per-token loss ``[N]``, weighted by ``rows.weight``: exactly 0, with exactly 0
      cotangents for its statistics (even NaN or inf ones), where the weight is 0; NaN where
      ``rows.nan``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from ls_jax.logit_stats import LogitStats
      >>> one = lambda x: jnp.array([x])
      >>> stats = LogitStats(lse=one(2.0), logit_sum=one(3.0), target=one(1.5), max_logit=one(1.5),
      ...                    prediction=one(0))
      >>> rows = LossRows(lse=one(1.0), target=one(0.9), logit_sum=one(0.1 / 3), z_loss=one(0.0),
      ...                 weight=one(1.0), nan=one(False))
      >>> print(token_loss(stats, rows).round(4))  # 2 - 0.9 * 1.5 - 0.1 / 3 * 3
      [0.55]
    """
    on = rows.weight != 0
    lse, target, total = (jnp.where(on, x, 0.0) for x in (stats.lse, stats.target, stats.logit_sum))
    loss = rows.lse * lse - rows.target * target - rows.logit_sum * total + rows.z_loss * jnp.square(lse)
    loss = jnp.where(on, rows.weight * loss, 0.0)
    return jnp.where(rows.nan, jnp.nan, loss)


def _loss_rows(mass, valid, out_of_range, num_classes, label_smoothing, z_loss, reduction, weights) -> LossRows:
    a = jnp.asarray(label_smoothing, jnp.float32)
    out_of_range = out_of_range | ~((a >= 0) & (a <= 1))  # a traced value outside [0, 1] (or NaN): NaN loss
    weight = jnp.where(valid, weights, 0.0)
    if reduction == "mean":  # over the valid tokens' weights; 0 when there are none
        total = weight.sum()
        weight = weight / jnp.where(total == 0, 1.0, total)
    full = lambda x: jnp.broadcast_to(jnp.asarray(x, jnp.float32), mass.shape)
    return LossRows((1.0 - a) * mass + a, full(1.0 - a), full(a / num_classes), full(z_loss), weight, out_of_range)


def _finish(per_token_or_sum, stats: LogitStats, mass, valid, batch_shape, reduction, return_stats):
    """Reshape / reduce the loss; with ``return_stats`` also :class:`TokenStats` ``[...]``."""
    if reduction == "none":
        loss = per_token_or_sum.reshape(batch_shape)
    else:
        loss = per_token_or_sum if per_token_or_sum.ndim == 0 else per_token_or_sum.sum()
    if not return_stats:
        return loss
    s = jax.tree.map(jax.lax.stop_gradient, jax.tree.map(lambda x: jnp.where(valid, x, jnp.zeros((), x.dtype)), stats))
    side = TokenStats(s.lse, s.max_logit, s.prediction, valid, s.target - mass * s.lse)
    return loss, TokenStats(*(x.reshape(batch_shape) for x in side))


def _zero_ignored(x, valid):
    """Rows ``x [N, ...]`` of ignored tokens set to 0, so that autodiff of dense logits gives them
    exactly zero gradients whatever they hold (NaN, inf); the blocked implementations do this
    inside their VJP (ls_jax/logit_stats.py)."""
    return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def smoothed_cross_entropy(
    logits,
    labels,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    where=None,
    weights=None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "none",
    return_stats: bool = False,
):
    """Label-smoothed cross-entropy of materialised logits (any float dtype).

    The target of a token is ``(1 - a) * t + a / V`` over all V classes (PyTorch / optax
    convention), t its label's distribution and a ``label_smoothing``.

    Args:
      logits: float ``[..., V]``.
      labels: int class ids ``[...]``; a dense target distribution ``[..., V]`` (float); or
        sparse soft labels ``(ids [..., K] int, weights [..., K] float)``.
      label_smoothing: a in [0, 1]; may be traced (jit argument, vmap, schedule): a traced value
        outside [0, 1] makes every token's loss NaN.
      ignore_index: a label id that contributes 0 and is not counted.
      where: bool ``[...]`` or None; False tokens contribute 0 and are not counted.
      weights: float ``[...]`` or None: each token's loss is multiplied by its weight ("mean"
        divides by the valid tokens' total weight).
      z_loss: adds ``z_loss * lse**2`` per token (may be traced).
      logit_softcap: c applies ``c * tanh(z / c)`` to the logits first; None: no cap.
      reduction: "none" (the default, like optax), "sum", or "mean" over the valid tokens (0
        when there are none).
      return_stats: also return :class:`TokenStats`.

    Returns:
      float32 losses ``[...]`` ("none") or a scalar; with ``return_stats``, ``(loss, TokenStats
      [...])``. A label out of ``[0, V)`` (other than ``ignore_index``) gives a NaN loss.

    Raises:
      ValueError: labels of a shape that fits neither ids ``[...]`` nor ``[..., V]``, logits
        without a class axis, or an invalid concrete option (label_smoothing outside [0, 1],
        an unknown reduction).

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
      >>> print(smoothed_cross_entropy(logits, jnp.array([0, 2])).round(4))
      [0.4076 0.0949]
      >>> print(smoothed_cross_entropy(logits, jnp.array([0, -100]), label_smoothing=0.1).round(4))
      [0.5076 0.    ]
      >>> loss, stats = smoothed_cross_entropy(logits, jnp.array([0, 2]), reduction="mean", return_stats=True)
      >>> print(loss.round(4), stats.prediction)
      0.2513 [0 2]
    """
    check_options(label_smoothing, z_loss, logit_softcap, reduction)
    logits = jnp.asarray(logits)
    check_arrays(logits=logits)
    if logits.ndim < 1:
        raise ValueError("logits must have a class axis [..., V]")
    batch_shape, v = logits.shape[:-1], logits.shape[-1]
    n = logits.size // v
    z = logits.reshape(n, v).astype(jnp.float32)
    q = None
    if not isinstance(labels, tuple) and np.ndim(labels) == logits.ndim and np.shape(labels) != logits.shape:
        raise ValueError(
            f"labels have shape {np.shape(labels)}: class ids need shape {batch_shape}, a dense "
            f"target distribution the logits' shape {logits.shape} ([..., V])"
        )
    if not isinstance(labels, tuple) and np.shape(labels) == logits.shape:
        q, valid, out_of_range = dense_targets(labels, batch_shape, where)
        mass = q.sum(-1)
    else:
        t = sparse_targets(labels, batch_shape, v, ignore_index, where)
        mass, valid, out_of_range = t.weights.sum(-1), t.valid, t.out_of_range
    z = apply_softcap(_zero_ignored(z, valid), logit_softcap)
    if q is None:
        target = weighted_sum(t.weights, jnp.take_along_axis(z, t.ids, axis=-1))
    else:
        target = weighted_sum(q, z)
    stats = stats_from_logits(z, target, need_sum=not is_static_zero(label_smoothing))
    rows = _loss_rows(
        mass, valid, out_of_range, v, label_smoothing, z_loss, reduction, token_weights(weights, batch_shape)
    )
    return _finish(token_loss(stats, rows), stats, mass, valid, batch_shape, reduction, return_stats)


def linear_smoothed_cross_entropy(
    hidden,
    weight,
    labels: Labels,
    *,
    bias=None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    where=None,
    weights=None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    blocks: BlockSizes | None = None,
    weight_layout: str = "vd",
    return_stats: bool = False,
    mesh=None,
):
    """``smoothed_cross_entropy(hidden @ weight.T + bias, labels, ...)`` without the logits.

    bf16 or fp32 in; every gradient part is combined in float32 and rounded once to the input's
    dtype. Differentiable in hidden, weight, bias (and soft-label weights) in reverse mode;
    "reference" also in forward mode and to any order; "xla" twice with reduction="none"
    (jax.hessian of its sum).

    Args:
      hidden: ``[..., D]``.
      weight: the head, ``[V, D]`` (``weight_layout="vd"``, the default: Hugging Face lm_head /
        tied embedding) or ``[D, V]`` (``"dv"``: Tunix, MaxText, nnx.Linear kernels; read in
        place by every impl, its gradient in the same layout, no transposed copy).
      labels: int ids ``[...]`` or sparse soft labels ``(ids [..., K], weights [..., K])``.
      bias: ``[V]`` or None.
      label_smoothing, ignore_index, where, weights, z_loss, logit_softcap: as in
        :func:`smoothed_cross_entropy`.
      reduction: "mean" (the default, over valid tokens), "sum" or "none".
      impl: a name of the dispatch table (ls_jax/dispatch.py): "xla" (blocked over tokens and the
        vocabulary; a scalar reduction makes its gradients in the forward sweep: 6NDV, holding
        the gradients from forward to backward; reduction="none" recomputes the logits in the
        backward), "reference" (dense, materialises ``[N, V]``: the oracle), "pallas" (the fused
        GPU forward kernel with the blocked XLA backward; interpret mode elsewhere;
        "pallas_two_kernel" / "pallas_atomic": the kernels' own backwards), "auto" ("xla", the
        fastest measured on GPU and CPU).
      blocks: :class:`ls_jax.logit_stats.BlockSizes` (None: the implementation's defaults).
      weight_layout: "vd" or "dv" (see weight).
      return_stats: also return :class:`TokenStats`.
      mesh: a ``jax.sharding.Mesh`` with Auto or Explicit axes (None: the ambient mesh of
        ``jax.set_mesh`` / ``jax.sharding.use_mesh``, else that of a legacy ``with mesh:`` block,
        if any) with axes ``data`` / ``fsdp`` (tokens split over them, the weight gathered) and
        ``tensor`` (the weight vocabulary-parallel): each device computes its own tokens and
        vocabulary shard, for every impl (ls_jax/sharded.py); "xla" with a scalar reduction
        takes the one-pass path per device when the mesh has no ``tensor`` axis, the two-pass
        path (statistics merged across the vocabulary shards) otherwise. The tokens
        ``hidden.shape[:-1]`` must be divisible by the batch axes' size.

    Returns:
      float32 loss: a scalar, or ``[...]`` for reduction="none"; with ``return_stats``,
      ``(loss, TokenStats [...])``.

    Raises:
      ValueError: shapes that do not fit (hidden ``[..., D]``, weight in ``weight_layout``, bias
        ``[V]``), float (dense) labels, an unknown impl or weight_layout, or an invalid option.
      TypeError: ``blocks`` that is not a BlockSizes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> hidden = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
      >>> weight = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # [V=3, D=2]
      >>> labels = jnp.array([0, 1, -100])
      >>> print(linear_smoothed_cross_entropy(hidden, weight, labels, label_smoothing=0.1).round(4))
      0.5076
      >>> print(smoothed_cross_entropy(hidden @ weight.T, labels, label_smoothing=0.1, reduction="mean").round(4))
      0.5076
      >>> print(linear_smoothed_cross_entropy(hidden, weight.T, labels, weight_layout="dv", reduction="none").round(4))
      [0.4076 0.4076 0.    ]
      >>> dh = jax.grad(linear_smoothed_cross_entropy)(hidden, weight, labels)
      >>> print(dh.shape, dh[2])  # an ignored token: zero gradient
      (3, 2) [0. 0.]
    """
    check_options(label_smoothing, z_loss, logit_softcap, reduction)
    impl = resolve(impl)
    blocks = BlockSizes() if blocks is None else blocks
    if not isinstance(blocks, BlockSizes):
        raise TypeError(f"blocks must be a BlockSizes or None, got {type(blocks).__name__}")
    hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
    bias = None if bias is None else jnp.asarray(bias)
    check_arrays(hidden=hidden, weight=weight, bias=bias)
    if weight_layout not in LAYOUTS:
        raise ValueError(f"weight_layout must be one of {LAYOUTS}, got {weight_layout!r}")
    ax = vocab_axis(weight_layout)
    if weight.ndim != 2 or hidden.ndim < 1 or hidden.shape[-1] != weight.shape[1 - ax]:
        want = "[V, D]" if ax == 0 else "[D, V]"
        raise ValueError(
            f"need hidden [..., D] and weight {want} (weight_layout={weight_layout!r}); got "
            f"{hidden.shape} and {weight.shape}"
        )
    v, d = weight.shape[ax], weight.shape[1 - ax]
    if bias is not None and jnp.shape(bias) != (v,):
        raise ValueError(f"bias must have shape ({v},), got {jnp.shape(bias)}")
    if not isinstance(labels, tuple) and jnp.issubdtype(  # NumPy's dtype: jnp.asarray would wrap int64 ids
        labels.dtype if hasattr(labels, "dtype") else np.asarray(labels).dtype, jnp.floating
    ):
        raise ValueError("linear_smoothed_cross_entropy takes int labels or sparse (ids, weights) soft labels")
    batch_shape = hidden.shape[:-1]
    h = hidden.reshape(-1, d)
    t = sparse_targets(labels, batch_shape, v, ignore_index, where)
    cap = None if logit_softcap is None else float(logit_softcap)
    need_sum = not is_static_zero(label_smoothing)
    mass = t.weights.sum(-1)
    rows = _loss_rows(
        mass, t.valid, t.out_of_range, v, label_smoothing, z_loss, reduction, token_weights(weights, batch_shape)
    )
    opts = dict(softcap=cap, need_sum=need_sum, blocks=blocks, layout=weight_layout)
    mesh = resolve_mesh(mesh)
    if impl == "reference" or mesh is not None:  # dense autodiff: the reference, or a ragged V's rest on a mesh
        h = _zero_ignored(h, t.valid)
    one_pass = reduction != "none" and impl in ONE_PASS
    if mesh is not None and one_pass and mesh_axes(mesh)[1] is None:
        loss, stats = sharded_one_pass(
            ONE_PASS[impl], token_loss, h, weight, bias, t.ids, t.weights, rows, mesh=mesh, **opts
        )
    elif mesh is not None:
        stats = sharded_logit_stats(logit_stats_fn(impl), h, weight, bias, t.ids, t.weights, mesh=mesh, **opts)
        loss = token_loss(stats, rows)
    elif one_pass:
        loss, stats = ONE_PASS[impl](token_loss, h, weight, bias, t.ids, t.weights, rows, **opts)
    else:
        stats = logit_stats_fn(impl)(h, weight, bias, t.ids, t.weights, **opts)
        loss = token_loss(stats, rows)
    return _finish(loss, stats, mass, t.valid, batch_shape, reduction, return_stats)
