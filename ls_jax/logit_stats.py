"""The seam between the loss and its implementations: per-token statistics of the logits.

Every implementation computes, for ``z = softcap(hidden @ weight.T + bias)`` and sparse
targets ``(ids [N, K], weights [N, K])``, without the loss ever seeing ``z``:

* ``lse[n]       = log sum_v exp(z[n, v])``                      (differentiable)
* ``logit_sum[n] = sum_v z[n, v]``  (only when asked; else 0)      (differentiable)
* ``target[n]    = sum_k weights[n, k] * z[n, ids[n, k]]``          (differentiable)
* ``max_logit[n] = max_v z[n, v]`` and ``prediction[n] = argmax_v z[n, v]``   (no gradient)

Their vector-Jacobian product, for cotangents ``g_lse``, ``g_sum``, ``g_target`` (all ``[N]``):
``dz[n, v] = (g_lse softmax(z)[n, v] + g_sum + g_target sum_k weights[n, k] [v = ids[n, k]])
* softcap'(raw[n, v])``, pulled back through the matmul. Every part of ``dz`` is combined in
float32 *inside* the logit tile, before any rounding to a 16-bit dtype: the softmax and the
target term cancel for confident tokens (p_target ~ 1), so adding them after rounding would
lose most of the gradient's bits. Gradients accumulate in float32 and are rounded once.

A token whose cotangents are all zero (an ignored token) contributes exactly 0 to every
gradient, whatever its hidden state or logits hold (NaN, -inf): its row is zeroed before it
can meet a matmul.

:func:`two_pass` builds the differentiable statistics of a backend (``forward`` and a float32
``backward`` that recomputes the logits): ``impl="xla"`` (ls_jax/xla.py) and ``impl="pallas"``
(kernels/). ``impl="reference"`` (ls_jax/reference.py) is plain autodiff of dense logits.
"""

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LogitStats(NamedTuple):
    """Per-token statistics of the logits; every field has shape ``[N]``.

    lse, logit_sum, target, max_logit: float32. prediction: int32 argmax (lowest index on ties).
    max_logit and prediction carry no gradient.
    """

    lse: jax.Array
    logit_sum: jax.Array
    target: jax.Array
    max_logit: jax.Array
    prediction: jax.Array


PRECISIONS = ("input", "float32")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """How an implementation tiles and runs the work; None leaves a choice to the implementation.

    block_n: tokens per tile. block_v: vocabulary rows per tile. block_d: hidden-size chunk
    (pallas). filter_eps: pallas only, skip backward tiles whose softmax is below eps
    everywhere (CCE-style gradient filtering; approximate; None: exact).
    tile_bytes: "xla" one-pass only (a scalar loss), the budget of its float32 ``[block_n, V]``
    logit tile, which sets block_n when that is None (default per backend: :func:`tile_budget`);
    the step's temporaries are the float32 dW accumulator plus a few such tiles, whatever N is.
    precision: the operands of the loss's matrix products (:func:`gemm_operands`); None: the
    backend's default, "input" on GPU and TPU, "float32" on CPU.

    * "input": operands in the inputs' dtype with float32 accumulation (bf16 tensor cores /
      MXU for bf16 inputs); dz is combined in float32 and rounded once to that dtype before its
      two products. Fastest on accelerators; the gradients measure 4-5x the bf16 rounding of
      the exact ones (tests/test_numerics.py). float32 inputs run at JAX's default matmul
      precision (TF32 on NVIDIA GPUs unless ``jax_default_matmul_precision`` says otherwise).
    * "float32": float32 operands at ``Precision.HIGHEST``: dz meets W and h unrounded (about
      the rounding of the exact gradient), at a half or less of the bf16 tensor-core rate on a
      GPU (several passes on a TPU), and "xla" holds a float32 copy of a 16-bit head (pallas: of
      hidden and head). CPU's default: there bf16 products are no faster.
    """

    block_n: int | None = None
    block_v: int | None = None
    block_d: int | None = None
    filter_eps: float | None = None
    tile_bytes: int | None = None
    precision: str | None = None

    def __post_init__(self):
        for name in ("block_n", "block_v", "block_d", "tile_bytes"):
            b = getattr(self, name)
            if b is None:
                continue
            if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
                raise TypeError(f"{name} must be an int or None, got {b!r}")
            if b < 1:
                raise ValueError(f"{name} must be >= 1, got {b}")
        eps = self.filter_eps
        if eps is not None and not (isinstance(eps, (int, float, np.floating)) and 0 <= eps < float("inf")):
            raise ValueError(f"filter_eps must be a finite number >= 0 or None, got {eps!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS} or None, got {self.precision!r}")


