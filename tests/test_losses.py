"""The public losses against independent oracles: optax, PyTorch autograd, jax.grad of the
dense reference, and the blocked XLA path against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import IGNORE, make_problem

from ls_jax import linear_smoothed_cross_entropy, smoothed_cross_entropy
from ls_jax.dispatch import IMPLS
from ls_jax.logit_stats import BlockSizes


def to_torch(x):
    return torch.tensor(np.asarray(x, np.float64), requires_grad=True)


def linear_loss_and_grads(impl, h, w, b, labels, **kw):
    def f(h, w, b):
        return linear_smoothed_cross_entropy(h, w, labels, bias=b, impl=impl, **kw)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, b)


def assert_close(actual, expected, rtol, atol):
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- dense logits vs optax / torch


@pytest.mark.parametrize("a", [0.0, 0.1, 1.0])
def test_dense_int_labels_match_optax(a):
    k = jax.random.split(jax.random.key(1), 2)
    logits = jax.random.normal(k[0], (3, 5, 37)) * 4
    y = jax.random.randint(k[1], (3, 5), 0, 37)
    expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(y, 37), a))
    assert_close(smoothed_cross_entropy(logits, y, label_smoothing=a), expected, 1e-5, 1e-5)


def test_dense_soft_labels_and_where_match_optax():
    k = jax.random.split(jax.random.key(2), 3)
    logits = jax.random.normal(k[0], (4, 6, 11)) * 3
    q = jax.nn.softmax(jax.random.normal(k[1], (4, 6, 11)))
    where = jax.random.bernoulli(k[2], 0.7, (4, 6))
    expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(q, 0.2), where=where)
    ours = smoothed_cross_entropy(logits, q, label_smoothing=0.2, where=where)
    assert_close(ours, jnp.where(where, expected, 0.0), 1e-5, 1e-5)


def test_dense_sparse_soft_labels_equal_dense_targets():
    k = jax.random.split(jax.random.key(3), 3)
    logits = jax.random.normal(k[0], (7, 13))
    ids = jax.random.randint(k[1], (7, 3), 0, 13)
    weights = jax.nn.softmax(jax.random.normal(k[2], (7, 3)))
    dense = jnp.zeros((7, 13)).at[jnp.arange(7)[:, None], ids].add(weights)
    sparse = smoothed_cross_entropy(logits, (ids, weights), label_smoothing=0.1)
    assert_close(sparse, smoothed_cross_entropy(logits, dense, label_smoothing=0.1), 1e-6, 1e-6)


def test_unnormalised_soft_labels_with_duplicate_ids_match_optax():
    """Weights not summing to 1 and repeated ids: -sum q log p against the target as given
    (duplicates add up), q = optax.smooth_labels(t, a); dense, sparse and the fused path."""
    k = jax.random.split(jax.random.key(4), 3)
    h, w, b, _ = make_problem(6, 5, 9, seed=4)
    ids = jax.random.randint(k[0], (6, 4), 0, 9).at[:, 1].set(2).at[:, 3].set(2)
    weights = jax.random.uniform(k[1], (6, 4), minval=0.1, maxval=1.5)
    t = jnp.zeros((6, 9)).at[jnp.arange(6)[:, None], ids].add(weights)
    logits = h @ w.T + b
    expected = optax.softmax_cross_entropy(logits, optax.smooth_labels(t, 0.3))
    assert_close(smoothed_cross_entropy(logits, t, label_smoothing=0.3), expected, 1e-5, 1e-5)
    assert_close(smoothed_cross_entropy(logits, (ids, weights), label_smoothing=0.3), expected, 1e-5, 1e-5)
    fused = linear_smoothed_cross_entropy(
        h, w, (ids, weights), bias=b, label_smoothing=0.3, impl="xla", blocks=BlockSizes(block_v=4), reduction="none"
    )
    assert_close(fused, expected, 1e-5, 1e-5)


def test_gradient_in_dense_targets_matches_optax():
    """Differentiable in the target distribution too (distillation), zero entries included."""
    k = jax.random.split(jax.random.key(5), 2)
    logits = jax.random.normal(k[0], (4, 7)) * 3
    q = jax.nn.softmax(jax.random.normal(k[1], (4, 7))).at[:, 2].set(0.0)
    ours = jax.grad(lambda q: smoothed_cross_entropy(logits, q, label_smoothing=0.2).sum())(q)
    expected = jax.grad(lambda q: optax.softmax_cross_entropy(logits, optax.smooth_labels(q, 0.2)).sum())(q)
    assert_close(ours, expected, 1e-5, 1e-6)


def test_zero_target_weight_on_a_minus_inf_logit_counts_zero():
    """A class masked by a -inf logit with target weight 0 (dense zeros, sparse padding, a
    weight-0 entry) adds 0 (0 log 0 = 0), as with hard labels; float64 oracle."""
    z = jax.random.normal(jax.random.key(0), (3, 5)).at[:, 0].set(-jnp.inf)
    q = jnp.zeros((3, 5)).at[:, 1].set(0.7).at[:, 2].set(0.3)
    z64 = np.asarray(z, np.float64)
    log_p = z64 - np.log(np.exp(z64).sum(-1, keepdims=True))
    expected = -(np.asarray(q, np.float64)[:, 1:] * log_p[:, 1:]).sum(-1)
    sparse = (jnp.array([[1, 2, IGNORE]] * 3), jnp.array([[0.7, 0.3, 0.5]] * 3))
    with_zero = (jnp.array([[1, 2, 0]] * 3), jnp.array([[0.7, 0.3, 0.0]] * 3))
    for labels in (q, sparse, with_zero):
        loss, grad = jax.value_and_grad(lambda z: smoothed_cross_entropy(z, labels).sum())(z)
        assert_close(smoothed_cross_entropy(z, labels), expected, 1e-6, 1e-6)
        assert bool(jnp.all(grad[:, 0] == 0)) and bool(jnp.all(jnp.isfinite(grad)))
    h, w, b, _ = make_problem(3, 4, 5)
    b = b.at[0].set(-jnp.inf)
    expected = smoothed_cross_entropy(h @ w.T + b, q).sum()
    for impl in IMPLS:
        loss, grads = linear_loss_and_grads(impl, h, w, b, sparse, reduction="sum")
        assert_close(loss, expected, 1e-5, 1e-5)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dense_matches_torch_with_ignore_index(reduction):
    k = jax.random.split(jax.random.key(4), 2)
    logits = jax.random.normal(k[0], (77, 1000)) * 3
    y = jax.random.randint(k[1], (77,), 0, 1000).at[::5].set(IGNORE)
    ours, grad = jax.value_and_grad(lambda z: smoothed_cross_entropy(z, y, label_smoothing=0.1, reduction=reduction))(
        logits
    )
    zt = to_torch(logits)
    ref = F.cross_entropy(
        zt, torch.tensor(np.asarray(y, np.int64)), label_smoothing=0.1, ignore_index=IGNORE, reduction=reduction
    )
    ref.backward()
    assert_close(ours, ref.item(), 1e-5, 1e-5)
    assert_close(grad, zt.grad, 1e-5, 1e-7)


def test_dense_soft_targets_match_torch():
    k = jax.random.split(jax.random.key(5), 2)
    logits = jax.random.normal(k[0], (9, 3)) * 2
    q = jax.nn.softmax(jax.random.normal(k[1], (9, 3)) * 2)
    ours = smoothed_cross_entropy(logits, q, label_smoothing=0.1, reduction="mean")
    ref = F.cross_entropy(to_torch(logits), torch.tensor(np.asarray(q, np.float64)), label_smoothing=0.1)
    assert_close(ours, ref.item(), 1e-6, 1e-6)


def test_dense_z_loss_and_softcap_follow_the_formula():
    k = jax.random.split(jax.random.key(6), 2)
    logits = jax.random.normal(k[0], (8, 21)) * 20
    y = jax.random.randint(k[1], (8,), 0, 21)
    capped = 5.0 * jnp.tanh(logits / 5.0)
    lse = jax.nn.logsumexp(capped, -1)
    q = optax.smooth_labels(jax.nn.one_hot(y, 21), 0.3)
    expected = -(q * jax.nn.log_softmax(capped)).sum(-1) + 1e-2 * lse**2
    ours = smoothed_cross_entropy(logits, y, label_smoothing=0.3, z_loss=1e-2, logit_softcap=5.0)
    assert_close(ours, expected, 1e-5, 1e-5)


# ---------------------------------------------------------------- fused linear loss


def test_linear_reference_is_dense_loss_of_the_logits():
    h, w, b, y = make_problem(33, 16, 50, masked=4)
    fused = linear_smoothed_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, impl="reference", reduction="none")
    assert_close(fused, smoothed_cross_entropy(h @ w.T + b, y, label_smoothing=0.1), 1e-5, 1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_torch_autograd(with_bias):
    h, w, b, y = make_problem(77, 96, 1000, masked=10)
    b = b if with_bias else None
    (loss, grads) = linear_loss_and_grads("xla", h, w, b, y, label_smoothing=0.1, blocks=BlockSizes(block_v=256))
    ht, wt = to_torch(h), to_torch(w)
    logits = ht @ wt.T
    bt = None
    if with_bias:
        bt = to_torch(b)
        logits = logits + bt
    ref = F.cross_entropy(logits, torch.tensor(np.asarray(y, np.int64)), label_smoothing=0.1, ignore_index=IGNORE)
    ref.backward()
    assert_close(loss, ref.item(), 1e-5, 1e-5)
    assert_close(grads[0], ht.grad, 1e-4, 1e-6)
    assert_close(grads[1], wt.grad, 1e-4, 1e-6)
    if with_bias:
        assert_close(grads[2], bt.grad, 1e-4, 1e-6)


CASES = {
    "plain": dict(),
    "smooth": dict(label_smoothing=0.1),
    "smooth_zloss": dict(label_smoothing=0.2, z_loss=1e-3),
    "softcap": dict(logit_softcap=4.0),
    "softcap_smooth": dict(logit_softcap=4.0, label_smoothing=0.1, z_loss=1e-4),
    "sum": dict(label_smoothing=0.1, reduction="sum"),
    "none": dict(label_smoothing=0.1, reduction="none"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(77, 96, 1000, 256), (16, 32, 32064, 4096), (5, 8, 7, 3)])
def test_linear_xla_matches_reference_fp32(case, shape):
    n, d, v, block_v = shape
    h, w, b, y = make_problem(n, d, v, masked=n // 7)
    kw = CASES[case]
    if kw.get("reduction") == "none":
        # a vector loss: differentiate a random projection of it
        proj = jax.random.normal(jax.random.key(9), (n,))
        f = lambda impl: (
            lambda h, w, b: (
                proj
                @ linear_smoothed_cross_entropy(
                    h, w, y, bias=b, impl=impl, blocks=BlockSizes(block_n=13, block_v=block_v), **kw
                )
            )
        )
        ref = jax.value_and_grad(f("reference"), argnums=(0, 1, 2))(h, w, b)
        got = jax.jit(jax.value_and_grad(f("xla"), argnums=(0, 1, 2)))(h, w, b)
    else:
        ref = linear_loss_and_grads("reference", h, w, b, y, **kw)
        got = linear_loss_and_grads("xla", h, w, b, y, blocks=BlockSizes(block_n=13, block_v=block_v), **kw)
    assert_close(got[0], ref[0], 1e-5, 1e-5)
    for g, r in zip(got[1], ref[1]):
        assert_close(g, r, 1e-4, 1e-6)


@pytest.mark.parametrize("case", ["smooth_zloss", "softcap_smooth"])
def test_linear_xla_matches_reference_bf16(case):
    h, w, b, y = make_problem(77, 96, 1000, dtype=jnp.bfloat16, masked=9)
    ref = linear_loss_and_grads("reference", h, w, b, y, **CASES[case])
    got = linear_loss_and_grads("xla", h, w, b, y, blocks=BlockSizes(block_v=384), **CASES[case])
    assert got[0].dtype == jnp.float32
    assert_close(got[0], ref[0], 1e-3, 1e-3)
    for g, r, x in zip(got[1], ref[1], (h, w, b)):
        assert g.dtype == x.dtype == jnp.bfloat16
        scale = float(jnp.abs(r.astype(jnp.float32)).max())
        assert_close(g, r, 0, 2e-2 * scale)


def test_linear_sparse_soft_labels_match_dense_targets():
    h, w, b, _ = make_problem(20, 12, 30)
    k = jax.random.split(jax.random.key(7), 2)
    ids = jax.random.randint(k[0], (20, 2), 0, 30).at[3].set(IGNORE).at[4, 1].set(IGNORE)
    wts = jax.nn.softmax(jax.random.normal(k[1], (20, 2)))
    dense = jnp.zeros((20, 30)).at[jnp.arange(20)[:, None], jnp.clip(ids, 0)].add(jnp.where(ids == IGNORE, 0, wts))
    where = jnp.arange(20) != 3  # row 3 is all padding: ignored either way
    for impl in IMPLS:
        block_v = 8 if impl.startswith("pallas") else 7  # pallas blocks are powers of two; both ragged on V = 30
        ours = linear_smoothed_cross_entropy(
            h,
            w,
            (ids, wts),
            bias=b,
            label_smoothing=0.1,
            impl=impl,
            blocks=BlockSizes(block_v=block_v),
            reduction="none",
        )
        expected = smoothed_cross_entropy(h @ w.T + b, dense, label_smoothing=0.1, where=where)
        assert_close(ours, expected, 1e-5, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_all_tokens_masked_gives_zero_loss_and_zero_grads(impl, reduction):
    h, w, b, _ = make_problem(9, 8, 40)
    y = jnp.full((9,), IGNORE)
    loss, grads = jax.value_and_grad(
        lambda h, w, b: linear_smoothed_cross_entropy(
            h, w, y, bias=b, label_smoothing=0.1, z_loss=1e-3, impl=impl, reduction=reduction
        ).sum(),
        argnums=(0, 1, 2),
    )(h, w, b)
    assert float(loss) == 0.0
    for g in grads:
        assert bool(jnp.all(g == 0))


def test_minus_inf_bias_on_whole_vocabulary_blocks():
    """Classes masked out by a -inf bias (never the target) filling the first blocks: the blocked
    path's loss and gradients equal the reference's, finite."""
    h, w, b, _ = make_problem(12, 8, 40)
    b = b.at[:16].set(-jnp.inf)
    y = jax.random.randint(jax.random.key(3), (12,), 16, 40)
    ref = linear_loss_and_grads("reference", h, w, b, y, z_loss=1e-3)
    got = linear_loss_and_grads("xla", h, w, b, y, z_loss=1e-3, blocks=BlockSizes(block_v=8))
    assert_close(got[0], ref[0], 1e-5, 1e-5)
    for g, r in zip(got[1], ref[1]):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert_close(g, r, 1e-4, 1e-6)


def test_where_mask_equals_ignore_index():
    h, w, b, y = make_problem(30, 8, 40)
    keep = jnp.arange(30) % 3 != 0
    by_where = linear_smoothed_cross_entropy(
        h, w, y, bias=b, where=keep, label_smoothing=0.1, impl="xla", blocks=BlockSizes(block_v=16)
    )
    by_ignore = linear_smoothed_cross_entropy(
        h, w, jnp.where(keep, y, IGNORE), bias=b, label_smoothing=0.1, impl="xla", blocks=BlockSizes(block_v=16)
    )
    assert_close(by_where, by_ignore, 1e-6, 1e-6)


def test_batch_dims_vmap_and_stats():
    h, w, b, y = make_problem(24, 8, 40, masked=3)
    h3, y3 = h.reshape(2, 3, 4, 8), y.reshape(2, 3, 4)
    loss, stats = linear_smoothed_cross_entropy(
        h3, w, y3, bias=b, impl="xla", blocks=BlockSizes(block_v=16), reduction="none", return_stats=True
    )
    assert loss.shape == stats.lse.shape == stats.prediction.shape == (2, 3, 4)
    logits = (h @ w.T + b).reshape(2, 3, 4, 40)
    valid = y3 != IGNORE  # ignored tokens' statistics are 0 (TokenStats)
    assert_close(stats.lse, jnp.where(valid, jax.nn.logsumexp(logits, -1), 0.0), 1e-5, 1e-5)
    assert_close(stats.max_logit, jnp.where(valid, logits.max(-1), 0.0), 1e-5, 1e-5)
    np.testing.assert_array_equal(stats.prediction, jnp.where(valid, logits.argmax(-1), 0))
    np.testing.assert_array_equal(stats.valid, valid)
    batched = jax.vmap(
        lambda h, y: linear_smoothed_cross_entropy(
            h, w, y, bias=b, impl="xla", blocks=BlockSizes(block_v=16), reduction="none"
        )
    )(h3, y3)
    assert_close(batched, loss, 1e-5, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_numpy_bias_under_jit(impl):
    """A NumPy (or list) bias closed over by a jitted loss: same loss as a jax.Array bias."""
    h, w, b, y = make_problem(6, 4, 9)
    want = linear_smoothed_cross_entropy(h, w, y, bias=b, impl=impl)
    for bias in (np.asarray(b), np.asarray(b).tolist()):
        got = jax.jit(lambda h: linear_smoothed_cross_entropy(h, w, y, bias=bias, impl=impl))(h)
        assert_close(got, want, 1e-6, 1e-6)


def test_xla_is_twice_differentiable():
    """Its custom_vjp backward is plain JAX, so jax.hessian works and equals the reference's."""
    h, w, b, y = make_problem(4, 3, 11, masked=1)
    f = lambda impl: (
        lambda h: linear_smoothed_cross_entropy(
            h,
            w,
            y,
            bias=b,
            label_smoothing=0.1,
            z_loss=1e-2,
            logit_softcap=2.0,
            impl=impl,
            blocks=BlockSizes(block_v=4),
        )
    )
    assert_close(jax.hessian(f("xla"))(h), jax.hessian(f("reference"))(h), 1e-4, 1e-6)


