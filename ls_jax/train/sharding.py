"""Device mesh and placements: a (data, fsdp, tensor) mesh from a flag, NamedShardings by shape.

Rules (the same for parameters, gradients and optimizer state, so they line up):
arrays with fewer than 2 dimensions are replicated; otherwise the ``fsdp`` axis shards the
largest dimension divisible by its size and the ``tensor`` axis the largest other dimension
divisible by its size (an axis that divides nothing is left out: that array is replicated
along it). Batches are split along their row dimension over ``("data", "fsdp")``.
"""

from typing import Dict, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


class MeshError(ValueError):
    """A mesh flag that is malformed or does not fit the devices."""


def parse_mesh(spec: str, num_devices: int) -> Dict[str, int]:
    """``"data=2,fsdp=4,tensor=1"`` -> sizes per axis; at most one ``-1`` takes the rest.

    Axes left out have size 1. Raises :class:`MeshError` if the product is not ``num_devices``.
    """
    sizes = {a: 1 for a in AXES}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in AXES or not value.lstrip("-").isdigit():
            raise MeshError(f"bad --mesh entry {part!r}: expected NAME=SIZE with NAME in {AXES}")
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


def make_mesh(spec: str, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """The (data, fsdp, tensor) mesh with Auto axes over ``devices`` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(spec, len(devices))
    return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def array_spec(shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec of one parameter-like array by the module's shape rules."""
    spec = [None] * len(shape)
    if len(shape) < 2:
        return P(*spec)
    for axis in ("fsdp", "tensor"):
        n = mesh.shape[axis]
        if n == 1:
            continue
        free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % n == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], -d))] = axis
    return P(*spec)


def tree_shardings(tree, mesh: Mesh):
    """NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs), same structure."""
    return jax.tree.map(lambda x: NamedSharding(mesh, array_spec(np.shape(x), mesh)), tree)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Rows over ``("data", "fsdp")`` for arrays ``[*leading dims, rows, ...]``."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def check_batch(batch_size: int, mesh: Mesh, flag: str = "--batch-size") -> None:
    """Raise :class:`MeshError` (naming ``flag``) unless ``batch_size`` splits evenly over the batch axes."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise MeshError(f"{flag} {batch_size} is not divisible by data x fsdp = {n}")
