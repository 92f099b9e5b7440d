"""The fused loss across devices: tokens over the batch axes, the classifier over the vocabulary.

:func:`sharded_logit_stats` runs an implementation of the logit-statistics seam
(ls_jax/logit_stats.py) under ``jax.shard_map``, so each device computes its own tokens only
(``impl="pallas"`` included: XLA cannot split a custom call, shard_map hands it the local
rows):

* tokens ``[N, D]`` are split over the mesh's batch axes (``data``, ``fsdp``); the weight is
  gathered over them (FSDP) as shard_map's input spec asks;
* with a ``tensor`` axis the weight (``[V, D]``, or ``[D, V]`` with ``layout="dv"``, split along
  its vocabulary axis where it is: no transposed copy) is **vocabulary-parallel**: each device holds
  ``V // t`` classes, computes :class:`LogitStats` over them, and the statistics are merged exactly
  across the axis (:func:`merge_across`: max with pmax, lse by a shifted psum of exp, the logit
  sum and the target term by psum, the prediction as the lowest index reaching the max); each
  device scores only the target ids its classes own (the others' weights masked to 0). When t does not divide V, the
  last ``V mod t`` (< t) classes are computed densely by every device and merged in (no class is ever
  dropped). dW comes out in W's layout and sharded like W; no device holds ``[N, V]`` or a
  gathered head.

:func:`sharded_one_pass` is the one-pass path (ls_jax/xla.py: a scalar loss whose gradients
are made in the forward sweep, 6NDV instead of 8NDV) under ``jax.shard_map`` when the mesh has
no ``tensor`` axis: each device sweeps its own tokens against the whole (gathered) weight and
the partial loss sums are psummed. With a ``tensor`` axis it cannot be used: a token's
gradient ``dz = p - q`` needs its global log-sum-exp, over every device's vocabulary shard,
before any gradient can be formed, so the vocabulary-parallel loss stays two-pass (statistics
merged first, the gradient recomputed in the backward).

Gradients are plain autodiff through shard_map (``check_vma=False``, which pallas_call needs):
its transpose divides a replicated output's cotangent by the axis size and psums the inputs'
cotangents over the axes they are replicated on, which is exactly right for these merges.

Meshes (:func:`resolve_mesh`, :func:`_shard_map`): Auto or Explicit axes (``jax.make_mesh``'s
default), passed as ``mesh=``, made ambient by ``jax.set_mesh``, or the legacy ``with mesh:``
context, which is read like ``mesh=``. Under Explicit axes arrays carry their sharding in their
types, which must equal shard_map's input specs: the inputs are resharded to them first.
"""

import contextlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from ls_jax import reference
from ls_jax.logit_stats import LogitStats, head_index, vocab_axis

BATCH_AXES = ("data", "fsdp")
VOCAB_AXIS = "tensor"


def merge_pair(a: LogitStats, b: LogitStats) -> LogitStats:
    """Statistics over the union of two vocabulary ranges, all of ``a``'s classes before ``b``'s
    (argmax ties go to ``a``: the lowest index)."""
    return LogitStats(
        jnp.logaddexp(a.lse, b.lse),
        a.logit_sum + b.logit_sum,
        a.target + b.target,
        jnp.maximum(a.max_logit, b.max_logit),
        jnp.where(b.max_logit > a.max_logit, b.prediction, a.prediction),
    )


def merge_across(s: LogitStats, axis: str) -> LogitStats:
    """Exact statistics over the union of every device's vocabulary shard along ``axis`` (each
    device's ``prediction`` already a global class index); the result is the same on every device."""
    m = jax.lax.pmax(jax.lax.stop_gradient(s.max_logit), axis)
    shift = jnp.where(jnp.isfinite(m), m, 0.0)  # all -inf: no NaN
    lse = shift + jnp.log(jax.lax.psum(jnp.exp(s.lse - shift), axis))
    ties = jnp.where(s.max_logit == m, s.prediction, jnp.iinfo(jnp.int32).max)
    return LogitStats(lse, jax.lax.psum(s.logit_sum, axis), jax.lax.psum(s.target, axis), m, jax.lax.pmin(ties, axis))


