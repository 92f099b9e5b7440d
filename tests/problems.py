"""The one factory of random fused-loss problems for the tests."""

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = -100


def make_problem(n, d, v, dtype=jnp.float32, seed=0, masked=0, soft=0, layout="vd"):
    """hidden [n, d], weight [v, d] (logits of std ~3; the same head as [d, v] for ``layout="dv"``),
    bias [v], labels: int [n] with the first
    ``masked`` ignored, or with ``soft`` = K > 0 sparse soft labels ``(ids [n, K], weights [n, K])``
    (softmax weights; the first ``masked`` rows all padding)."""
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (n, d)).astype(dtype)
    w = (jax.random.normal(k[1], (v, d)) / np.sqrt(d) * 3).astype(dtype)
    b = jax.random.normal(k[2], (v,)).astype(dtype)
    y = jax.random.randint(k[3], (n,) + ((soft,) if soft else ()), 0, v).at[:masked].set(IGNORE)
    if soft:
        y = (y, jax.nn.softmax(jax.random.normal(k[4], (n, soft))))
    return h, (w if layout == "vd" else w.T), b, y
