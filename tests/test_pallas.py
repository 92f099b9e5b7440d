"""The Pallas kernels (interpret mode on CPU) against the dense oracle
``ls_jax.reference.logit_stats``, and their lowering to Triton for CUDA.

Unwritten outputs cannot pass: in interpret mode Pallas fills every output buffer with NaN
(floats) / iinfo.min (ints) before the kernel runs (checked below), every output element is
compared with the oracle, and all outputs must be finite.
"""

import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from problems import make_problem as random_problem

from ls_jax import reference, xla
from ls_jax.kernels import fused, tiles
from ls_jax.logit_stats import Backend, BlockSizes, dense_logits, two_pass

SMALL_BLOCKS = dict(block_n=16, block_v=64, block_d=16)
cuda_lowering = pytest.mark.skipif(
    jax.__version_info__ >= (0, 11) and jax.default_backend() != "gpu",
    reason="jax >= 0.11 refuses to lower for CUDA on a machine without a GPU",
)


def pallas_stats(
    h,
    w,
    b=None,
    ids=None,
    tw=None,
    *,
    logit_softcap=None,
    need_sum=False,
    backward="two_kernel",
    interpret=None,
    layout="vd",
    **blocks,
):
    """The seam's LogitStats by the Pallas forward and ``backward``'s kernels ("xla": the blocked
    XLA backward) for the head ``w`` in ``layout``; no target unless ``ids`` / ``tw`` [N, K] are given."""
    bwd = xla.backward if backward == "xla" else fused.backward_fn(backward, interpret)
    f = two_pass(Backend(partial(fused.forward, interpret=interpret), bwd))
    return f(
        h,
        w,
        b,
        *_targets(h, ids, tw),
        softcap=logit_softcap,
        need_sum=need_sum,
        blocks=BlockSizes(**blocks),
        layout=layout,
    )


def reference_stats(h, w, b=None, ids=None, tw=None, *, logit_softcap=None, need_sum=False, layout="vd"):
    return reference.logit_stats(
        h, w, b, *_targets(h, ids, tw), softcap=logit_softcap, need_sum=need_sum, layout=layout
    )


def _targets(h, ids, tw):
    n = h.shape[0]
    return (jnp.zeros((n, 1), jnp.int32), jnp.zeros((n, 1))) if ids is None else (ids, tw)


pallas_jit = jax.jit(
    pallas_stats,
    static_argnames=("logit_softcap", "need_sum", "block_n", "block_v", "block_d", "filter_eps", "backward", "layout"),
)


def make_problem(n, d, v, dtype, seed):
    """hidden [n, d], weight [v, d], bias [v], soft targets ids / tw [n, 2] and cotangents
    g_lse, g_sum, g_target [n] (float32)."""
    h, w, b, (ids, tw) = random_problem(n, d, v, dtype, seed=seed, soft=2)
    g = jax.random.normal(jax.random.key(seed + 1), (3, n))
    return h, w, b, ids, tw, g


def stats_and_vjp(fn, h, w, b, ids, tw, g, **kw):
    """Statistics and (dh, dw, db) for cotangents g = (g_lse, g_sum, g_target) [3, n]."""
    stats, vjp = jax.vjp(lambda h, w, b: fn(h, w, b, ids, tw, **kw), h, w, b)
    ct = stats._replace(
        lse=g[0],
        logit_sum=g[1],
        target=g[2],
        max_logit=jnp.ones_like(g[0]),
        prediction=np.zeros(g[0].shape, jax.dtypes.float0),
    )
    return stats, vjp(ct)