def _rows_stats(stats_fn, h, w, b, ids, tw, start, rows, opts) -> LogitStats:
    """``stats_fn`` over classes ``[start, start + rows)`` (``w``, ``b``): the target term
    counts only the ids in that range; the prediction is a global class index."""
    owned = (ids >= start) & (ids < start + rows)
    s = stats_fn(h, w, b, jnp.clip(ids - start, 0, rows - 1), jnp.where(owned, tw, 0.0), **opts)
    return s._replace(prediction=s.prediction + start)


def mesh_axes(mesh) -> tuple[tuple[str, ...], str | None]:
    """(batch axes, vocabulary axis or None) of ``mesh`` that are present and larger than 1."""
    batch = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)
    return batch, (VOCAB_AXIS if mesh.shape.get(VOCAB_AXIS, 1) > 1 else None)


def _check_tokens(n: int, mesh, batch: tuple[str, ...]) -> None:
    """ValueError unless the batch axes' size divides the ``n`` tokens."""
    shards = 1
    for a in batch:
        shards *= mesh.shape[a]
    if n % shards:
        raise ValueError(
            f"hidden has {n} tokens, not divisible by the mesh's batch axes "
            f"{' x '.join(f'{a}={mesh.shape[a]}' for a in batch)} = {shards}"
        )


def context_mesh(tree):
    """The mesh that traced code sees: the ambient one (``jax.set_mesh``), else the mesh whose
    sharding the types of ``tree``'s arrays carry (arrays placed on a mesh with Explicit axes).

    Args:
      tree: a pytree of arrays.
    Returns:
      An ``AbstractMesh``, or None when there is neither.
    """
    typed = (jax.typeof(x).sharding.mesh for x in jax.tree.leaves(tree))
    return next((m for m in (jax.sharding.get_abstract_mesh(), *typed) if not m.empty), None)


def _shard_map(f: Callable, mesh, in_specs, out_specs, *args):
    """``jax.shard_map(f, mesh=mesh, ...)(*args)`` (``check_vma=False``) whatever ``mesh``'s axis
    types and wherever it comes from:

    * under an ambient mesh of ``mesh``'s axes and sizes, on that one (as it types the axes: e.g.
      all Auto inside ``jax.sharding.auto_axes``), which shard_map requires;
    * with no mesh in the context nor in the arrays' types (arrays not placed), on ``mesh`` with
      its axes made Auto;
    * where the context (:func:`context_mesh`) has Explicit axes, ``args`` are first resharded
      to ``in_specs`` along them, as shard_map requires the types to match its specs.

    Args:
      f: the per-device function. mesh: a ``Mesh`` or the ambient ``AbstractMesh``.
      in_specs, out_specs: PartitionSpecs as ``jax.shard_map`` takes them (a None spec for a None
        argument). args: ``f``'s arguments.
    Returns:
      ``f``'s outputs, assembled as ``out_specs`` say.
    """
    ambient, context = jax.sharding.get_abstract_mesh(), context_mesh(args)
    if ambient.shape_tuple == mesh.shape_tuple:
        mesh = ambient
    elif context is None:
        mesh = mesh.update(axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    run = lambda *a: jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*a)
    if context is None or not context.explicit_axes:
        return run(*args)
    explicit = set(context.explicit_axes)

    def reshard(spec, x):
        names = (tuple(a for a in (e if isinstance(e, tuple) else (e,)) if a in explicit) or None for e in spec)
        return jax.sharding.reshard(x, P(*names))

    with contextlib.nullcontext() if context is ambient else jax.sharding.use_abstract_mesh(context):
        return run(*jax.tree.map(reshard, in_specs, args, is_leaf=lambda s: isinstance(s, P)))


