"""The loss's matrix products as an accelerator runs them (``BlockSizes.precision``,
``logit_stats.gemm_operands``) and the one-pass tile budget (``BlockSizes.tile_bytes``).

The accelerators' view is checked on CPU by lowering the training step for CUDA (and TPU) with
the default backend reported as "gpu" ("tpu"), as such a process traces it: every dot_general of
the loss takes bf16 operands into float32, and no float32 copy of the head is made."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import make_problem

from ls_jax import linear_smoothed_cross_entropy
from ls_jax.logit_stats import BlockSizes, gemm_operands
from ls_jax.xla import _one_pass_block_n

# matrix products (a contraction; the scalar-times-gradient "dots" of the scalar loss's JVP are scaling)
DOT = re.compile(
    r"stablehlo\.dot_general .*contracting_dims = \[\d.*: "
    r"\(tensor<([0-9x]*)x(\w+)>, tensor<([0-9x]*)x(\w+)>\) -> tensor<([0-9x]*)x(\w+)>"
)
HEAD_COPY = re.compile(r"stablehlo\.convert %arg1 .*-> tensor<[0-9x]*xf32>")


def _step_text(n, d, v, dtype, layout, reduction, blocks, backend, monkeypatch, impl="xla"):
    """StableHLO of value_and_grad (hidden and head) lowered for ``backend``'s platform, traced
    as a process whose default backend is ``backend`` would trace it."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    y = jnp.zeros((n,), jnp.int32)

    def loss(h, w):
        out = linear_smoothed_cross_entropy(
            h,
            w,
            y,
            label_smoothing=0.1,
            logit_softcap=30.0,
            impl=impl,
            reduction=reduction,
            blocks=blocks,
            weight_layout=layout,
        )
        return out.sum()

    args = jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((v, d) if layout == "vd" else (d, v), dtype)
    platform = {"gpu": "cuda", "tpu": "tpu", "cpu": "cpu"}[backend]
    return (
        jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    )


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])  # the one-pass and the two-pass path
@pytest.mark.parametrize("layout", ["vd", "dv"])
def test_accelerator_step_multiplies_bf16_into_float32(reduction, layout, backend, monkeypatch):
    text = _step_text(
        77, 96, 1000, jnp.bfloat16, layout, reduction, BlockSizes(block_n=32, block_v=256), backend, monkeypatch
    )
    dots = DOT.findall(text)
    assert len(dots) >= 3  # logits, dh, dW (two-pass: forward tile, backward tile products)
    for dot in dots:
        assert dot[1] == dot[3] == "bf16" and dot[5] == "f32", dot
    assert not HEAD_COPY.search(text)  # no float32 copy of the head (%arg1); dW accumulates bf16 products in f32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_float32_operands_on_request_and_on_cpu(dtype, monkeypatch):
    """precision="float32": float32 operands at HIGHEST on a GPU; and CPU's default."""
    for backend, blocks in (("gpu", BlockSizes(precision="float32")), ("cpu", BlockSizes())):
        text = _step_text(40, 32, 300, dtype, "vd", "mean", blocks, backend, monkeypatch)
        dots = [line for line in text.splitlines() if DOT.search(line)]
        assert dots and all(DOT.search(line).group(2) == DOT.search(line).group(4) == "f32" for line in dots)
        assert all("HIGHEST" in line for line in dots), backend
        assert bool(HEAD_COPY.search(text)) == (dtype == jnp.bfloat16)  # the opt-in's float32 copy of a bf16 head


def test_gemm_operands_policy(monkeypatch):
    for backend, want in (("gpu", jnp.bfloat16), ("tpu", jnp.bfloat16), ("cpu", jnp.float32)):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        assert gemm_operands(BlockSizes(), jnp.bfloat16)[0] == want
    assert gemm_operands(BlockSizes(precision="input"), jnp.bfloat16) == (jnp.bfloat16, None)
    with pytest.raises(ValueError, match="precision"):
        BlockSizes(precision="bf16")
    with pytest.raises(ValueError, match="tile_bytes"):
        BlockSizes(tile_bytes=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("precision", ["input", "float32"])
def test_both_policies_match_the_reference(dtype, precision):
    """Loss and gradients of every precision equal the dense reference (N=77, D=96, V=1000,
    masked tokens, softcap, smoothing), bf16 and fp32, one-pass and two-pass."""
    h, w, b, y = make_problem(77, 96, 1000, dtype, masked=9)
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5

    def run(impl, reduction, blocks):
        f = lambda h, w, b: linear_smoothed_cross_entropy(
            h, w, y, bias=b, label_smoothing=0.1, logit_softcap=20.0, impl=impl, reduction=reduction, blocks=blocks
        ).sum()
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, b)

    want = run("reference", "mean", None)
    for reduction in ("mean", "none"):
        loss, grads = run("xla", reduction, BlockSizes(block_n=32, block_v=128, precision=precision))
        if reduction == "none":
            loss, grads = loss / 68, jax.tree.map(lambda g: g / 68, grads)
        np.testing.assert_allclose(loss, want[0], rtol=tol)
        for g, r in zip(grads, want[1]):
            assert g.dtype == dtype
            g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
            assert np.linalg.norm(g - r) <= tol * np.linalg.norm(r)


def _temp_bytes(n, d, v, blocks):
    h, w, _, y = make_problem(n, d, v)
    f = lambda h, w: linear_smoothed_cross_entropy(h, w, y, label_smoothing=0.1, impl="xla", blocks=blocks)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w).compile().memory_analysis().temp_size_in_bytes


def test_one_pass_temporaries_do_not_grow_with_n():
    """A 1 MiB tile budget: the step's temporaries at N = 4096 are those at N = 1024 (block_n is
    set by the budget, not by N), and within the float32 dW accumulator plus 6 tiles."""
    d, v, budget = 64, 4096, 2**20
    small, large = (_temp_bytes(n, d, v, BlockSizes(tile_bytes=budget)) for n in (1024, 4096))
    assert large <= small * 1.05 + 2**16
    assert large <= v * d * 4 + 6 * budget


def test_one_pass_chunks_split_n_evenly():
    """The budget's chunk count splits N into equal chunks (no chunk slid back over its neighbour,
    which would redo its tokens): 8192 tokens in 8 chunks of 1024 for a 1024-token tile, N itself
    when it fits, and a multiple of 8 otherwise."""
    v = 128256
    assert _one_pass_block_n(BlockSizes(tile_bytes=4 * 1024 * v), 8192, v) == 1024
    assert _one_pass_block_n(BlockSizes(tile_bytes=4 * 2093 * v), 8192, v) == 2048
    assert _one_pass_block_n(BlockSizes(tile_bytes=2**25), 64, 8192) == 64
    assert _one_pass_block_n(BlockSizes(tile_bytes=4 * 100 * v), 1000, v) == 104  # 10 chunks, the last slid back
    assert _one_pass_block_n(BlockSizes(block_n=24), 1000, v) == 24