def test_mean_counts_valid_tokens_only():
    h, w, b, y = make_problem(20, 8, 40, masked=5)
    per_token = linear_smoothed_cross_entropy(h, w, y, bias=b, impl="xla", reduction="none")
    mean = linear_smoothed_cross_entropy(h, w, y, bias=b, impl="xla", reduction="mean")
    assert_close(mean, per_token.sum() / 15, 1e-6, 1e-6)
    assert bool(jnp.all(per_token[:5] == 0))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(z_loss=-1.0), "z_loss"),
        (dict(logit_softcap=0.0), "logit_softcap"),
        (dict(logit_softcap=float("inf")), "logit_softcap"),  # would give NaN losses
        (dict(z_loss=float("nan")), "z_loss"),  # would be silently skipped
        (dict(reduction="avg"), "reduction"),
        (dict(impl="cuda"), "impl"),
        (dict(bias=jnp.zeros(3)), "bias"),
        (dict(where=jnp.ones(3, bool)), "where"),
    ],
)
def test_bad_options_raise(kw, match):
    h, w, _, y = make_problem(6, 4, 10)
    with pytest.raises(ValueError, match=match):
        linear_smoothed_cross_entropy(h, w, y, **kw)


@pytest.mark.parametrize(
    "kw, error",
    [
        (dict(block_v=0), ValueError),  # 0 is not None: no silent default
        (dict(block_n=-1), ValueError),
        (dict(block_d=2.5), TypeError),  # never silently truncated
        (dict(block_n=True), TypeError),
        (dict(filter_eps=-1.0), ValueError),
    ],
)
def test_bad_block_sizes_raise(kw, error):
    with pytest.raises(error, match=next(iter(kw))):
        BlockSizes(**kw)