def sharded_logit_stats(
    stats_fn: Callable, hidden, weight, bias, ids, tw, *, mesh, layout: str = "vd", **opts
) -> LogitStats:
    """:class:`LogitStats` ``[N]`` of ``hidden [N, D]``, the head ``weight`` in ``layout`` (``[V, D]``
    "vd" or ``[D, V]`` "dv"), ``bias [V]`` or None and targets ``ids [N, K]`` (in ``[0, V)``),
    ``tw [N, K]``, computed on ``mesh`` as the module describes; ``stats_fn`` is an implementation
    of the seam (ls_jax/dispatch.py) run on each device's block with ``opts`` (softcap, need_sum,
    blocks) and ``layout``. Raises ValueError when the batch axes do not divide N."""
    ax = vocab_axis(layout)
    n, v = hidden.shape[0], weight.shape[ax]
    batch, vocab = mesh_axes(mesh)
    _check_tokens(n, mesh, batch)
    t = mesh.shape[vocab] if vocab else 1
    per = v // t  # classes per vocabulary shard; the last v - t * per go to every device
    if per == 0:
        vocab, t, per = None, 1, v
    split = t * per
    opts = {**opts, "layout": layout}

    def classes(a, axis, lo, hi):  # classes [lo, hi) of a head or a bias; the array itself when whole
        return a if (lo, hi) == (0, v) else jax.lax.slice_in_dim(a, lo, hi, axis=axis)

    even, even_bias = classes(weight, ax, 0, split), None if bias is None else classes(bias, 0, 0, split)
    rest = (classes(weight, ax, split, v), None if bias is None else classes(bias, 0, split, v)) if split < v else None
    tokens, rows = P(batch or None), P(*head_index(vocab, None, layout))

    def local(h, w, b, ids, tw, rest):
        start = jax.lax.axis_index(vocab) * per if vocab else 0
        s = _rows_stats(stats_fn, h, w, b, ids, tw, start, per, opts)
        if vocab:
            s = merge_across(s, vocab)
        if rest is not None:
            s = merge_pair(s, _rows_stats(reference.logit_stats, h, *rest, ids, tw, split, v - split, opts))
        return s

    rest_spec = None if rest is None else (P(), None if bias is None else P())
    return _shard_map(
        local,
        mesh,
        (tokens, rows, None if bias is None else P(vocab), tokens, tokens, rest_spec),
        LogitStats(*(tokens,) * len(LogitStats._fields)),
        hidden,
        even,
        even_bias,
        ids,
        tw,
        rest,
    )


def sharded_one_pass(
    one_pass: Callable, loss_of: Callable, hidden, weight, bias, ids, tw, rows, *, mesh, **opts
) -> tuple[jax.Array, LogitStats]:
    """``one_pass`` (an entry of ls_jax/dispatch.py's ONE_PASS, same arguments) on ``mesh``, whose
    ``tensor`` axis must be absent or of size 1: tokens (``hidden [N, D]``, ``ids``, ``tw`` and the
    ``[N]``-leading leaves of ``rows``) split over the batch axes, the weight and bias whole on every
    device. Returns the scalar loss (the devices' partial sums, psummed) and :class:`LogitStats`
    ``[N]``. ``rows`` carries the reduction's scale, so "mean" divides by the global count or
    weight of valid tokens. Raises ValueError when the batch axes do not divide N."""
    batch, vocab = mesh_axes(mesh)
    if vocab:
        raise ValueError("the one-pass loss needs the whole vocabulary on each device (no tensor axis)")
    _check_tokens(hidden.shape[0], mesh, batch)
    tokens = P(batch or None)

    def local(h, w, b, ids, tw, rows):
        loss, stats = one_pass(loss_of, h, w, b, ids, tw, rows, **opts)
        return (jax.lax.psum(loss, batch) if batch else loss), stats

    in_specs = (tokens, P(), None if bias is None else P(), tokens, tokens, jax.tree.map(lambda _: tokens, rows))
    return _shard_map(
        local,
        mesh,
        in_specs,
        (P(), LogitStats(*(tokens,) * len(LogitStats._fields))),
        hidden,
        weight,
        bias,
        ids,
        tw,
        rows,
    )


def resolve_mesh(mesh):
    """The mesh a loss runs on.

    Args:
      mesh: a ``Mesh`` or None.
    Returns:
      ``mesh`` itself; without it the ambient mesh (``jax.set_mesh`` / ``jax.sharding.use_mesh``),
      else that of the legacy ``with mesh:`` context (deprecated by JAX, which hands no other code
      its mesh); None (no sharding) when the mesh names no batch or vocabulary axis larger than 1.
    """
    if mesh is None:
        ambient = jax.sharding.get_abstract_mesh()
        mesh = _legacy_mesh() if ambient.empty else ambient
    if mesh is None or mesh_axes(mesh) == ((), None):
        return None
    return mesh


def _legacy_mesh():
    """The mesh of an enclosing legacy ``with mesh:`` block (empty when none), or None where this
    JAX has no such context."""
    from jax._src import mesh as mesh_lib  # no public accessor

    resources = getattr(mesh_lib, "thread_resources", None)
    return None if resources is None else resources.env.physical_mesh
