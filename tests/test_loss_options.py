"""Options as optax users pass them: traced smoothing / z-loss (jit arguments, vmap sweeps,
gradients in the option), per-token float weights, and the true NLL beside the smoothed loss;
against optax's dense smoothed loss and dense log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import IGNORE, make_problem

from ls_jax import linear_smoothed_cross_entropy, smoothed_cross_entropy
from ls_jax.dispatch import IMPLS
from ls_jax.logit_stats import BlockSizes

BLOCKS = BlockSizes(block_n=16, block_v=64, block_d=16)


def optax_loss(h, w, b, y, a, weights=None):
    """Weighted mean of optax's smoothed cross-entropy over the tokens with y != IGNORE."""
    logits = h @ w.T + b
    valid = y != IGNORE
    per = optax.softmax_cross_entropy(
        logits, optax.smooth_labels(jax.nn.one_hot(jnp.where(valid, y, 0), w.shape[0]), a)
    )
    wt = valid * (1.0 if weights is None else weights)
    return (per * wt).sum() / wt.sum()


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_smoothing_jit_vmap_and_its_gradient_match_optax(impl):
    h, w, b, y = make_problem(37, 24, 200, masked=5)
    loss = lambda a: linear_smoothed_cross_entropy(h, w, y, bias=b, label_smoothing=a, impl=impl, blocks=BLOCKS)
    sweep = jnp.array([0.0, 0.1, 0.3])
    want = jnp.stack([optax_loss(h, w, b, y, a) for a in sweep])
    np.testing.assert_allclose(jax.vmap(loss)(sweep), want, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(loss)(0.1), want[1], rtol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(0.1), jax.grad(lambda a: optax_loss(h, w, b, y, a))(0.1), rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_traced_z_loss_matches_concrete(impl):
    h, w, b, y = make_problem(37, 24, 200, masked=5)
    f = lambda zl: linear_smoothed_cross_entropy(
        h, w, y, bias=b, z_loss=zl, label_smoothing=0.1, impl=impl, blocks=BLOCKS
    )
    np.testing.assert_allclose(jax.jit(f)(1e-2), f(1e-2), rtol=1e-6)
    lse = jax.nn.logsumexp(h @ w.T + b, axis=-1)[5:]
    np.testing.assert_allclose(jax.grad(f)(1e-2), jnp.mean(lse**2), rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_token_weights(impl, reduction):
    h, w, b, y = make_problem(37, 24, 200, masked=5)
    wt = jax.random.uniform(jax.random.key(5), (37,))
    f = lambda h, w: linear_smoothed_cross_entropy(
        h, w, y, bias=b, weights=wt, label_smoothing=0.1, impl=impl, reduction=reduction, blocks=BLOCKS
    )
    per = smoothed_cross_entropy(h @ w.T + b, y, label_smoothing=0.1)
    want = {"none": per * wt, "sum": (per * wt).sum(), "mean": optax_loss(h, w, b, y, 0.1, wt)}[reduction]
    np.testing.assert_allclose(f(h, w), want, rtol=1e-5, atol=1e-6)
    scalar = lambda f: lambda h, w: f(h, w).sum()
    got = jax.grad(scalar(f), argnums=(0, 1))(h, w)
    ref = jax.grad(
        scalar(
            lambda h, w: linear_smoothed_cross_entropy(
                h, w, y, bias=b, weights=wt, label_smoothing=0.1, impl="reference", reduction=reduction
            )
        ),
        argnums=(0, 1),
    )(h, w)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def test_bad_weights_and_masks():
    h, w, b, y = make_problem(6, 4, 10)
    with pytest.raises(TypeError, match="where must be a boolean mask"):
        smoothed_cross_entropy(h @ w.T, y, where=jnp.full((6,), 0.5))
    with pytest.raises(TypeError, match="weights must be floating point"):
        linear_smoothed_cross_entropy(h, w, y, weights=jnp.ones(6, jnp.int32))
    with pytest.raises(ValueError, match="weights has shape"):
        linear_smoothed_cross_entropy(h, w, y, weights=jnp.ones(5))
    with pytest.raises(TypeError, match="logit_softcap must be a concrete"):
        jax.jit(lambda c: linear_smoothed_cross_entropy(h, w, y, logit_softcap=c))(3.0)
    assert float(linear_smoothed_cross_entropy(h, w, y, weights=jnp.zeros(6))) == 0.0


@pytest.mark.parametrize("impl", IMPLS)
def test_target_logprob_is_the_unsmoothed_log_probability(impl):
    h, w, b, y = make_problem(37, 24, 200, masked=5)
    _, stats = linear_smoothed_cross_entropy(
        h, w, y, bias=b, label_smoothing=0.2, impl=impl, return_stats=True, blocks=BLOCKS
    )
    logp = jax.nn.log_softmax(h @ w.T + b)[jnp.arange(37), jnp.clip(y, 0)]
    np.testing.assert_allclose(stats.target_logprob, jnp.where(y == IGNORE, 0.0, logp), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dv_head_layout_equals_vd(impl, reduction):
    """A [D, V] head (weight_layout="dv") gives the [V, D] head's loss, and its gradient in its
    own layout."""
    h, w, b, y = make_problem(37, 24, 200, masked=5)
    f = lambda w, layout: linear_smoothed_cross_entropy(
        h,
        w,
        y,
        bias=b,
        label_smoothing=0.1,
        z_loss=1e-3,
        impl=impl,
        reduction=reduction,
        blocks=BLOCKS,
        weight_layout=layout,
    ).sum()
    (vd, g_vd), (dv, g_dv) = jax.value_and_grad(f)(w, "vd"), jax.value_and_grad(f)(w.T, "dv")
    np.testing.assert_allclose(dv, vd, rtol=1e-6)
    assert g_dv.shape == w.T.shape
    np.testing.assert_allclose(g_dv, g_vd.T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_dv_head_is_read_in_place(impl):
    """No transposed copy of a [D, V] head: the compiled loss + gradient's temporaries are those of
    the [V, D] head (XLA's buffer plan, within 1%; pallas in interpret mode here, its CUDA lowering
    in tests/test_pallas.py::test_head_reaches_the_kernels_as_given)."""
    n, d, v = 64, 128, 8192
    h, w, _, y = make_problem(n, d, v)
    temps = {}
    for layout, weight in (("vd", w), ("dv", w.T)):
        f = jax.grad(
            lambda h, w: linear_smoothed_cross_entropy(h, w, y, impl=impl, weight_layout=layout), argnums=(0, 1)
        )
        temps[layout] = jax.jit(f).lower(h, weight).compile().memory_analysis().temp_size_in_bytes
    assert temps["dv"] <= 1.01 * temps["vd"] + 4096, temps
    if not impl.startswith("pallas"):  # (in interpret mode the kernels' buffers are temporaries: ~2 float32 heads)
        assert temps["dv"] < d * v * 4  # well below one float32 copy of the head


def test_bad_weight_layout():
    h, w, _, y = make_problem(6, 4, 10)
    with pytest.raises(ValueError, match="weight_layout"):
        linear_smoothed_cross_entropy(h, w, y, weight_layout="VD")
    with pytest.raises(ValueError, match=r"\[D, V\]"):
        linear_smoothed_cross_entropy(h, w, y, weight_layout="dv")