def check_finite_and_close(actual, expected, rel):
    """Every element finite and within ``rel`` times the oracle's largest magnitude."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * np.abs(expected).max())


def test_interpret_mode_poisons_outputs():
    """The premise of the poison argument: an output the kernel never writes comes back NaN."""
    out = pl.pallas_call(
        lambda x_ref, o_ref, i_ref: None,
        interpret=True,
        out_shape=(jax.ShapeDtypeStruct((8,), jnp.float32), jax.ShapeDtypeStruct((8,), jnp.int32)),
    )(jnp.ones(8))
    assert np.isnan(out[0]).all() and (out[1] == np.iinfo(np.int32).min).all()


ATOMIC, XLA_BWD = dict(backward="atomic"), dict(backward="xla")
CASES = [
    # n, d, v, dtype, bias, softcap, need_sum, options
    (77, 96, 1000, jnp.float32, True, None, False, dict(block_n=16, block_v=128, block_d=32)),
    (77, 96, 1000, jnp.float32, True, 5.0, True, dict(block_n=16, block_v=128, block_d=32, **ATOMIC)),
    (29, 24, 200, jnp.float32, False, None, True, SMALL_BLOCKS),
    (29, 24, 200, jnp.float32, False, 2.0, False, SMALL_BLOCKS),
    (29, 24, 200, jnp.float32, True, 3.0, True, SMALL_BLOCKS),
    (29, 24, 200, jnp.float32, False, None, False, dict(SMALL_BLOCKS, **ATOMIC)),
    (21, 24, 50, jnp.float32, True, None, True, {}),  # default blocks, one vocabulary block
    # block_v < the dW kernel's vocabulary block (block_n): v_pad = 16, so the last of the four
    # forward splits holds padded columns only
    (10, 8, 10, jnp.float32, True, None, True, dict(block_v=4)),
    (29, 24, 200, jnp.bfloat16, True, None, True, SMALL_BLOCKS),
    (29, 24, 200, jnp.bfloat16, False, 4.0, True, SMALL_BLOCKS),
    (29, 24, 200, jnp.bfloat16, True, None, False, dict(SMALL_BLOCKS, **ATOMIC)),
    (29, 24, 200, jnp.bfloat16, True, 4.0, True, dict(SMALL_BLOCKS, **XLA_BWD)),
]


@pytest.mark.parametrize("n,d,v,dtype,bias,softcap,need_sum,options", CASES)
def test_matches_dense_reference(n, d, v, dtype, bias, softcap, need_sum, options):
    h, w, b, ids, tw, g = make_problem(n, d, v, dtype, seed=n + v)
    b = b if bias else None
    kw = dict(logit_softcap=softcap, need_sum=need_sum)
    got, grads = stats_and_vjp(pallas_jit, h, w, b, ids, tw, g, **kw, **options)
    want, want_grads = stats_and_vjp(reference_stats, h, w, b, ids, tw, g, **kw)

    check_finite_and_close(got.lse, want.lse, 1e-5)
    check_finite_and_close(got.max_logit, want.max_logit, 1e-5)
    check_finite_and_close(got.logit_sum, want.logit_sum, 1e-5)
    check_finite_and_close(got.target, want.target, 1e-5)
    assert not need_sum or np.abs(want.logit_sum).min() > 0  # the sum was really computed
    # argmax: an index in range whose oracle logit is the oracle max (robust to near-ties).
    z = np.asarray(dense_logits(h, w, b, softcap))
    arg = np.asarray(got.prediction)
    assert got.prediction.dtype == jnp.int32 and ((arg >= 0) & (arg < v)).all()
    np.testing.assert_allclose(z[np.arange(n), arg], z.max(-1), rtol=1e-5, atol=1e-5)

    rel = 1e-5 if dtype == jnp.float32 else 3e-2  # bf16: dz is rounded to bf16 before the matmuls
    for name, g, wg in zip(("hidden", "weight", "bias"), grads, want_grads):
        if wg is None:
            assert g is None
            continue
        assert g.dtype == dtype, name
        check_finite_and_close(g, wg, rel)


# ragged V and odd N, D (padded); both dtypes, bias or not, softcap, sum, every backward
DV_CASES = [CASES[i] for i in (0, 1, 7, 9, 11)]


@pytest.mark.parametrize("n,d,v,dtype,bias,softcap,need_sum,options", DV_CASES)
def test_dv_head_equals_vd_head_and_reference(n, d, v, dtype, bias, softcap, need_sum, options):
    """The head as ``[D, V]`` (layout "dv", read and differentiated in place by the kernels): the
    statistics and gradients of the same head as ``[V, D]``, its gradient ``[D, V]``, and the dense
    oracle's on the ``[D, V]`` head."""
    h, w, b, ids, tw, g = make_problem(n, d, v, dtype, seed=n + v)
    b = b if bias else None
    kw = dict(logit_softcap=softcap, need_sum=need_sum)
    vd, vd_grads = stats_and_vjp(pallas_jit, h, w, b, ids, tw, g, **kw, **options)
    dv, dv_grads = stats_and_vjp(pallas_jit, h, w.T, b, ids, tw, g, layout="dv", **kw, **options)
    want, want_grads = stats_and_vjp(reference_stats, h, w.T, b, ids, tw, g, layout="dv", **kw)
    for name in ("lse", "logit_sum", "target", "max_logit"):
        check_finite_and_close(getattr(dv, name), getattr(vd, name), 1e-6)
        check_finite_and_close(getattr(dv, name), getattr(want, name), 1e-5)
    np.testing.assert_array_equal(dv.prediction, vd.prediction)
    assert dv_grads[1].shape == (d, v) and dv_grads[1].dtype == dtype
    rel = 1e-5 if dtype == jnp.float32 else 3e-2
    for got, same, wg in zip(dv_grads, (vd_grads[0], vd_grads[1].T, vd_grads[2]), want_grads):
        if wg is None:
            assert got is None
            continue
        check_finite_and_close(got, same, 1e-6)
        check_finite_and_close(got, wg, rel)


