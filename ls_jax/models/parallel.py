"""Megatron-style tensor parallelism inside the models (a no-op without a ``tensor`` mesh axis).

Column-parallel projections that read the same input (attention's q/k/v, the MLP's gate/up)
run in one :func:`column_parallel` call: under an ambient mesh (``jax.set_mesh``) with a
``tensor`` axis larger than 1 they run under ``jax.shard_map`` over that axis alone (the batch
axes stay automatic), each device multiplying the input by its columns of every kernel (gathered over ``fsdp``). The
input is replicated over ``tensor``, so its gradient, the sum of the projections' partial
products, is all-reduced once per call: Megatron's "f" operator. (Left to XLA's partitioner,
every projection's input gradient is all-reduced separately: 3 + 2 per layer instead of 2.)

:data:`COLUMN` / :data:`ROW` are the per-parameter layouts of such projections (nnx ``Linear``
kernels ``[in, out]``, qwix LoRA factors ``kernel_lora_a [in, r]``, ``kernel_lora_b [r, out]``),
the single source of ``ls_jax.train.sharding``'s declared layouts.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

TENSOR = "tensor"

COLUMN = {
    "kernel": ("fsdp", TENSOR),
    "bias": (TENSOR,),
    "kernel_lora_a": ("fsdp", None),
    "kernel_lora_b": (None, TENSOR),
}
ROW = {"kernel": (TENSOR, "fsdp"), "bias": (None,), "kernel_lora_a": (TENSOR, None), "kernel_lora_b": (None, "fsdp")}


def tensor_size() -> int:
    """The ambient mesh's ``tensor`` axis size (1 without a mesh or without that axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get(TENSOR, 1)


def _tensor_spec(path) -> P:
    """The ``tensor``-axis part of :data:`COLUMN` for the state leaf at ``path`` (replicated if unnamed)."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    name = next((n for n in reversed(names) if n in COLUMN), None)
    return P(*(a if a == TENSOR else None for a in COLUMN[name])) if name else P()


def column_parallel(x: jax.Array, *linears: nnx.Linear) -> tuple:
    """``tuple(linear(x) for linear in linears)`` for ``x [..., in]`` and column-parallel ``nnx.Linear``
    layers (LoRA-adapted ones included), with one all-reduce of ``x``'s gradient over the ambient
    mesh's ``tensor`` axis. Falls back to the plain calls without such an axis, or when it does not
    divide every layer's output features (those kernels are then not split over it)."""
    t = tensor_size()
    if t == 1 or any(linear.kernel.shape[-1] % t for linear in linears):
        return tuple(linear(x) for linear in linears)
    graphdef, state = nnx.split(linears)
    specs = jax.tree_util.tree_map_with_path(lambda path, _: _tensor_spec(path), state)
    # the kernels gathered over fsdp before use (FSDP); left to XLA, a fsdp x tensor mesh gathers
    # the projections' outputs over the batch instead
    state = jax.tree.map(jax.lax.with_sharding_constraint, state, specs)
    out = P(*(None,) * (x.ndim - 1), TENSOR)

    def local(x, state):
        # one use of x: its gradient is reduced once, in float32 (a bf16 all-reduce here aborts XLA:CPU)
        x = jax.lax.pcast(x.astype(jnp.float32), TENSOR, to="varying").astype(x.dtype)
        return tuple(linear(x) for linear in nnx.merge(graphdef, state))

    return jax.shard_map(local, in_specs=(P(), specs), out_specs=(out,) * len(linears), axis_names={TENSOR})(x, state)
