"""bf16 gradients as exact as bf16 allows, measured against the yardstick: the bf16 rounding of
the exact (float64) gradient, row by row. Oracle: the gradient of the smoothed loss written
out in float64 NumPy from the same bf16 inputs. Cases where a naive implementation fails:
confident tokens (p_target ~ 1: the softmax and target parts cancel) and a frequent class
(a third of the targets: a bf16 scatter-add of the target term stalls)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import IGNORE, make_problem

from ls_jax import dispatch, linear_smoothed_cross_entropy
from ls_jax.logit_stats import BlockSizes

RATIO = 4.0  # allowed: row-wise max error <= RATIO x the row's bf16 rounding error
# bf16 products (the Pallas kernels, and "xla" with precision "input", its GPU / TPU default) take
# dz rounded to bf16 (one rounding more than float32 products): measured 4.2-5.0x on the confident
# tokens here, within 4x on the frequent class. This is the bound they are held to.
RATIO_BF16_DOTS = 6.0


def _cases() -> dict:
    """name -> (impl, reduction, precision) for every impl of ``ls_jax.dispatch.IMPLS``: an impl
    with a one-pass path (``dispatch.ONE_PASS``, e.g. xla) on both paths ("mean": one-pass; "none":
    two-pass) with float32 and input-dtype ("bf16_dots") products; any other at its defaults."""
    cases = {}
    for impl in dispatch.IMPLS:
        if impl not in dispatch.ONE_PASS:
            cases[impl] = (impl, "mean", None)
            continue
        for suffix, precision in (("", "float32"), ("_bf16_dots", "input")):
            for path, reduction in (("one_pass", "mean"), ("two_pass", "none")):
                cases[f"{impl}_{path}{suffix}"] = (impl, reduction, precision)
    return cases


IMPLS = _cases()
BLOCKS = BlockSizes(block_n=256, block_v=128)


def bf16_dots(name):
    return name.startswith("pallas") or name.endswith("bf16_dots")


def exact_grads(h, w, b, y, a, target=None, token_weights=None):
    """float64 (dh, dW, db) of the smoothed loss over tokens with y != IGNORE, each weighted by
    ``token_weights`` [n] (default 1), divided by their total weight. ``target`` [n, V]: each
    token's label distribution t (default one-hot y); dz = ((1 - a) sum(t) + a) p - (1 - a) t - a / V."""
    h, w, b = (np.asarray(x, np.float64) for x in (h, w, b))
    y = np.asarray(y)
    valid = y != IGNORE
    z = h @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if target is None:
        target = np.zeros_like(p)
        target[np.arange(len(y))[valid], y[valid]] = 1.0
    scale = valid * (1.0 if token_weights is None else np.asarray(token_weights, np.float64))
    mass = target.sum(1, keepdims=True)
    dz = (((1 - a) * mass + a) * p - (1 - a) * target - a / w.shape[0]) * scale[:, None] / scale.sum()
    return dz @ w, dz.T @ h, dz.sum(0)


def worst_ratio(got, exact):
    """max over rows of (row max |got - exact|) / (row max |bf16(exact) - exact|)."""
    got, exact = np.asarray(got, np.float64), np.atleast_2d(exact) if exact.ndim == 1 else exact
    got = np.atleast_2d(got) if got.ndim == 1 else got
    rounded = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), np.float64)
    err = np.abs(got - exact).max(-1)
    yard = np.abs(rounded - exact).max(-1)
    assert (err[yard == 0] == 0).all()  # exact zeros (ignored tokens) stay exactly zero
    return float((err[yard > 0] / yard[yard > 0]).max())


def grads(impl, reduction, precision, h, w, b, y, a, *, where=None, weights=None):
    """Jitted bf16 (dh, dW, db) of the loss over the counted tokens (``where``, else y != IGNORE)
    divided by their total weight; ``y``: ids [n] or sparse soft labels (ids [n, K], probs [n, K])."""
    counted = (y != IGNORE) if where is None else where
    total = counted.sum() if weights is None else (counted * weights).sum()

    def loss(h, w, b):
        out = linear_smoothed_cross_entropy(
            h,
            w,
            y,
            bias=b,
            label_smoothing=a,
            where=where,
            weights=weights,
            impl=impl,
            reduction=reduction,
            blocks=dataclasses.replace(BLOCKS, precision=precision),
        )
        return out if reduction == "mean" else out.sum() / total

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(h, w, b)


