"""The ``impl="pallas"`` backend of the logit-statistics seam (ls_jax/logit_stats.py):
``forward`` and ``backward_fn(kind)`` in the :class:`ls_jax.logit_stats.Backend` signature,
composed into a differentiable function by ``ls_jax.dispatch``. The forward kernel is in
forward.py, the backward kernels (dh and dW, or one atomic kernel) in backward.py, the shared
tile and block plan in tiles.py.

The kernels/ folder is the package ``ls_jax.kernels``: pyproject.toml maps it for an install,
and the link ls_jax/kernels -> ../kernels for a plain checkout. It has no ``__init__.py``, so
the repository root never shadows a top-level ``kernels`` package of a dependency (Hugging
Face's, which transformers imports).

The head is ``[V, D]`` or ``[D, V]`` (``layout`` "vd" / "dv"); the kernels read it as it is, with
no transposed or padded copy, and write its gradient in that layout (a ragged head's last blocks
are masked loads, see ``tiles.head_block``). hidden and bias are padded with zeros to block
multiples (a no-op when N, V, D already are), the kernels run, and the padding is sliced off.
Off-GPU the kernels run in Pallas interpret mode (which pads the head to its blocks itself, with
NaN: the tests would see an unmasked load).
"""

import jax
import jax.numpy as jnp

from ls_jax.logit_stats import BlockSizes, vocab_axis

from .backward import backward as backward_kernels
from .forward import forward_partials, merge_splits
from .tiles import Plan, plan


def _pad(x, shape, value=0):
    """``x`` padded with ``value`` at the end of each axis up to ``shape`` (``x`` itself when equal)."""
    if x is None or x.shape == shape:
        return x
    return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)], constant_values=value)


def _first_order_only(kernels, plan_argnum):
    """``kernels`` with a JVP rule that raises a clear error: pallas_call has no derivative of its
    own, so ``impl="pallas"`` is differentiable once (reverse mode), not in forward mode nor
    twice (jax.jvp, jax.hessian, grad of grad)."""
    f = jax.custom_jvp(kernels, nondiff_argnums=(plan_argnum,))

    @f.defjvp
    def no_jvp(p, primals, tangents):
        raise NotImplementedError(
            "impl='pallas' is differentiable once (jax.grad, jax.vjp); for jax.jvp or second-order "
            "derivatives (jax.hessian, grad of grad) use impl='reference'"
        )

    return f


_forward_partials = _first_order_only(forward_partials, 4)
_backward = _first_order_only(backward_kernels, 9)


def _plan(hidden, weight, softcap, need_sum, blocks: BlockSizes, backward, interpret, layout) -> tuple:
    """Operands in their common dtype (Triton's dot wants one; float32 if ``blocks.precision`` asks
    for it, else the kernels' products take the inputs' dtype on every backend) and the static
    :class:`Plan`; ``interpret`` None: interpret mode unless the default backend is a GPU."""
    (n, d), v = hidden.shape, weight.shape[vocab_axis(layout)]
    dtype = jnp.float32 if blocks.precision == "float32" else jnp.promote_types(hidden.dtype, weight.dtype)
    interpret = jax.default_backend() != "gpu" if interpret is None else bool(interpret)
    p = plan(
        n,
        v,
        d,
        block_n=blocks.block_n,
        block_v=blocks.block_v,
        block_d=blocks.block_d,
        softcap=softcap,
        need_sum=need_sum,
        filter_eps=None if need_sum or blocks.filter_eps is None else float(blocks.filter_eps),
        interpret=interpret,
        backward=backward,
        itemsize=jnp.dtype(dtype).itemsize,
        layout=layout,
    )
    if not interpret and max(p.n_pad, p.v_pad) * p.d_pad >= 2**31:
        raise ValueError(
            f"the Triton kernels index with int32: need N * D and V * D < 2**31, got "
            f"N={n}, V={v}, D={d}; use impl='xla'"
        )
    return hidden.astype(dtype), weight.astype(dtype), p


def _padded(hidden, weight, bias, p: Plan):
    """hidden and bias padded to block multiples; the head as it is (the kernels mask its ragged blocks)."""
    return _pad(hidden, (p.n_pad, p.d_pad)), weight, _pad(bias, (p.v_pad,))


def forward(
    hidden,
    weight,
    bias,
    first,
    *,
    softcap: float | None,
    need_sum: bool,
    blocks: BlockSizes,
    layout: str = "vd",
    interpret: bool | None = None,
):
    """(lse, logit_sum, max_logit, prediction, lse_excl) ``[N]`` by the forward kernel (see
    forward.py); lse_excl leaves out class ``first [N]``; the head ``weight`` in ``layout``."""
    n = hidden.shape[0]
    if n == 0:
        return (jnp.zeros((0,), jnp.float32),) * 3 + (jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32))
    hidden, weight, p = _plan(hidden, weight, softcap, need_sum, blocks, "two_kernel", interpret, layout)
    parts = merge_splits(*_forward_partials(*_padded(hidden, weight, bias, p), _pad(first, (p.n_pad,)), p))
    return tuple(x[:n] for x in parts)


def backward_fn(kind: str, interpret: bool | None = None):
    """The float32 backward by ``kind``'s kernels: "two_kernel" (a dh and a dW kernel,
    deterministic) or "atomic" (one kernel, fp32 atomic adds); see backward.py. dW comes in the
    head's ``layout``."""

    def backward(
        hidden, weight, bias, lse, comp, g_lse, g_sum, ids, coef, *, softcap, blocks: BlockSizes, layout: str = "vd"
    ):
        n, shape = hidden.shape[0], weight.shape
        if n == 0:
            return (
                jnp.zeros(hidden.shape, jnp.float32),
                jnp.zeros(shape, jnp.float32),
                None if bias is None else jnp.zeros(bias.shape, jnp.float32),
            )
        hidden, weight, p = _plan(hidden, weight, softcap, g_sum is not None, blocks, kind, interpret, layout)
        rows = lambda x, value=0: _pad(x, (p.n_pad,), value)
        cols = lambda x: _pad(x.T, (x.shape[1], p.n_pad))
        dh, dw, db = _backward(
            *_padded(hidden, weight, bias, p),
            rows(lse, jnp.inf),
            rows(comp),
            rows(g_lse),
            None if g_sum is None else rows(g_sum),
            cols(ids),
            cols(coef),
            p,
        )
        return dh[:n, : p.d], dw[: shape[0], : shape[1]], None if bias is None else db[: p.v]

    return backward