def test_mixed_dtypes_and_empty_batch():
    """bf16 hidden with fp32 weight (mixed precision): computed in fp32, gradients in the
    inputs' dtypes; and N=0 gives empty statistics and gradients."""
    h, w, b, ids, tw, g = make_problem(29, 24, 200, jnp.float32, seed=11)
    h = h.astype(jnp.bfloat16)
    got, grads = stats_and_vjp(pallas_jit, h, w, b, ids, tw, g, need_sum=True, **SMALL_BLOCKS)
    want, want_grads = stats_and_vjp(reference_stats, h, w, b, ids, tw, g, need_sum=True)
    check_finite_and_close(got.lse, want.lse, 1e-5)
    for g, wg in zip(grads, want_grads):
        assert g.dtype == wg.dtype
        check_finite_and_close(g, wg, 1e-2 if g.dtype == jnp.bfloat16 else 1e-5)
    empty = jax.grad(lambda h: pallas_stats(h, w).lse.sum())(jnp.ones((0, 24)))
    assert empty.shape == (0, 24)


@cuda_lowering
def test_mixed_dtypes_lower_to_triton_for_cuda():
    assert _lowered_triton_calls(77, 96, 1000, (jnp.bfloat16, jnp.float32), True, None, True, None) == 3


@pytest.mark.parametrize("backward", ["two_kernel", "atomic"])
def test_minus_inf_bias_on_whole_blocks(backward):
    """Classes masked with a -inf bias (never predicted) filling whole vocabulary blocks and
    splits: finite statistics and gradients equal to the oracle's."""
    h, w, b, ids, tw, g = make_problem(29, 24, 200, jnp.float32, seed=5)
    b = b.at[:80].set(-jnp.inf)
    ids = 80 + ids % 120  # targets are never masked classes
    got, grads = stats_and_vjp(pallas_jit, h, w, b, ids, tw, g, backward=backward, **SMALL_BLOCKS)
    want, want_grads = stats_and_vjp(reference_stats, h, w, b, ids, tw, g)
    check_finite_and_close(got.lse, want.lse, 1e-5)
    check_finite_and_close(got.max_logit, want.max_logit, 1e-5)
    assert (np.asarray(got.prediction) >= 80).all()
    for g, wg in zip(grads, want_grads):
        check_finite_and_close(g, wg, 1e-5)


