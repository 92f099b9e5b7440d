"""Targets of the cross-entropy: class ids or soft labels, masks, and their validation.

Every kind of label is brought to one sparse form over ``N`` flattened tokens:
``ids [N, K] int32`` and ``weights [N, K] float32`` (the target distribution before
smoothing), plus ``valid [N] bool``. Hard labels are ``K = 1``.

Out-of-range ids (not ignored, outside ``[0, V)``): a ``ValueError`` when the labels are
concrete; under ``jit`` the values cannot be inspected, and the affected tokens get a NaN
loss (never a silently wrong finite one). Their gradient contribution is zero.
"""

from typing import NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Labels = Union[jax.Array, Tuple[jax.Array, jax.Array]]


class SparseTargets(NamedTuple):
    """Flattened targets: ids [N, K] int32 (clipped into range), weights [N, K] float32
    (0 on ignored tokens and padding entries), valid [N] bool, out_of_range [N] bool."""

    ids: jax.Array
    weights: jax.Array
    valid: jax.Array
    out_of_range: jax.Array


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer under jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def check_options(label_smoothing, z_loss, logit_softcap, reduction) -> None:
    """Raise ValueError for option values outside their domain (at trace time)."""
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not 0.0 <= float(z_loss) < float("inf"):  # NaN fails too
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    if logit_softcap is not None and not 0.0 < float(logit_softcap) < float("inf"):
        raise ValueError(f"logit_softcap must be a positive finite number or None, got {logit_softcap}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def where_mask(where, batch_shape) -> jax.Array:
    """``where`` (None or bool, broadcastable to ``batch_shape``) as a flat bool [N]."""
    n = int(np.prod(batch_shape, dtype=np.int64))
    if where is None:
        return jnp.ones((n,), bool)
    where = jnp.asarray(where)
    try:
        where = jnp.broadcast_to(where, batch_shape)
    except ValueError:
        raise ValueError(
            f"where has shape {where.shape}, not broadcastable to the labels' shape {tuple(batch_shape)}"
        ) from None
    return where.reshape(n).astype(bool)


def sparse_targets(labels: Labels, batch_shape, num_classes: int, ignore_index: int, where) -> SparseTargets:
    """Bring integer labels ``[...]`` or a soft-label pair ``(ids [..., K], weights [..., K])``
    to :class:`SparseTargets` over the ``N = prod(batch_shape)`` tokens.

    A soft-label entry whose id equals ``ignore_index`` is padding (its weight is dropped);
    a token whose entries are all padding is ignored, as is a hard label equal to
    ``ignore_index`` or a token where ``where`` is False.
    """
    batch_shape = tuple(batch_shape)
    n = int(np.prod(batch_shape, dtype=np.int64))
    if isinstance(labels, tuple):
        if len(labels) != 2:
            raise ValueError("soft labels must be a tuple (ids [..., K], weights [..., K])")
        ids, weights = jnp.asarray(labels[0]), jnp.asarray(labels[1])
        if ids.shape != weights.shape or ids.shape[:-1] != batch_shape:
            raise ValueError(
                f"soft-label ids {ids.shape} and weights {weights.shape} must both have shape "
                f"{batch_shape} + (K,)"
            )
        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise ValueError(f"soft-label weights must be floating point, got {weights.dtype}")
    else:
        ids = jnp.asarray(labels)
        if ids.shape != batch_shape:
            raise ValueError(f"labels have shape {ids.shape}, expected {batch_shape}")
        ids, weights = ids[..., None], jnp.ones(ids.shape + (1,), jnp.float32)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"class ids must be integers, got {ids.dtype}")
    k = ids.shape[-1]
    ids = ids.reshape(n, k).astype(jnp.int32)
    entry = ids != ignore_index
    valid = entry.any(-1) & where_mask(where, batch_shape)
    live = entry & valid[:, None]
    bad = live & ((ids < 0) | (ids >= num_classes))
    if is_concrete(bad) and bool(bad.any()):
        first = np.asarray(ids)[np.asarray(bad)][0]
        raise ValueError(
            f"label {int(first)} is outside [0, {num_classes}) and is not ignore_index={ignore_index}"
        )
    weights = jnp.where(live, weights.reshape(n, k).astype(jnp.float32), 0.0)
    return SparseTargets(jnp.clip(ids, 0, num_classes - 1), weights, valid, bad.any(-1))
