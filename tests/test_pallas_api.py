"""``linear_smoothed_cross_entropy(impl="pallas")`` (interpret mode on CPU) against the dense
reference through the public API: every loss option, gradients in hidden, weight and bias."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import make_problem

from ls_jax import linear_smoothed_cross_entropy
from ls_jax.logit_stats import BlockSizes

BLOCKS = dict(blocks=BlockSizes(block_n=16, block_v=64, block_d=16))
OPTIONS = {
    "masked_smooth_zloss": dict(label_smoothing=0.1, z_loss=1e-3),
    "softcap_smooth": dict(label_smoothing=0.2, logit_softcap=3.0),
    "soft_labels_sum": dict(label_smoothing=0.1, reduction="sum", soft=True),
    "filtered_exact_at_zero": dict(z_loss=1e-3, blocks=BlockSizes(block_n=16, block_v=64, block_d=16, filter_eps=0.0)),
}


def problem(dtype, soft):
    return make_problem(37, 24, 200, dtype, seed=3, masked=6, soft=2 if soft else 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", OPTIONS)
def test_pallas_matches_reference(case, dtype):
    kw = dict(OPTIONS[case])
    h, w, b, y = problem(dtype, kw.pop("soft", False))

    def run(impl, **extra):
        f = lambda h, w, b: linear_smoothed_cross_entropy(h, w, y, bias=b, impl=impl, **kw, **extra)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, b)

    ref, got = run("reference"), run("pallas", **({} if "blocks" in kw else BLOCKS))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=tol, atol=tol)
    for g, r in zip(got[1], ref[1]):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, r, rtol=0, atol=tol * np.abs(r).max())


def test_pallas_all_tokens_masked_is_zero():
    h, w, b, _ = problem(jnp.float32, False)
    y = jnp.full((h.shape[0],), -100)
    loss, grads = jax.value_and_grad(
        lambda h, w: linear_smoothed_cross_entropy(h, w, y, label_smoothing=0.1, impl="pallas", **BLOCKS),
        argnums=(0, 1),
    )(h, w)
    assert float(loss) == 0.0 and all(bool(jnp.all(g == 0)) for g in grads)


# impl, dtype, options: every pallas impl in both dtypes, bias or not, over the options
DV_CASES = [
    ("pallas_two_kernel", jnp.float32, dict(label_smoothing=0.1, z_loss=1e-3, bias=True)),
    ("pallas_two_kernel", jnp.bfloat16, dict(label_smoothing=0.2, logit_softcap=3.0, bias=False)),
    ("pallas_atomic", jnp.float32, dict(label_smoothing=0.2, logit_softcap=3.0, bias=False)),
    ("pallas_atomic", jnp.bfloat16, dict(label_smoothing=0.1, reduction="sum", soft=True, bias=True)),
    ("pallas", jnp.float32, dict(label_smoothing=0.1, reduction="sum", soft=True, bias=False)),
    ("pallas", jnp.bfloat16, dict(label_smoothing=0.1, z_loss=1e-3, bias=True)),
]


@pytest.mark.parametrize("impl,dtype,options", DV_CASES)
def test_dv_head_matches_vd_and_reference(impl, dtype, options):
    """``weight_layout="dv"`` (the head ``[D, V]``, read in place by the kernels): the loss and
    gradients of the same head as ``[V, D]``, the ``[D, V]`` gradient, and the dense reference;
    odd N and D, ragged V = 1000 (padded to the blocks), masked tokens."""
    kw = dict(options)
    soft, bias = kw.pop("soft", False), kw.pop("bias")
    h, w, b, y = make_problem(77, 96, 1000, dtype, seed=4, masked=6, soft=2 if soft else 0)
    b = b if bias else None
    blocks = BlockSizes(block_n=32, block_v=128, block_d=32)

    def run(weight, layout, impl, **extra):
        f = lambda h, w, b: linear_smoothed_cross_entropy(
            h, w, y, bias=b, impl=impl, weight_layout=layout, **kw, **extra
        )
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2) if bias else (0, 1)))(h, weight, b)

    vd, dv, ref = run(w, "vd", impl, blocks=blocks), run(w.T, "dv", impl, blocks=blocks), run(w.T, "dv", "reference")
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(float(dv[0]), float(vd[0]), rtol=1e-6)
    np.testing.assert_allclose(float(dv[0]), float(ref[0]), rtol=tol, atol=tol)
    assert dv[1][1].shape == (96, 1000) and dv[1][1].dtype == dtype
    same = (vd[1][0], vd[1][1].T) + vd[1][2:]
    for g, s, r in zip(dv[1], same, ref[1]):
        g, s, r = (np.asarray(x, np.float64) for x in (g, s, r))
        assert np.isfinite(g).all()
        # equal up to the last rounding to the input dtype (float32 sums in another order can cross a
        # bf16 rounding boundary: one bf16 ulp, 2^-8 relative)
        np.testing.assert_allclose(g, s, rtol=0 if dtype == jnp.float32 else 2**-8, atol=1e-6 * np.abs(s).max())
        np.testing.assert_allclose(g, r, rtol=0, atol=tol * np.abs(r).max())