def test_second_order_derivatives_raise_a_clear_error():
    """The kernels are differentiable once (custom_vjp); jax.hessian (forward over reverse) and
    grad of grad (reverse over reverse) name the limitation instead of failing inside Pallas."""
    h, w, _, _ = random_problem(5, 8, 20, seed=2)
    loss = lambda h, w: pallas_stats(h, w, need_sum=True).lse.sum()
    with pytest.raises(NotImplementedError, match="differentiable once"):
        jax.hessian(loss)(h, w)
    with pytest.raises(NotImplementedError, match="differentiable once"):
        jax.grad(lambda w: jax.grad(loss)(h, w).sum())(w)


@pytest.mark.parametrize("target_programs", [1, 10**6])
def test_argmax_ties_pick_lowest_index_across_blocks_and_splits(target_programs, monkeypatch):
    """Tied rows in one split (several blocks per program: target 1 gives one split) and in
    different splits (a huge target gives one block per split)."""
    monkeypatch.setattr(tiles, "TARGET_PROGRAMS", target_programs)
    n, d, v = 19, 32, 700
    h, w, _, _ = random_problem(n, d, v, seed=3)
    u = jax.random.normal(jax.random.key(4), (d,))
    h = u + 0.1 * h  # logit u . h ~ d = 32 for every token, far above the others (std ~ 3)
    w = w.at[jnp.array([130, 5, 611])].set(u)  # identical rows in different blocks and splits
    got = pallas_stats(h, w, **SMALL_BLOCKS)
    assert (np.asarray(got.prediction) == 5).all()
    check_finite_and_close(got.max_logit, reference_stats(h, w).max_logit, 1e-6)


def test_filter_eps():
    """eps=0 is exact (bitwise equal to no filtering); a small eps stays close to the oracle; a
    large eps really drops tiles (so the checks are not vacuous) unless need_sum, where
    filtering is off."""
    h, w, b, ids, tw, g = make_problem(21, 24, 200, jnp.float32, seed=7)
    h = h * 3  # peaked softmax: most tiles are far below eps
    run = lambda **kw: stats_and_vjp(pallas_jit, h, w, b, ids, tw, g, **SMALL_BLOCKS, **kw)[1]
    for x, y in zip(run(filter_eps=0.0), run()):
        np.testing.assert_array_equal(x, y)
    want = stats_and_vjp(reference_stats, h, w, b, ids, tw, g)[1]
    for x, y in zip(run(filter_eps=1e-6, **ATOMIC), want):
        check_finite_and_close(x, y, 1e-4)
    coarse = run(filter_eps=0.5)
    assert not np.allclose(coarse[1], want[1], rtol=1e-2, atol=1e-2 * np.abs(want[1]).max())
    want_sum = stats_and_vjp(reference_stats, h, w, b, ids, tw, g, need_sum=True)[1]
    for x, y in zip(run(filter_eps=0.5, need_sum=True), want_sum):
        check_finite_and_close(x, y, 1e-5)