# The one-pass tile budget per backend (bytes of the float32 [block_n, V] logit tile); see
# benchmarks/RESULTS.md for the figures each comes from.
# GPU: an H200 measured block_n 1024 (2^29 bytes at V = 128256) fastest of 256 ... 4096 at N = 4096
# and 8192 (53.7 ms against 57.0 at 2048 and 61.6 at 512); TPU: unmeasured, the GPU's.
TILE_BYTES = {"cpu": 2**25, "gpu": 2**29, "tpu": 2**29}


def tile_budget(blocks: BlockSizes) -> int:
    """Bytes of the one-pass logit tile: ``blocks.tile_bytes``, else the default backend's."""
    return blocks.tile_bytes or TILE_BYTES.get(jax.default_backend(), TILE_BYTES["gpu"])


def gemm_operands(blocks: BlockSizes, dtype) -> tuple:
    """The one place that decides the loss's matrix products (see :class:`BlockSizes`):
    ``(operand dtype, lax precision)`` for inputs of ``dtype`` (hidden and head promoted)."""
    precision = blocks.precision or ("float32" if jax.default_backend() == "cpu" else "input")
    if precision == "float32":
        return jnp.dtype(jnp.float32), jax.lax.Precision.HIGHEST
    return jnp.dtype(dtype), None


def apply_softcap(raw: jax.Array, softcap: float | None) -> jax.Array:
    """``softcap * tanh(raw / softcap)``, or ``raw`` when ``softcap`` is None. Any shape."""
    if softcap is None:
        return raw
    return softcap * jnp.tanh(raw / softcap)


LAYOUTS = ("vd", "dv")  # the head as weight [V, D] (Hugging Face lm_head) or kernel [D, V] (nnx.Linear)


def vocab_axis(layout: str) -> int:
    """The vocabulary axis of a head in ``layout``."""
    return LAYOUTS.index(layout)


def head_index(v, d, layout: str) -> tuple:
    """``(v, d)`` in the order of a head's axes in ``layout``: a shape, an index or a block index
    given for the vocabulary axis and the D axis."""
    return (v, d) if layout == "vd" else (d, v)


