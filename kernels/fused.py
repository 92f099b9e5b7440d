"""``pallas_logit_stats``: the ``impl="pallas"`` implementation of the logit-statistics seam
(ls_jax/logit_stats.py), wiring the forward and backward kernels through ``jax.custom_vjp``.

The wrapper pads hidden / weight / bias with zeros to block multiples (a no-op when the shapes
already are: N, V, D multiples of the blocks), runs the kernels, and slices the padding off.
"""

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from ls_jax.blocked import DEFAULT_BLOCK_V as BLOCKED_V
from ls_jax.blocked import logit_stats_vjp as blocked_vjp
from ls_jax.logit_stats import LogitStats, reference_logit_stats
from .backward import backward
from .forward import forward_partials, merge_splits
from .tiles import Plan, plan


def _pad(x, shape):
    """``x`` zero-padded at the end of each axis up to ``shape`` (``x`` itself when equal)."""
    if x is None or x.shape == shape:
        return x
    return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)])


def _padded(hidden, weight, bias, p: Plan):
    return (_pad(hidden, (p.n_pad, p.d_pad)), _pad(weight, (p.v_pad, p.d_pad)),
            _pad(bias, (p.v_pad,)))


def _first_order_only(kernels, plan_argnum):
    """``kernels`` with a JVP rule that raises a clear error: pallas_call has no derivative of its
    own, so ``impl="pallas"`` is differentiable once (the custom_vjp below), not in forward mode
    nor twice (jax.jvp, jax.hessian, grad of grad)."""
    f = jax.custom_jvp(kernels, nondiff_argnums=(plan_argnum,))

    @f.defjvp
    def no_jvp(p, primals, tangents):
        raise NotImplementedError(
            "impl='pallas' is differentiable once (jax.grad, jax.vjp); for jax.jvp or second-order "
            "derivatives (jax.hessian, grad of grad) use impl='xla' or impl='reference'")

    return f


_forward_partials = _first_order_only(forward_partials, 3)
_backward = _first_order_only(backward, 6)


def _forward(hidden, weight, bias, p: Plan):
    """(LogitStats [N], lse over the padded rows [n_pad])."""
    parts = merge_splits(*_forward_partials(*_padded(hidden, weight, bias, p), p))
    return LogitStats(*(x[: p.n] for x in parts)), parts.lse


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _stats(hidden, weight, bias, p: Plan):
    return _forward(hidden, weight, bias, p)[0]


def _stats_fwd(hidden, weight, bias, p: Plan):
    stats, lse_pad = _forward(hidden, weight, bias, p)
    return stats, (hidden, weight, bias, lse_pad)


def _stats_bwd(p: Plan, residuals, cotangents):
    hidden, weight, bias, lse_pad = residuals
    if p.backward == "xla":  # the blocked XLA implementation's VJP (ls_jax/blocked.py)
        return blocked_vjp(hidden, weight, bias, lse_pad[: p.n], cotangents, logit_softcap=p.softcap,
                           need_sum=p.need_sum, block_v=min(BLOCKED_V, p.v))
    g_lse = _pad(cotangents.lse.astype(jnp.float32), (p.n_pad,))
    g_sum = _pad(cotangents.logit_sum.astype(jnp.float32), (p.n_pad,)) if p.need_sum else None
    dh, dw, db = _backward(*_padded(hidden, weight, bias, p), lse_pad, g_lse, g_sum, p)
    dh = dh[: p.n, : p.d].astype(hidden.dtype)
    dw = dw[: p.v, : p.d].astype(weight.dtype)
    return dh, dw, None if bias is None else db[: p.v].astype(bias.dtype)


_stats.defvjp(_stats_fwd, _stats_bwd)


def pallas_logit_stats(
    hidden, weight, bias=None, *, logit_softcap: Optional[float] = None, need_sum: bool = False,
    block_n: Optional[int] = None, block_v: Optional[int] = None, block_d: Optional[int] = None,
    filter_eps: Optional[float] = None, interpret: Optional[bool] = None, backward: str = "two_kernel",
) -> LogitStats:
    """:class:`LogitStats` ``[N]`` of ``softcap(hidden [N, D] @ weight [V, D].T + bias [V])``,
    by the fused Pallas kernels; the ``[N, V]`` logits never reach device memory.

    Any N, V, D and float dtype (bf16/fp16/fp32; fp32 accumulation, fp32 statistics; hidden
    and weight of different dtypes are both promoted to their common type; N=0 is fine);
    differentiable once in hidden, weight and bias (gradients in their dtypes; second-order and
    forward-mode derivatives raise NotImplementedError). Blocks: powers of two (defaults
    ``tiles.BLOCK_N/V/D``, ``BLOCK_V_F32/BLOCK_D_F32`` for fp32; capped to the padded size).
    ``filter_eps``: skip backward tiles whose softmax is below eps everywhere (CCE-style
    gradient filtering; approximate, error <= eps * |g_lse| per element); ignored when
    ``need_sum`` (the logit-sum cotangent makes every tile's gradient dense), exact when None.
    ``interpret``: None means interpret mode unless the default backend is a GPU.
    ``backward``: "two_kernel" (deterministic) or "atomic" (one kernel, fp32 atomic adds), see
    backward.py; or "xla": this forward with the blocked XLA backward of ``impl="xla"``
    (vocabulary blocks of 4096, matmuls by XLA; no filtering).
    """
    hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
    (n, d), (v, d_w) = hidden.shape, weight.shape
    if d != d_w or (bias is not None and jnp.shape(bias) != (v,)):
        raise ValueError(f"need hidden [N, D], weight [V, D], bias [V]; got {hidden.shape}, "
                         f"{weight.shape}, {None if bias is None else jnp.shape(bias)}")
    if filter_eps is not None and not filter_eps >= 0:
        raise ValueError(f"filter_eps must be >= 0, got {filter_eps}")
    if n == 0:
        return reference_logit_stats(hidden, weight, bias, logit_softcap=logit_softcap, need_sum=need_sum)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    dtype = jnp.promote_types(hidden.dtype, weight.dtype)  # Triton's dot wants one operand type
    hidden, weight = hidden.astype(dtype), weight.astype(dtype)
    p = plan(n, v, d, block_n=block_n, block_v=block_v, block_d=block_d,
             softcap=None if logit_softcap is None else float(logit_softcap),
             need_sum=bool(need_sum), filter_eps=None if need_sum or filter_eps is None else float(filter_eps),
             interpret=bool(interpret), backward=backward, itemsize=jnp.dtype(dtype).itemsize)
    if not p.interpret and max(p.n_pad, p.v_pad) * p.d_pad >= 2**31:
        raise ValueError(f"the Triton kernels index with int32: need N * D and V * D < 2**31, got "
                         f"N={n}, V={v}, D={d}; use impl='xla'")
    return _stats(hidden, weight, None if bias is None else jnp.asarray(bias), p)
