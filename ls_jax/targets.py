"""Targets of the cross-entropy: class ids or soft labels, masks, and their validation.

Every kind of label is brought to one sparse form over ``N`` flattened tokens:
``ids [N, K] int32`` and ``weights [N, K] float32`` (the target distribution before
smoothing), plus ``valid [N] bool``. Hard labels are ``K = 1``.

Out-of-range ids (not ignored, outside ``[0, V)``; NumPy / Python ids are checked before they
are cast to int32, so ``2**32 + 3`` is not taken for 3) and negative target weights: a
``ValueError`` when the labels are concrete; under ``jit`` the values cannot be inspected, and
the affected tokens get a NaN loss (never a silently wrong finite one). Their gradient
contribution is zero. A traced ``label_smoothing`` outside [0, 1] (or NaN) is treated alike:
every token's loss is NaN. ``where`` is a boolean mask, whatever its source (an int attention
mask is refused with the cast to use).
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Labels = jax.Array | tuple[jax.Array, jax.Array]


class SparseTargets(NamedTuple):
    """Flattened targets: ids [N, K] int32 (clipped into range), weights [N, K] float32
    (0 on ignored tokens and padding entries), valid [N] bool, out_of_range [N] bool (an id
    outside [0, V) or a negative weight: the token's loss is NaN)."""

    ids: jax.Array
    weights: jax.Array
    valid: jax.Array
    out_of_range: jax.Array


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer under jit/grad/vmap)."""
    return not isinstance(x, jax.core.Tracer)


def _real(name: str, value):
    """``value`` as a float (a traced scalar stays as it is); TypeError naming ``name`` unless it
    is a real number (not a bool or a string)."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (numbers.Real, np.ndarray, jax.Array))
        or np.ndim(value) != 0
        or not jnp.issubdtype(jnp.result_type(value), jnp.number)
        or jnp.issubdtype(jnp.result_type(value), jnp.complexfloating)
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value) if is_concrete(value) else value


def is_static_zero(x) -> bool:
    """True when the option ``x`` is a concrete 0 (a traced value may be anything)."""
    return is_concrete(x) and float(x) == 0.0


def check_options(label_smoothing, z_loss, logit_softcap, reduction) -> None:
    """Raise TypeError for option values that are not numbers, ValueError for values outside
    their domain (at trace time). label_smoothing and z_loss may be traced (jit arguments, vmap
    over a sweep, a schedule): their range is then not checked. logit_softcap is compiled into
    the loss' loops and kernels: it must be a concrete number."""
    label_smoothing, z_loss = _real("label_smoothing", label_smoothing), _real("z_loss", z_loss)
    if logit_softcap is not None:
        if not is_concrete(logit_softcap):
            raise TypeError(
                "logit_softcap must be a concrete Python number (it is compiled into the loss), "
                "not a traced value; pass it as a static argument"
            )
        logit_softcap = _real("logit_softcap", logit_softcap)
    if is_concrete(label_smoothing) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if is_concrete(z_loss) and not 0.0 <= z_loss < float("inf"):  # NaN fails too
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    if logit_softcap is not None and not 0.0 < float(logit_softcap) < float("inf"):
        raise ValueError(f"logit_softcap must be a positive finite number or None, got {logit_softcap}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


def check_arrays(**arrays) -> None:
    """For the loss inputs (``logits=``, ``hidden=``, ``weight=``, ``bias=``; None skipped):
    TypeError unless real (float or int) numbers; ValueError for an empty class / feature axis
    (the last one; every axis of ``weight`` and ``bias``)."""
    for name, x in arrays.items():
        if x is None:
            continue
        if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if 0 in (x.shape if name in ("weight", "bias") else x.shape[-1:]):
            raise ValueError(f"{name} has shape {x.shape}: the class count V and the hidden size D must be >= 1")


def check_ignore_index(ignore_index) -> int:
    """``ignore_index`` as an int; TypeError unless an integer, ValueError outside int32."""
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (numbers.Integral, np.integer)):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__} {ignore_index!r}")
    info = np.iinfo(np.int32)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"ignore_index must fit int32 [{info.min}, {info.max}], got {ignore_index}")
    return int(ignore_index)


def _class_ids(x, num_classes: int, ignore_index: int) -> jax.Array:
    """``x`` as a JAX array; NumPy / Python ids are checked first, as a cast to int32 would
    wrap ids outside its range (``2**32 + 3`` -> 3)."""
    if not isinstance(x, jax.Array):
        host = np.asarray(x)
        if np.issubdtype(host.dtype, np.integer) and host.size:
            info = np.iinfo(np.int32)
            wide = (host < info.min) | (host > info.max)
            if wide.any():
                raise ValueError(
                    f"label {int(host[wide][0])} is outside [0, {num_classes}) and is not ignore_index={ignore_index}"
                )
    return jnp.asarray(x)