def confident_problem(n=256, d=64, v=1000, seed=0):
    """p_target ~ 0.99: h = 0.3 noise + 16 W[y], bf16; a few ignored tokens."""
    k = jax.random.split(jax.random.key(seed), 4)
    w = jax.random.normal(k[0], (v, d)) / np.sqrt(d)
    y = jax.random.randint(k[1], (n,), 0, v)
    h = 0.3 * jax.random.normal(k[2], (n, d)) + 16 * w[y]
    b = 0.1 * jax.random.normal(k[3], (v,))
    return h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), b.astype(jnp.bfloat16), y.at[:5].set(IGNORE)


def frequent_class_problem(n=2048, d=64, v=512, seed=1):
    """Zipf-like labels: class 0 is a third of the targets."""
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (n, d))
    w = jax.random.normal(k[1], (v, d)) / np.sqrt(d)
    b = 0.1 * jax.random.normal(k[2], (v,))
    zipf = jax.random.randint(k[3], (n,), 1, v)
    y = jnp.where(jax.random.uniform(k[4], (n,)) < 1 / 3, 0, zipf)
    return h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), b.astype(jnp.bfloat16), y


CASES = [
    (problem, name)
    for problem in (confident_problem, frequent_class_problem)
    for name in IMPLS
    # the dense oracle is plain float32 autodiff: on tokens with p_target ~ 1 - 1e-6 its dh rows
    # carry float32's error of 1 - p (28x the bf16 rounding measured here); the blocked paths
    # form p - 1 from the other classes' probabilities (logit_stats.dz_tile)
    if (problem, name) != (confident_problem, "reference")
]


@pytest.mark.parametrize("a", [0.0, 0.1])
@pytest.mark.parametrize("problem,name", CASES)
def test_bf16_gradients_within_4x_of_bf16_rounding(problem, name, a):
    h, w, b, y = problem()
    if problem is confident_problem:  # the premise: confident tokens
        z = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        assert np.median(p[np.arange(len(y)), np.asarray(y)][5:]) > 0.99
    got = grads(*IMPLS[name], h, w, b, y, a)
    for g, _x in zip(got, (h, w, b)):
        assert g.dtype == jnp.bfloat16
    ratios = [worst_ratio(g, e) for g, e in zip(got, exact_grads(h, w, b, y, a))]
    bound = RATIO_BF16_DOTS if bf16_dots(name) and problem is confident_problem else RATIO
    assert max(ratios) <= bound, dict(zip(("dh", "dW", "db"), ratios))