def _lowered_text(n, d, v, dtype, bias, softcap, need_sum, filter_eps, backward="two_kernel", layout="vd"):
    """value_and_grad's CUDA lowering (StableHLO text) for the hidden ``[n, d]`` (%arg0), the head
    in ``layout`` (%arg1) and the bias ``[v]``; dtype, or (hidden, weight) dtypes."""

    def loss(h, w, b):
        s = pallas_stats(
            h,
            w,
            b,
            jnp.zeros((h.shape[0], 1), jnp.int32),
            jnp.ones((h.shape[0], 1)),
            logit_softcap=softcap,
            need_sum=need_sum,
            filter_eps=filter_eps,
            interpret=False,
            backward=backward,
            layout=layout,
        )
        return (s.lse + s.logit_sum - s.target).sum()

    h_dtype, w_dtype = dtype if isinstance(dtype, tuple) else (dtype, dtype)
    args = (
        jax.ShapeDtypeStruct((n, d), h_dtype),
        jax.ShapeDtypeStruct((v, d) if layout == "vd" else (d, v), w_dtype),
        jax.ShapeDtypeStruct((v,), w_dtype) if bias else None,
    )
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2) if bias else (0, 1))).trace(*args)
    return lowered.lower(lowering_platforms=("cuda",)).as_text()


def _lowered_triton_calls(*args, **kw):
    """Triton kernel calls in ``_lowered_text``."""
    return _lowered_text(*args, **kw).count("xla.gpu.triton")


@cuda_lowering
@pytest.mark.parametrize("backward,kernels", [("two_kernel", 3), ("atomic", 2), ("xla", 1)])
@pytest.mark.parametrize("layout", ["vd", "dv"])
@pytest.mark.parametrize("n,d,v", [(64, 256, 1024), (77, 96, 1000)])  # block multiples; ragged N, D, V
def test_head_reaches_the_kernels_as_given(n, d, v, layout, backward, kernels):
    """No copy of the head in either layout, also when it is ragged, in the CUDA lowering of
    value_and_grad (bf16): every Triton kernel takes the weight argument itself (%arg1), and no
    2-D tensor of the head's size but the head (and its gradient) exists: no transposed or padded
    copy; float32 ones (the kernels' gradient, padded to the blocks) lie in the head's layout."""
    text = _lowered_text(n, d, v, jnp.bfloat16, True, None, True, None, backward, layout)
    calls = [re.search(r"triton\(([^)]*)\)", line) for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
    assert len(calls) == kernels and all(c.group(1).split(", ")[1] == "%arg1" for c in calls), calls
    head = (v, d) if layout == "vd" else (d, v)
    big = {
        (int(a), int(b), t) for a, b, t in re.findall(r"tensor<(\d+)x(\d+)x(\w+)>", text) if int(a) * int(b) >= v * d
    }
    assert head + ("bf16",) in big and head + ("f32",) in big
    for a, b, dtype in big:
        rows, cols = (a, b) if layout == "vd" else (b, a)
        assert rows >= v and cols >= d and (dtype == "f32" or (a, b) == head), (a, b, dtype)


@cuda_lowering
@pytest.mark.parametrize("backward,kernels", [("two_kernel", 3), ("atomic", 2), ("xla", 1)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(
    "softcap,need_sum,filter_eps",
    [(None, False, None), (None, False, 1e-5), (None, True, None), (30.0, True, None), (30.0, False, 1e-5)],
)
@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_lowers_to_triton_for_cuda(dtype, bias, softcap, need_sum, filter_eps, backward, kernels, layout):
    """Every shipped configuration (default H100 blocks, either head layout) lowers to Triton for
    the GPU from this CPU machine: the forward kernel plus dh and dW kernels (two_kernel), one
    (atomic) or none (xla: the blocked XLA backward)."""
    assert _lowered_triton_calls(77, 96, 1000, dtype, bias, softcap, need_sum, filter_eps, backward, layout) == kernels


@cuda_lowering
@pytest.mark.parametrize("backward,kernels", [("two_kernel", 3), ("atomic", 2)])
@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_lowers_at_gemma_head_shape(backward, kernels, layout):
    assert (
        _lowered_triton_calls(8192, 2304, 256000, jnp.bfloat16, False, None, False, None, backward, layout) == kernels
    )


@cuda_lowering
def test_refuses_int32_overflowing_shapes_on_gpu():
    with pytest.raises(ValueError, match="int32"):
        _lowered_triton_calls(64, 8192, 262144, jnp.bfloat16, False, None, False, None)