def _dot(a, b, a_axis, b_axis, precision):
    return jax.lax.dot_general(
        a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


# The three products with a head (or a slice of V' classes) in ``layout``: the layout goes into the
# dots' dimension numbers, never a transposed copy. float32 results; also used inside the Pallas
# kernels (kernels/tiles.py, kernels/backward.py) on one block of the head.
def head_logits(hidden, head, layout: str, precision=None) -> jax.Array:
    """``hidden [N, D] @ W.T`` ``[N, V']``."""
    return _dot(hidden, head, 1, 1 - vocab_axis(layout), precision)


def head_back(dz, head, layout: str, precision=None) -> jax.Array:
    """``dz [N, V'] @ W`` ``[N, D]``."""
    return _dot(dz, head, 1, vocab_axis(layout), precision)


def head_outer(dz, hidden, layout: str, precision=None) -> jax.Array:
    """The weight gradient ``dz [N, V'].T @ hidden [N, D]`` in ``layout``: ``[V', D]`` or ``[D, V']``."""
    return _dot(dz, hidden, 0, 0, precision) if layout == "vd" else _dot(hidden, dz, 0, 0, precision)


def dense_logits(hidden, weight, bias, logit_softcap=None, layout: str = "vd") -> jax.Array:
    """float32 logits ``[N, V]`` = softcap(hidden [N, D] @ W.T + bias [V]), W the head in ``layout``."""
    z = head_logits(hidden, weight, layout)
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    return apply_softcap(z, logit_softcap)


def weighted_sum(weights, z):
    """``sum_k weights[n, k] * z[n, k]`` over the last axis, a zero weight counting 0 even on a
    -inf logit (a padding entry, or a class masked out by a -inf bias; not NaN)."""
    return (weights * jnp.where((weights == 0) & jnp.isinf(z), 0.0, z)).sum(-1)


def target_logits(hidden, weight, bias, ids, softcap, layout: str = "vd"):
    """float32 capped logits of the target classes ``[N, K]`` (a gather, no vocabulary pass)."""
    if layout == "vd":
        z = jnp.einsum("nd,nkd->nk", hidden, weight[ids], preferred_element_type=jnp.float32)
    else:
        z = jnp.einsum("nd,dnk->nk", hidden, weight[:, ids], preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias[ids].astype(jnp.float32)
    return apply_softcap(z, softcap)


def dz_tile(z, cols, lse, comp, g_lse, g_sum, ids, coef, softcap, valid=None):
    """float32 gradient of the logit tile ``z [bn, bv]`` (capped, float32), whose columns are the
    classes ``cols`` (``[bv]`` or ``[1, bv]``): ``(g_lse p + g_sum + sum_k coef[k] [cols = ids[k]])
    softcap'``, everything combined in float32. The one source of dz: the XLA backends
    (ls_jax/xla.py) and the Pallas kernels (kernels/backward.py) call it on their tiles, so it is
    plain jnp on arrays, and takes the K targets as sequences of vectors (a Triton kernel cannot
    slice a column out of a 2-D value).

    Args:
      z: float32 capped logits ``[bn, bv]``.
      cols: int32 global class index of each column, ``[bv]`` or ``[1, bv]``.
      lse, comp, g_lse: float32 ``[bn]``: log-sum-exp, the other classes' probability mass
        (below), the lse cotangent.
      g_sum: float32 ``[bn]`` logit-sum cotangent, or None (no sum term).
      ids, coef: K-sequences of ``[bn]`` vectors: target class ids (int32) and their
        coefficients (float32, g_target * target weight).
      softcap: the logit softcap, or None.
      valid: bool ``[1, bv]`` (False on padded columns, whose probability and sum term become 0),
        or None (every column is a class).

    Returns:
      ``(dz, prob, hit)``: dz float32 ``[bn, bv]``; prob, the softmax ``[bn, bv]`` (0 on invalid
      columns); hit, bool ``[bn, bv]``, True where a target with a nonzero coefficient lies
      (the kernels' gradient filter keeps such tiles).

    At the first target's column ``g_lse p + coef`` is formed as ``(g_lse + coef) - g_lse comp``
    with ``comp = 1 - p = sum of the other classes' probabilities`` ``[bn]`` (accurate to float32
    relative precision, from the forward's :func:`excluded_lse`): for a confident token p - 1 is
    far below float32's resolution of p itself, and the first form would lose it."""
    prob = jnp.exp(z - lse[:, None])
    if valid is not None:
        prob = jnp.where(valid, prob, 0.0)
    first = cols == ids[0][:, None]
    dz = jnp.where(first, (g_lse + coef[0] - g_lse * comp)[:, None], g_lse[:, None] * prob)
    if g_sum is not None:
        dz = dz + (g_sum[:, None] if valid is None else jnp.where(valid, g_sum[:, None], 0.0))
    hit = first & (coef[0][:, None] != 0)
    for k in range(1, len(ids)):
        on = cols == ids[k][:, None]
        dz = dz + jnp.where(on, coef[k][:, None], 0.0)
        hit = hit | (on & (coef[k][:, None] != 0))
    if softcap is not None:
        dz = dz * (1.0 - jnp.square(z / softcap))
    return dz, prob, hit


def live_rows(hidden, lse, comp, g_lse, g_sum, coef):
    """Zero what an ignored token (all cotangents 0) could poison a gradient with: its hidden row
    (-> 0), its lse (-> +inf, so its softmax is exactly 0) and comp (-> 0).
    Returns (hidden, lse, comp, live [N])."""
    live = (g_lse != 0) | (jnp.any(coef != 0, axis=-1))
    if g_sum is not None:
        live = live | (g_sum != 0)
    hidden = jnp.where(live[:, None], hidden, jnp.zeros((), hidden.dtype))
    return hidden, jnp.where(live, lse, jnp.inf), jnp.where(live, comp, 0.0), live


def excluded_lse(m, s_excl):
    """log of the online sum ``s_excl`` (rescaled to the running max ``m``), -inf when it is 0."""
    return jnp.where(s_excl > 0, m + jnp.log(s_excl), -jnp.inf)


# The online log-sum-exp over vocabulary tiles, the one source of the forward statistics of the XLA
# two-pass forward (ls_jax/xla.py) and the Pallas forward kernel (kernels/forward.py): plain jnp on
# arrays, so it runs inside a kernel body. The running state is (max, sum of exp, logit sum,
# argmax, sum of exp without the first target), each ``[bn]``, the sums rescaled to the max.
def online_init(bn: int) -> tuple:
    """The running state before any tile: max -inf, sums 0, argmax 0 (each ``[bn]``)."""
    zeros = jnp.zeros((bn,), jnp.float32)
    return jnp.full((bn,), -jnp.inf, jnp.float32), zeros, zeros, jnp.zeros((bn,), jnp.int32), zeros


def online_fold(state: tuple, z, valid, col0, first, need_sum: bool) -> tuple:
    """``state`` with the logit tile ``z [bn, bv]`` folded in.

    Args:
      state: the running state (:func:`online_init`).
      z: float32 capped logits ``[bn, bv]``, -inf on columns that are not classes of this tile.
      valid: bool ``[bv]`` or ``[1, bv]``, True on the tile's own classes (the logit sum counts them).
      col0: int32 global class index of the tile's first column.
      first: int32 ``[bn]`` first target class, left out of the excluded sum.
      need_sum: whether to accumulate the logit sum (else it stays 0).

    Returns:
      The new state; the argmax keeps the lowest index on ties (a later tile must be strictly larger).
    """
    m, s, total, best, s_excl = state
    tile_max = z.max(axis=1)
    new_m = jnp.maximum(m, tile_max)
    # -inf when every logit so far is -inf (-inf bias, or a tile of padded columns only): no NaN
    shift = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
    e, rescale = jnp.exp(z - shift[:, None]), jnp.exp(m - shift)
    s = s * rescale + e.sum(axis=1)
    cols = col0 + jax.lax.broadcasted_iota(jnp.int32, (1, z.shape[1]), 1)
    s_excl = s_excl * rescale + jnp.where(cols == first[:, None], 0.0, e).sum(axis=1)
    if need_sum:
        total = total + jnp.where(valid, z, 0.0).sum(axis=1)
    best = jnp.where(tile_max > m, col0 + jnp.argmax(z, axis=1).astype(jnp.int32), best)
    return new_m, s, total, best, s_excl


def online_result(state: tuple) -> tuple:
    """(lse, logit_sum, max_logit, prediction, lse_excl) ``[bn]`` of the final state."""
    m, s, total, best, s_excl = state
    return m + jnp.log(s), total, m, best, excluded_lse(m, s_excl)


class Backend(NamedTuple):
    """A two-pass implementation of the seam (see :func:`two_pass`).

    The head ``weight`` is ``[V, D]`` or ``[D, V]`` (``layout``: "vd" / "dv"), its gradient in the
    same layout. forward(hidden, weight, bias, first [N] int32, *, softcap, need_sum, blocks,
    layout) -> (lse,
    logit_sum, max_logit, prediction, lse_excl) ``[N]``, lse_excl the log-sum-exp over every class
    but ``first`` (the first target); backward(hidden, weight, bias, lse, comp, g_lse, g_sum, ids,
    coef, *, softcap, blocks, layout) -> float32 ``(dhidden [N, D], dweight, dbias [V] or None)``
    with dz as in :func:`dz_tile` (comp = exp(lse_excl - lse); g_sum None when no sum was asked
    for), the logits recomputed.
    """

    forward: Callable
    backward: Callable


def _two_pass_forward(backend, hidden, weight, bias, ids, tw, softcap, need_sum, blocks, layout):
    lse, total, mx, arg, lse_excl = backend.forward(
        hidden, weight, bias, ids[:, 0], softcap=softcap, need_sum=need_sum, blocks=blocks, layout=layout
    )
    z_t = target_logits(hidden, weight, bias, ids, softcap, layout)
    return LogitStats(lse, total, weighted_sum(tw, z_t), mx, arg), (z_t, jnp.exp(lse_excl - lse))


@partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7, 8, 9))
def _two_pass(backend, hidden, weight, bias, ids, tw, softcap, need_sum, blocks, layout):
    return _two_pass_forward(backend, hidden, weight, bias, ids, tw, softcap, need_sum, blocks, layout)[0]