def teacher_targets(y, v, k=5, seed=2):
    """A teacher's top k as ``train.py --soft-targets`` gives them, on weighted answers: per token
    the label with 0.9 and k - 1 random ids (repeats allowed) sharing 0.1; weights in [0.25, 1];
    the last 3 tokens and the ignored ones not counted. Returns ``((ids, probs), where, weights,
    target [n, v] float64)``."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    n = len(y)
    ids = np.concatenate([np.where(y == IGNORE, 0, y)[:, None], rng.integers(0, v, (n, k - 1))], 1)
    rest = np.exp(rng.normal(size=(n, k - 1)))
    probs = np.concatenate([np.full((n, 1), 0.9), 0.1 * rest / rest.sum(1, keepdims=True)], 1).astype(np.float32)
    where = (y != IGNORE) & (np.arange(n) < n - 3)
    weights = rng.uniform(0.25, 1.0, n).astype(np.float32)
    target = np.zeros((n, v))
    np.add.at(target, (np.repeat(np.arange(n), k), ids.ravel()), probs.astype(np.float64).ravel())
    labels = (jnp.asarray(ids, jnp.int32), jnp.asarray(probs))
    return labels, jnp.asarray(where), jnp.asarray(weights), target * where[:, None]


@pytest.mark.parametrize("a", [0.0, 0.1])
@pytest.mark.parametrize("problem,name", CASES)
def test_bf16_gradients_of_weighted_top_k_targets_within_bound(problem, name, a):
    """Distillation in the fused loss (sparse soft labels) with per-token weights and a mask: the
    bf16 gradients are held to the same bound against the bf16 rounding of the exact gradient."""
    h, w, b, y = problem()
    labels, where, weights, target = teacher_targets(y, w.shape[0])
    got = grads(*IMPLS[name], h, w, b, labels, a, where=where, weights=weights)
    for g in got:
        assert g.dtype == jnp.bfloat16
    y_counted = np.where(np.asarray(where), np.asarray(y), IGNORE)
    exact = exact_grads(h, w, b, y_counted, a, target=target, token_weights=weights)
    ratios = [worst_ratio(g, e) for g, e in zip(got, exact)]
    # measured on CPU: float32 products 1.00 everywhere; bf16 products 3.2-4.5x on the confident
    # tokens and 3.2-4.7x on the frequent class (dz rounded to bf16 once): RATIO_BF16_DOTS for both
    bound = RATIO_BF16_DOTS if bf16_dots(name) else RATIO
    assert max(ratios) <= bound, dict(zip(("dh", "dW", "db"), ratios))


def test_bf16_bias_gradient_of_one_shared_class_does_not_stall():
    """512 tokens all of class 0 with a bf16 bias: d(bias)[0] accumulates in float32."""
    n, d, v = 512, 8, 16
    h = jnp.zeros((n, d), jnp.bfloat16)
    w = jnp.zeros((v, d), jnp.bfloat16)
    b = jnp.zeros((v,), jnp.bfloat16)
    y = jnp.zeros((n,), jnp.int32)
    for name in IMPLS:
        impl, _, precision = IMPLS[name]
        db = jax.grad(
            lambda b: linear_smoothed_cross_entropy(
                h, w, y, bias=b, impl=impl, reduction="sum", blocks=dataclasses.replace(BLOCKS, precision=precision)
            )
        )(b)
        assert float(db[0]) == pytest.approx(-n * (1 - 1 / v)), name


@pytest.mark.parametrize("name", IMPLS)
def test_ignored_tokens_contribute_exactly_zero(name):
    """Ignored tokens whose hidden state is NaN, inf, or so large that their logits overflow to
    +-inf: every gradient equals the clean run's, and their own gradient rows are exactly 0."""
    impl, reduction, precision = IMPLS[name]
    n, d, v = 40, 16, 64
    k = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(k[0], (n, d))
    w = jax.random.normal(k[1], (v, d)) / 4
    b = jax.random.normal(k[1], (v,))
    y = jax.random.randint(k[2], (n,), 0, v).at[:3].set(IGNORE)
    poisoned = h.at[0].set(jnp.nan).at[1].set(jnp.inf).at[2].set(1e38)

    def run(h):
        f = lambda h, w, b: linear_smoothed_cross_entropy(
            h,
            w,
            y,
            bias=b,
            label_smoothing=0.1,
            impl=impl,
            reduction=reduction,
            blocks=dataclasses.replace(BLOCKS, precision=precision),
        ).sum()
        return jax.grad(f, argnums=(0, 1, 2))(h, w, b)

    clean, got = run(h), run(poisoned)
    assert bool(jnp.all(got[0][:3] == 0)) and bool(jnp.all(clean[0][:3] == 0))
    for g, c in zip(got, clean):
        np.testing.assert_array_equal(g, c)


def _flops(f, *args):
    return jax.jit(f).lower(*args).compile().cost_analysis()["flops"]


def test_one_pass_does_no_weight_gradient_work_for_a_frozen_head():
    """The compiled step's FLOP count: differentiating in hidden only (a frozen head, e.g. LoRA, or
    stop_gradient on W) drops the dW matmul, 2NDV of the one-pass 6NDV. One token chunk: XLA's
    cost analysis counts a loop body once, whatever its trip count."""
    n, d, v = 256, 64, 1024
    h, w, _, y = make_problem(n, d, v)
    loss = lambda h, w: linear_smoothed_cross_entropy(
        h, w, y, label_smoothing=0.1, impl="xla", blocks=BlockSizes(block_n=n)
    )
    both = _flops(jax.grad(loss, argnums=(0, 1)), h, w)
    hidden_only = _flops(jax.grad(loss), h, w)
    stopped = _flops(jax.grad(lambda h, w: loss(h, jax.lax.stop_gradient(w))), h, w)
    ndv = n * d * v
    assert 5.5 * ndv < both < 7.5 * ndv  # 6NDV: logits, dh, dW; no recompute
    assert 3.5 * ndv < hidden_only < 5.5 * ndv and 3.5 * ndv < stopped < 5.5 * ndv  # 4NDV


def test_jvp_and_hessian_of_the_one_pass_loss_match_the_reference():
    h, w, b, y = make_problem(13, 6, 17, masked=2)
    f = lambda impl: (
        lambda h, w: linear_smoothed_cross_entropy(
            h, w, y, bias=b, impl=impl, label_smoothing=0.1, z_loss=1e-2, blocks=BlockSizes(block_n=4, block_v=5)
        )
    )
    tangents = (0.3 * h, 0.1 * w)
    jvp = lambda impl: jax.jvp(f(impl), (h, w), tangents)
    np.testing.assert_allclose(jvp("xla")[1], jvp("reference")[1], rtol=1e-5)
    hess = lambda impl: jax.hessian(lambda h: f(impl)(h, w))(h)
    np.testing.assert_allclose(hess("xla"), hess("reference"), rtol=1e-4, atol=1e-6)
