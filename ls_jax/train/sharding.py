"""Device mesh and placements: a (data, fsdp, tensor) mesh from a flag, NamedShardings declared
per parameter kind (Megatron-style tensor parallelism, FSDP), batches over the batch axes.

Parameter layouts (:data:`PARAM_LAYOUTS`; nnx ``Linear`` kernels are ``[in, out]``, qwix's LoRA
factors ``kernel_lora_a [in, r]``, ``kernel_lora_b [r, out]``), looked up by the parameter's module and name:

* column-parallel (``q_proj``, ``k_proj``, ``v_proj``, ``gate_proj``, ``up_proj``): kernel
  ``(fsdp, tensor)``, bias ``(tensor,)``: each tensor device owns whole output features
  (heads, MLP columns) and needs no communication;
* row-parallel (``o_proj``, ``down_proj``): kernel ``(tensor, fsdp)``, bias replicated: each
  device's partial output is summed by one all-reduce over ``tensor``; the column-parallel
  projections of one input reduce its gradient once (:func:`ls_jax.models.parallel.column_parallel`,
  active when the step is traced :func:`on_mesh`): per layer 2 all-reduces of a tokens x hidden
  activation forward and 2 backward, Megatron's count;
* vocabulary-parallel (``embed_tokens.embedding``, ``lm_head``) ``[V, D]``: ``(tensor, fsdp)``
  (the loss merges per-shard statistics: :mod:`ls_jax.sharded`);
* norms, scalars and 1-d arrays not named above: replicated; any other parameter (e.g. a
  classifier ``score``): ``fsdp`` over its largest dimension, replicated over ``tensor``.

A mesh axis that does not divide its dimension is left out (that array is replicated along
it). Optimizer state (Adam's moments) mirrors the parameters' paths, so it gets the same
layout. Batches are split along their row dimension over ``("data", "fsdp")``.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ls_jax.models.parallel import COLUMN, ROW
from ls_jax.sharded import BATCH_AXES

AXES = ("data", "fsdp", "tensor")

_VOCAB = ("tensor", "fsdp")
# (module name, parameter name) -> axis per dimension; module "" matches a bare parameter
PARAM_LAYOUTS = {
    **{(m, k): spec for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") for k, spec in COLUMN.items()},
    **{(m, k): spec for m in ("o_proj", "down_proj") for k, spec in ROW.items()},
    ("embed_tokens", "embedding"): _VOCAB,
    ("", "lm_head"): _VOCAB,
}


class MeshError(ValueError):
    """A mesh flag that is malformed or does not fit the devices."""


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=4,tensor=1"`` -> sizes per axis; at most one ``-1`` takes the rest.

    Axes left out have size 1. Raises :class:`MeshError` if the product is not ``num_devices``.
    """
    sizes, given = {a: 1 for a in AXES}, set()
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.lstrip("-").isdigit():
            raise MeshError(f"bad --mesh entry {part!r}: expected NAME=SIZE with NAME in {AXES}")
        if name in given:
            raise MeshError(f"bad --mesh {spec!r}: axis {name!r} is given twice")
        given.add(name)
        sizes[name] = int(value)
    free = [a for a, n in sizes.items() if n == -1]
    if len(free) > 1 or any(n == 0 or n < -1 for n in sizes.values()):
        raise MeshError(f"bad --mesh {spec!r}: sizes must be positive, with at most one -1")
    fixed = int(np.prod([n for n in sizes.values() if n != -1]))
    if free:
        if num_devices % fixed:
            raise MeshError(f"--mesh {spec!r}: {fixed} does not divide the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    total = int(np.prod(list(sizes.values())))
    if total != num_devices:
        raise MeshError(f"--mesh {spec!r} needs {total} devices, but {num_devices} are available")
    return sizes


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh with Auto axes over ``devices`` (default: all). The steps
    also take a mesh with Explicit axes (:func:`on_mesh`); the trainer's other model calls
    (answer-level evaluation, generation) need Auto ones."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _names(path) -> tuple[str, ...]:
    """The string names along a pytree path (dict keys and attributes; ``value`` dropped), e.g.
    ``("model", "layers", "self_attn", "q_proj", "kernel")``."""
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", None))
        if isinstance(name, str) and name != "value":
            names.append(name)
    return tuple(names)


def param_spec(path, shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of a parameter-like array at pytree ``path`` (its module and name select a
    layout of :data:`PARAM_LAYOUTS`); axes of size 1 or that do not divide their dimension are left out."""
    names = _names(path)
    declared = None
    if names:
        declared = PARAM_LAYOUTS.get((names[-2] if len(names) > 1 else "", names[-1])) or PARAM_LAYOUTS.get(
            ("", names[-1])
        )
    if declared is None or len(declared) != len(shape):
        declared = [None] * len(shape)
        if len(shape) >= 2:  # undeclared: fsdp over the largest dimension
            declared[max(range(len(shape)), key=lambda d: (shape[d], -d))] = "fsdp"
    spec = [
        a if a is not None and mesh.shape.get(a, 1) > 1 and shape[d] % mesh.shape[a] == 0 else None
        for d, a in enumerate(declared)
    ]
    return P(*spec)


def tree_shardings(tree, mesh: Mesh):
    """NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs), same structure."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, param_spec(path, np.shape(x), mesh)), tree
    )