def test_blocks_must_be_block_sizes():
    h, w, _, y = make_problem(6, 4, 10)
    with pytest.raises(TypeError, match="blocks"):
        linear_smoothed_cross_entropy(h, w, y, blocks=dict(block_v=4))


def test_bad_shapes_raise():
    h, w, _, y = make_problem(6, 4, 10)
    with pytest.raises(ValueError, match="weight"):
        linear_smoothed_cross_entropy(h, w.T, y)
    with pytest.raises(ValueError, match="labels"):
        linear_smoothed_cross_entropy(h, w, y[:5])
    with pytest.raises(ValueError, match="integers"):
        smoothed_cross_entropy(h @ w.T, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="soft-label"):
        linear_smoothed_cross_entropy(h, w, (y[:, None], jnp.ones((6, 2))))


@pytest.mark.parametrize("bad", [10, -1])
def test_out_of_range_label_raises_when_concrete_and_is_nan_under_jit(bad):
    h, w, _, y = make_problem(6, 4, 10)
    y = y.at[2].set(bad)
    with pytest.raises(ValueError, match=f"label {bad} is outside"):
        linear_smoothed_cross_entropy(h, w, y, impl="xla")
    with pytest.raises(ValueError, match="outside"):
        smoothed_cross_entropy(h @ w.T, y)
    per_token = jax.jit(lambda y: linear_smoothed_cross_entropy(h, w, y, impl="xla", reduction="none"))(y)
    assert bool(jnp.isnan(per_token[2])) and bool(jnp.all(jnp.isfinite(jnp.delete(per_token, 2))))
    grad = jax.jit(jax.grad(lambda h, y: linear_smoothed_cross_entropy(h, w, y, impl="xla", reduction="sum")))(h, y)
    assert bool(jnp.all(jnp.isfinite(grad)))


