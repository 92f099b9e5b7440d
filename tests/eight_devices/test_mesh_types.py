"""Meshes as users make them (ls_jax/sharded.py, ls_jax/lm_loss.py): Auto or Explicit axes
(``jax.make_mesh``'s default), passed as ``mesh=``, made ambient by ``jax.set_mesh``, with the
arrays placed on the mesh, or the legacy ``with mesh:`` context; fp32 and bf16.

Oracle: the same function on one device, in the same dtype (fp32: rtol 1e-5; bf16: gradients
within 2 bf16 ulps plus one of the largest entry, the float32 loss 1e-4).
"""

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ls_jax import linear_smoothed_cross_entropy
from ls_jax.lm_loss import causal_lm_loss
from ls_jax.models import from_config, tiny_llama_config
from ls_jax.train import sharding

DTYPES = ("float32", "bfloat16")


def _mesh(axis_type: str):
    return jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(getattr(AxisType, axis_type),) * 2)


def _close(got, want, dtype):
    """Losses and gradients (pytrees) equal within ``dtype``'s tolerance (module docstring)."""
    (loss, grads), (want_loss, want_grads) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5 if dtype == "float32" else 1e-4)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        rtol, atol = (1e-5, 1e-6) if dtype == "float32" else (2**-6, 2**-7)  # bf16: 2 ulps, 1 of the largest
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * np.abs(w).max())


def _legacy(mesh):
    """The deprecated ``with mesh:`` context, its DeprecationWarning silenced."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", DeprecationWarning)
    stack.enter_context(mesh)
    return stack


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_loss_on_a_mesh_of_either_axis_type(axis_type, dtype):
    """value_and_grad of the fused loss on data=2,tensor=4 in every form a mesh comes in equals one
    device's, and compiles to a manual computation (each device its own tokens and classes)."""
    mesh = _mesh(axis_type)
    r = np.random.RandomState(0)
    args = (
        jnp.asarray(r.randn(16, 8), dtype),
        jnp.asarray(r.randn(24, 8) / 3, dtype),
        jnp.asarray(r.randint(0, 24, 16), jnp.int32),
    )
    placed = jax.device_put(args, tuple(NamedSharding(mesh, s) for s in (P("data"), P("tensor"), P("data"))))

    def step(m):
        loss = lambda h, w, y: linear_smoothed_cross_entropy(h, w, y, label_smoothing=0.1, z_loss=1e-3, mesh=m)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    want = step(None)(*args)
    forms = {
        "mesh=": (contextlib.nullcontext, mesh, args),
        "placed, mesh=": (contextlib.nullcontext, mesh, placed),
        "jax.set_mesh": (lambda: jax.set_mesh(mesh), None, args),
        "placed, jax.set_mesh": (lambda: jax.set_mesh(mesh), None, placed),
        "with mesh: (legacy)": (lambda: _legacy(mesh), None, args),
    }
    for form, (context, m, a) in forms.items():
        with context():
            lowered = step(m).lower(*a)
            got = lowered.compile()(*a)
        assert "sdy.manual_computation" in lowered.as_text(), form
        _close(got, want, dtype)


@functools.cache
def _lm(dtype: str):
    """(graphdef, params, batch) of a 1-layer Llama (8 heads, V = 64) in ``dtype``, and its loss
    and gradients on one device."""
    config = tiny_llama_config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8
    )
    graphdef, params = nnx.split(from_config(config, seed=0, dtype=jnp.dtype(dtype)))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 64, (4, 8)), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}
    return graphdef, params, batch, jax.jit(jax.value_and_grad(_lm_loss(graphdef, None)))(params, batch)


def _lm_loss(graphdef, mesh):
    return lambda params, batch: causal_lm_loss(nnx.merge(graphdef, params), batch, label_smoothing=0.1, mesh=mesh)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_causal_lm_loss_on_a_mesh_of_either_axis_type(axis_type, dtype):
    """causal_lm_loss with the parameters placed as the trainer places them (vocabulary- and
    column-parallel over tensor) and the batch over data, under jax.set_mesh and with mesh=: one
    device's loss and gradients. (Explicit axes refused the models' placements before; bf16
    with a tensor axis aborted XLA:CPU in the column-parallel input gradient's all-reduce.)"""
    mesh = _mesh(axis_type)
    graphdef, params, batch, want = _lm(dtype)
    placed = (
        jax.device_put(params, sharding.tree_shardings(params, mesh)),
        jax.device_put(batch, NamedSharding(mesh, P("data"))),
    )
    for context, m in ((lambda: jax.set_mesh(mesh), None), (contextlib.nullcontext, mesh)):
        with context():
            got = jax.jit(jax.value_and_grad(_lm_loss(graphdef, m)))(*placed)
        _close(got, want, dtype)