def on_mesh(fn: Callable, mesh: Mesh, out_shardings) -> Callable:
    """``fn`` traced with ``mesh`` as the ambient (abstract) mesh, which the models'
    :func:`ls_jax.models.parallel.column_parallel` and the loss read (wrap a step before ``jax.jit``).

    Inside, every axis is Auto (``jax.sharding.auto_axes``): the models leave their activations'
    placement to XLA's partitioner, which a mesh with Explicit axes (``jax.make_mesh``'s default)
    would refuse (e.g. the embedding lookup's gather); ``fn``'s outputs are resharded to
    ``out_shardings``. With Auto axes this is plain tracing under ``mesh``.

    Args:
      fn: the step. mesh: its ``Mesh`` (Auto or Explicit axes).
      out_shardings: ``fn``'s output shardings, as ``jax.jit`` takes them.
    Returns:
      The wrapped step.
    """

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.sharding.auto_axes(fn, out_sharding=out_shardings)(*args, **kwargs)

    return traced


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Rows over ``("data", "fsdp")`` for arrays ``[*leading dims, rows, ...]``."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (small outputs every process reads, e.g. metrics)."""
    return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A batch of numpy arrays ``[rows, ...]`` (every process holds all of it) placed with its rows
    over the batch axes, each process putting only its own rows (:func:`put_rows`)."""
    return put_rows(
        lambda rows: {k: v[rows] for k, v in batch.items()}, len(next(iter(batch.values()))), batch_sharding(mesh)
    )


def put_rows(
    make: Callable[[slice], dict[str, np.ndarray]], rows: int, sharding: NamedSharding, axis: int = 0
) -> dict[str, jax.Array]:
    """Global arrays of a batch of ``rows`` rows along ``axis``, placed by ``sharding``, built from
    this process's rows only: ``make(span)`` returns the batch's numpy arrays restricted to
    ``span`` (a slice of ``axis``: the rows this process's devices hold). One process: all rows."""
    index_shape = (1,) * axis + (rows,)
    spans = [index[axis] for index in sharding.addressable_devices_indices_map(index_shape).values()]
    start = min(s.start or 0 for s in spans)
    stop = max(rows if s.stop is None else s.stop for s in spans)
    local = make(slice(start, stop))

    def shard(array, index):
        index = list(index)
        span = index[axis]
        index[axis] = slice((span.start or 0) - start, (rows if span.stop is None else span.stop) - start)
        return array[tuple(index)]

    return {
        k: jax.make_array_from_callback(
            a.shape[:axis] + (rows,) + a.shape[axis + 1 :], sharding, lambda index, a=a: shard(a, index)
        )
        for k, a in local.items()
    }


def check_batch(batch_size: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    """Raise :class:`MeshError` (naming ``flag``) unless ``batch_size`` splits evenly over the batch axes."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise MeshError(f"{flag} {batch_size} is not divisible by data x fsdp = {n}")