# ---------------------------------------------------------------- properties


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 24),
    v=st.integers(2, 300),
    block_v=st.integers(1, 128),
    a=st.floats(0.0, 1.0),
    cap=st.sampled_from([None, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_property_xla_matches_reference(n, d, v, block_v, a, cap, seed):
    h, w, b, y = make_problem(n, d, v, seed=seed, masked=n // 3)
    ref = linear_loss_and_grads("reference", h, w, b, y, label_smoothing=a, logit_softcap=cap)
    got = linear_loss_and_grads(
        "xla",
        h,
        w,
        b,
        y,
        label_smoothing=a,
        logit_softcap=cap,
        blocks=BlockSizes(block_n=max(1, n // 3), block_v=block_v),
    )
    assert_close(got[0], ref[0], 1e-5, 1e-5)
    for g, r in zip(got[1], ref[1]):
        assert_close(g, r, 1e-4, 1e-5)


def test_python_list_labels_are_class_ids_and_a_tuple_is_a_soft_label_pair():
    h, w, _, y = make_problem(2, 4, 10)
    as_list = linear_smoothed_cross_entropy(h, w, [int(y[0]), int(y[1])], impl="xla", reduction="none")
    assert_close(as_list, linear_smoothed_cross_entropy(h, w, y, impl="xla", reduction="none"), 1e-6, 1e-6)
    pair = (y[:, None], jnp.ones((2, 1)))
    assert_close(
        linear_smoothed_cross_entropy(h, w, pair, impl="xla"),
        linear_smoothed_cross_entropy(h, w, y, impl="xla"),
        1e-6,
        1e-6,
    )
    assert_close(
        smoothed_cross_entropy(h @ w.T, [int(y[0]), int(y[1])]), smoothed_cross_entropy(h @ w.T, y), 1e-6, 1e-6
    )
