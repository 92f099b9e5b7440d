"""What every kernel shares: the static plan (block sizes, padded shapes) and one logit tile.

Arrays reach the kernels padded to block multiples (see ``plan``): hidden ``[n_pad, d_pad]``,
bias ``[v_pad]``, zeros in the padding; except the head, ``[v, d]`` or ``[d, v]`` unpadded
(``Plan.layout`` "vd" / "dv": read in its own layout, its gradient written in it; ``head_block``
masks the loads beyond V and D), its BlockSpecs sized as if it were ``p.head(v_pad, d_pad)``.
Padded vocabulary columns are masked inside the kernels (-inf logits, zero gradient); padded
token rows get zero cotangents. In the kernels' docs, ``bn``, ``bv`` and ``bd`` are a kernel's
``Plan.block_n``, ``block_v`` and ``block_d``.
"""

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ls_jax.logit_stats import LAYOUTS, apply_softcap, head_index, head_logits

# Defaults sized for an H100 (Triton lowering: power-of-two blocks, dot dims >= 16). Checked by
# compiling the kernels' Triton IR for sm_90 (kernels/NOTES.md): bf16 at 64 x 256 x 64 and fp32
# (IEEE dots, no tensor cores) at 64 x 128 x 32 use no spills with 8 warps, and their shared
# memory fits 227 KB with 3 pipeline stages (bf16; 2 for fp32 and the atomic kernel).
BLOCK_N, BLOCK_V, BLOCK_D = 64, 256, 64
BLOCK_V_F32, BLOCK_D_F32 = 128, 32
NUM_WARPS = 8
MIN_BLOCK = 16
BACKWARDS = ("two_kernel", "atomic")  # see backward.py
# The forward splits the vocabulary until there are about this many programs (2 per SM on H100).
TARGET_PROGRAMS = 264


class Plan(NamedTuple):
    """Static description of one call: true sizes, block sizes, padded sizes, options (hashable).

    Blocks are named by kernel, as JAX's Pallas attention names its backward blocks: ``block_n``
    x ``block_v`` is the tile of the forward and dh kernels, ``block_n_dw`` x ``block_v_dw`` the
    tile of the dW kernel (:meth:`for_dw` gives the plan with that tile as ``block_n`` x ``block_v``).
    """

    n: int
    v: int
    d: int
    block_n: int  # token rows per tile (forward and dh kernel)
    block_v: int  # vocabulary rows per tile (forward and dh kernel)
    block_d: int  # D chunk of every matmul
    block_n_dw: int  # token rows per tile in the dW kernel
    block_v_dw: int  # vocabulary rows per tile in the dW kernel
    n_pad: int
    v_pad: int
    d_pad: int
    splits: int  # forward vocabulary splits (grid axis 1); divides v_pad // block_v
    softcap: float | None
    need_sum: bool
    filter_eps: float | None
    interpret: bool
    backward: str  # one of BACKWARDS
    num_stages: int  # Triton software-pipelining depth (the atomic kernel uses 2)
    layout: str  # the head's layout, one of ls_jax.logit_stats.LAYOUTS

    @property
    def compiler_params(self):
        """Triton's warps and stages; LS_JAX_NUM_WARPS / LS_JAX_NUM_STAGES override them (a
        register or shared-memory failure on a GPU can be retried without an edit)."""
        warps = int(os.environ.get("LS_JAX_NUM_WARPS", NUM_WARPS))
        stages = int(os.environ.get("LS_JAX_NUM_STAGES", self.num_stages))
        return plgpu.CompilerParams(num_warps=warps, num_stages=stages)

    def head(self, v, d) -> tuple:
        """``(v, d)`` (shape, index or block index) in the order of the head's axes."""
        return head_index(v, d, self.layout)

    def for_dw(self) -> "Plan":
        """The plan as the dW kernel sees it: its tile ``block_n_dw x block_v_dw`` as ``block_n x block_v``."""
        return self._replace(block_n=self.block_n_dw, block_v=self.block_v_dw)


def _block(requested, default, size, name):
    """Power-of-two block for an axis of length ``size``: requested (or default), at most needed."""
    b = int(default if requested is None else requested)
    if b < 1 or b & (b - 1):
        raise ValueError(f"{name} must be a power of two, got {b}")
    return min(b, max(MIN_BLOCK, pl.next_power_of_2(size)))