def _two_pass_fwd(backend, hidden, weight, bias, ids, tw, softcap, need_sum, blocks, layout):
    stats, (z_t, comp) = _two_pass_forward(backend, hidden, weight, bias, ids, tw, softcap, need_sum, blocks, layout)
    return stats, (hidden, weight, bias, ids, tw, stats.lse, comp, z_t)


def _two_pass_bwd(backend, softcap, need_sum, blocks, layout, res, ct):
    hidden, weight, bias, ids, tw, lse, comp, z_t = res
    g_lse = ct.lse.astype(jnp.float32)
    g_sum = ct.logit_sum.astype(jnp.float32) if need_sum else None
    g_t = ct.target.astype(jnp.float32)
    coef = g_t[:, None] * tw
    h, lse, comp, _ = live_rows(hidden, lse, comp, g_lse, g_sum, coef)
    dh, dw, db = backend.backward(
        h, weight, bias, lse, comp, g_lse, g_sum, ids, coef, softcap=softcap, blocks=blocks, layout=layout
    )
    d_tw = g_t[:, None] * jnp.where((tw == 0) & jnp.isinf(z_t), 0.0, z_t)
    return (
        dh.astype(hidden.dtype),
        dw.astype(weight.dtype),
        None if bias is None else db.astype(bias.dtype),
        None,
        d_tw.astype(tw.dtype),
    )


_two_pass.defvjp(_two_pass_fwd, _two_pass_bwd)


def two_pass(backend: Backend):
    """The seam's function for ``backend``: ``f(hidden [N, D], weight [V, D] or [D, V], bias [V] |
    None, ids [N, K] int32, weights [N, K] float32, *, softcap, need_sum, blocks, layout="vd")
    -> LogitStats``, differentiable once in reverse mode (hidden, weight, bias and the target
    weights)."""

    def logit_stats(hidden, weight, bias, ids, tw, *, softcap, need_sum, blocks, layout="vd"):
        return _two_pass(backend, hidden, weight, bias, ids, tw, softcap, need_sum, blocks, layout)

    return logit_stats