def dense_targets(labels, batch_shape, where) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A dense target distribution ``[..., V]`` (float) as ``(q [N, V] float32, valid [N] bool,
    invalid [N] bool)``: q is 0 where ``where`` is False; invalid marks tokens with a negative
    entry (ValueError when concrete; a NaN loss under jit)."""
    q = jnp.asarray(labels)
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"a dense target distribution must be floating point, got {q.dtype}")
    n, v = int(np.prod(batch_shape, dtype=np.int64)), q.shape[-1]
    valid = where_mask(where, batch_shape)
    q = jnp.where(valid[:, None], q.reshape(n, v).astype(jnp.float32), 0.0)
    invalid = (q < 0).any(-1)
    if is_concrete(invalid) and bool(invalid.any()):
        raise ValueError(f"a dense target distribution must be >= 0, got {float(q.min())}")
    return q, valid, invalid


def token_weights(weights, batch_shape) -> jax.Array:
    """Per-token loss weights (None or float, broadcastable to ``batch_shape``) as float32 [N]."""
    n = int(np.prod(batch_shape, dtype=np.int64))
    if weights is None:
        return jnp.ones((n,), jnp.float32)
    weights = jnp.asarray(weights)
    if not jnp.issubdtype(weights.dtype, jnp.floating):
        raise TypeError(f"weights must be floating point, got dtype {weights.dtype}")
    try:
        weights = jnp.broadcast_to(weights, batch_shape)
    except ValueError:
        raise ValueError(
            f"weights has shape {weights.shape}, not broadcastable to the labels' shape {tuple(batch_shape)}"
        ) from None
    return weights.reshape(n).astype(jnp.float32)


def where_mask(where, batch_shape) -> jax.Array:
    """``where`` (None or bool, broadcastable to ``batch_shape``) as a flat bool [N]."""
    n = int(np.prod(batch_shape, dtype=np.int64))
    if where is None:
        return jnp.ones((n,), bool)
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:  # one rule for every dtype: ints (an attention mask) as well as floats
        raise TypeError(
            f"where must be a boolean mask, got dtype {where.dtype} (pass mask.astype(bool); "
            "per-token weights go in weights=)"
        )
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
    ignore_index = check_ignore_index(ignore_index)
    if isinstance(labels, tuple):
        if len(labels) != 2:
            raise ValueError("soft labels must be a tuple (ids [..., K], weights [..., K])")
        ids, weights = _class_ids(labels[0], num_classes, ignore_index), jnp.asarray(labels[1])
        if ids.shape != weights.shape or ids.shape[:-1] != batch_shape:
            raise ValueError(
                f"soft-label ids {ids.shape} and weights {weights.shape} must both have shape {batch_shape} + (K,)"
            )
        if not jnp.issubdtype(weights.dtype, jnp.floating):
            raise ValueError(f"soft-label weights must be floating point, got {weights.dtype}")
    else:
        ids = _class_ids(labels, num_classes, ignore_index)
        if ids.shape != batch_shape:
            raise ValueError(f"labels have shape {ids.shape}, expected {batch_shape}")
        ids, weights = ids[..., None], jnp.ones(ids.shape + (1,), jnp.float32)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"class ids must be integers, got {ids.dtype}")
    if ids.shape[-1] == 0:  # K = 0 entries per token: every token ignored (one padding entry each)
        ids = jnp.full(batch_shape + (1,), ignore_index, ids.dtype)
        weights = jnp.zeros(batch_shape + (1,), weights.dtype)
    k = ids.shape[-1]
    # the widest int available (int64 under jax_enable_x64) until checked: int32 could wrap int64 ids
    ids = ids.reshape(n, k).astype(jax.dtypes.canonicalize_dtype(jnp.int64))
    entry = ids != ignore_index
    valid = entry.any(-1) & where_mask(where, batch_shape)
    live = entry & valid[:, None]
    bad = live & ((ids < 0) | (ids >= num_classes))
    if is_concrete(bad) and bool(bad.any()):
        first = np.asarray(ids)[np.asarray(bad)][0]
        raise ValueError(f"label {int(first)} is outside [0, {num_classes}) and is not ignore_index={ignore_index}")
    weights = jnp.where(live, weights.reshape(n, k).astype(jnp.float32), 0.0)
    negative = weights < 0
    if is_concrete(negative) and bool(negative.any()):
        raise ValueError(f"soft-label weights must be >= 0, got {float(weights.min())}")
    ids = jnp.clip(ids, 0, num_classes - 1).astype(jnp.int32)
    return SparseTargets(ids, weights, valid, (bad | negative).any(-1))