def plan(
    n,
    v,
    d,
    *,
    block_n=None,
    block_v=None,
    block_d=None,
    block_n_dw=None,
    block_v_dw=None,
    softcap=None,
    need_sum=False,
    filter_eps=None,
    interpret=False,
    backward="two_kernel",
    itemsize=2,
    layout="vd",
) -> Plan:
    """Blocks and padded sizes for hidden ``[n, d]`` and a head of ``v`` classes (``[v, d]`` or
    ``[d, v]`` by ``layout``) of ``itemsize`` bytes.

    The forward and dh kernels use ``block_n x block_v`` tiles and stream vocabulary blocks. The
    dW kernel streams token blocks, so its streamed block is the large one: by default its token
    block ``block_n_dw`` is ``block_v`` and its vocabulary block ``block_v_dw`` is ``block_n``, and
    both backward kernels re-read their fp32 accumulator slab equally rarely.

    Raises:
      ValueError: a block that is not a power of two, an unknown ``backward`` or ``layout``.
    """
    wide = itemsize >= 4
    block_v = (BLOCK_V_F32 if wide else BLOCK_V) if block_v is None else block_v
    block_d = (BLOCK_D_F32 if wide else BLOCK_D) if block_d is None else block_d
    block_n_dw = block_v if block_n_dw is None else block_n_dw
    block_v_dw = block_n if block_v_dw is None else block_v_dw
    bn, bv, bd = (
        _block(block_n, BLOCK_N, n, "block_n"),
        _block(block_v, BLOCK_V, v, "block_v"),
        _block(block_d, BLOCK_D, d, "block_d"),
    )
    bn_dw, bv_dw = _block(block_n_dw, BLOCK_V, n, "block_n_dw"), _block(block_v_dw, BLOCK_N, v, "block_v_dw")
    n_pad, v_pad = pl.cdiv(n, max(bn, bn_dw)) * max(bn, bn_dw), pl.cdiv(v, max(bv, bv_dw)) * max(bv, bv_dw)
    d_pad = pl.cdiv(d, bd) * bd
    v_blocks, want = v_pad // bv, pl.cdiv(TARGET_PROGRAMS, n_pad // bn)
    splits = max(s for s in range(1, min(want, v_blocks) + 1) if v_blocks % s == 0)
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return Plan(
        n=n,
        v=v,
        d=d,
        block_n=bn,
        block_v=bv,
        block_d=bd,
        block_n_dw=bn_dw,
        block_v_dw=bv_dw,
        n_pad=n_pad,
        v_pad=v_pad,
        d_pad=d_pad,
        splits=splits,
        softcap=softcap,
        need_sum=need_sum,
        filter_eps=filter_eps,
        interpret=interpret,
        backward=backward,
        num_stages=2 if wide else 3,
        layout=layout,
    )


def spec_for(x, spec):
    """``spec`` for an input or output ``x``; None when ``x`` is None (absent: bias, the logit-sum
    cotangent). pallas_call then passes None in the kernel's place for its ref, as JAX's Pallas
    ops do for an absent input (e.g. segment ids in ``jax.experimental.pallas.ops.gpu.attention``)."""
    return None if x is None else spec


def dot_precision(dtype):
    """float32 inputs: true fp32 products (Triton would use tf32 by default); bf16/fp16: default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def head_block(w_ref, w_row, w_col0, cols, p: Plan):
    """The head's classes ``[w_row, w_row + bv)`` of the ref (``w_col0``: the global index of
    ``w_row``) x the D chunk ``cols``, ``p.head(bv, bd)`` as it lies. The head reaches the kernels
    unpadded: beyond V and D (a ragged last block) the load is masked to 0."""
    at = p.head(pl.ds(w_row, p.block_v), cols)
    if p.v == p.v_pad and p.d == p.d_pad:
        return w_ref[at]
    in_v = w_col0 + jax.lax.iota(jnp.int32, p.block_v) < p.v
    in_d = cols.start + jax.lax.iota(jnp.int32, p.block_d) < p.d
    rows, columns = p.head(in_v, in_d)
    return plgpu.load(w_ref.at[at], mask=rows[:, None] & columns[None, :], other=0)


def logit_tile(h_ref, w_ref, b_ref, h_row, w_row, w_col0, p: Plan):
    """float32 tiles for hidden rows ``[h_row, h_row + bn)`` x head classes ``[w_row, w_row + bv)``
    (the rows of the refs as passed; ``w_col0`` is the global vocabulary index of class
    ``w_row``): the capped logits ``z = softcap(h @ W.T + b)`` ([bn, bv], the matmul summed over
    D in ``bd`` chunks, the head block ``[bv, bd]`` or ``[bd, bv]`` as it lies) and ``valid``
    ([1, bv] bool, False on padded vocabulary columns)."""
    prec = dot_precision(h_ref.dtype)

    def chunk(k, acc):
        cols = pl.ds(pl.multiple_of(k * p.block_d, p.block_d), p.block_d)
        h = h_ref[pl.ds(h_row, p.block_n), cols]
        return acc + head_logits(h, head_block(w_ref, w_row, w_col0, cols, p), p.layout, prec)

    raw = jax.lax.fori_loop(0, p.d_pad // p.block_d, chunk, jnp.zeros((p.block_n, p.block_v), jnp.float32))
    if b_ref is not None:
        raw = raw + b_ref[pl.ds(w_row, p.block_v)].astype(jnp.float32)[None, :]
    z = apply_softcap(raw, p.softcap)
    valid = (w_col0 + jax.lax.broadcasted_iota(jnp.int32, (1, p.block_v), 1)) < p.v
    return z, valid
