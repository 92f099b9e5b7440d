"""Splash attention (ls_jax/models/splash.py) on a (data, fsdp, tensor) mesh, as the trainer's
step traces it (``ls_jax.train.sharding.on_mesh``): rows over data x fsdp and key/value heads over
tensor under ``jax.shard_map``, equal to the kernel on one device (TPU interpret mode on CPU).
Auto and Explicit axes, fp32 and bf16 (bf16: the same bf16 computation, placed differently, so
equal to a few bf16 ulps of the largest entry)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from ls_jax.models.splash import splash_attention
from ls_jax.train import sharding

B, T, H, K, DH = 4, 128, 4, 2, 32


def _loss_and_grads(q, k, v, w):
    """Weighted sum of the attention output, and its gradients in q, k, v."""

    def loss(q, k, v):
        out = splash_attention(q, k, v, scale=DH**-0.5, softcap=20.0, window=48)
        return jnp.sum(out.astype(jnp.float32) * w)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_splash_on_a_mesh_equals_one_device(axis_type, dtype):
    r = np.random.RandomState(0)
    q, k, v = (jnp.asarray(r.randn(B, T, n, DH), dtype) for n in (H, K, K))
    w = jnp.asarray(r.randn(B, T, H, DH), jnp.float32)
    want = jax.jit(_loss_and_grads)(q, k, v, w)

    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    mesh = mesh.update(axis_types=(getattr(AxisType, axis_type),) * len(mesh.axis_names))
    step = sharding.on_mesh(_loss_and_grads, mesh, out_shardings=sharding.replicated(mesh))
    assert "shard_map" in str(jax.make_jaxpr(step)(q, k, v, w))  # the kernel runs per shard
    placed = jax.device_put((q, k, v, w), sharding.batch_sharding(mesh))  # rows over data x fsdp, as batches are
    got = jax.jit(step)(*placed)

    (loss, grads), (want_loss, want_grads) = got, want
    tol = 1e-5 if dtype == "float32" else 2**-6
    np.testing.assert_allclose(loss, want_loss, rtol=tol)
    for g, x in zip(grads, want_grads):
        g, x = np.asarray(g, np.float32), np.asarray(x, np.float32)
        assert np.abs(x).max() > 0
        np.testing.assert_allclose(g, x, rtol=0, atol=tol * np.abs(x).max())
