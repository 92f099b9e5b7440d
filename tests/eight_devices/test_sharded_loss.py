"""The fused loss on a mesh of 8 devices (ls_jax/sharded.py) against the same loss on one device.

Oracle: the unsharded loss and jax.grad of it (itself tested against the dense reference in
tests/test_losses.py). fp32, rtol 1e-5, and bf16; pallas in interpret mode.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ls_jax import linear_smoothed_cross_entropy
from ls_jax.logit_stats import BlockSizes, head_index
from ls_jax.train.sharding import make_mesh

MESHES = ("data=8", "data=2,fsdp=4", "tensor=8", "data=2,tensor=4")


def _inputs(n=64, d=32, v=96, k=2, seed=0):
    r = np.random.RandomState(seed)
    hidden = r.randn(n, d).astype(np.float32)
    weight = (r.randn(v, d) / np.sqrt(d)).astype(np.float32)
    bias = (0.1 * r.randn(v)).astype(np.float32)
    ids = r.randint(0, v, (n, k)).astype(np.int32)
    ids[::7, 0] = -100  # ignored entries
    weights = r.dirichlet(np.ones(k), n).astype(np.float32)
    return hidden, weight, bias, (ids, weights)


def _compiled(mesh, impl, hidden, weight, bias, labels, weight_layout="vd", **kw):
    """(compiled value_and_grad (hidden, weight, bias) of the mean loss, its arguments); inputs laid
    out as the trainer does (tokens over data x fsdp, the head's vocabulary axis over tensor, or
    whole when tensor does not divide V) when ``mesh`` is given."""

    def f(h, w, b):
        return linear_smoothed_cross_entropy(
            h, w, labels, bias=b, impl=impl, mesh=mesh, blocks=BlockSizes(block_v=16), weight_layout=weight_layout, **kw
        )

    args = (hidden, weight, bias)
    if mesh is not None:
        even = len(bias) % mesh.shape["tensor"] == 0
        head = P(*head_index("tensor", None, weight_layout)) if even else P()
        args = jax.device_put(
            args, tuple(NamedSharding(mesh, s) for s in (P(("data", "fsdp")), head, P("tensor") if even else P()))
        )
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(*args).compile(), args


def _loss_and_grads(mesh, impl, *inputs, **kw):
    compiled, args = _compiled(mesh, impl, *inputs, **kw)
    return compiled(*args)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("spec", MESHES)
def test_sharded_loss_and_gradients_equal_one_device(spec, impl, dtype):
    """fp32: rtol 1e-5; bf16: the loss to 1e-4, gradients within 2 bf16 ulps (float32 sums in
    another order can round the other way)."""
    mesh = make_mesh(spec)
    hidden, weight, bias, labels = _inputs()
    inputs = (*(x.astype(dtype) for x in (hidden, weight, bias)), labels)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0)
    (loss, grads) = _loss_and_grads(mesh, impl, *inputs, **kw)
    (want, want_grads) = _loss_and_grads(None, impl, *inputs, **kw)
    np.testing.assert_allclose(loss, want, rtol=1e-5 if dtype == "float32" else 1e-4)
    for g, w in zip(grads, want_grads):
        assert g.dtype == w.dtype == dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        if dtype == "float32":
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_allclose(g, w, rtol=2**-7, atol=2**-8 * np.abs(w).max())
    assert grads[1].sharding.spec == P("tensor") or mesh.shape["tensor"] == 1  # dW sharded like W


@pytest.mark.parametrize(
    "spec, impl, v",
    [
        ("tensor=8", "xla", 96),
        ("tensor=8", "pallas", 101),
        ("data=2,tensor=4", "xla", 101),
        ("data=2,tensor=4", "pallas", 96),
    ],
)
def test_dv_head_split_in_place_over_the_vocabulary(spec, impl, v):
    """A [D, V] head (weight_layout="dv") on a tensor mesh, split along its own vocabulary axis
    (V = 101: ragged, the last V mod t classes on every device): the [V, D] head's loss and
    gradients on one device, dW in the head's layout and sharding, and no transpose of the head
    or of a shard of it in the compiled step (the old path transposed every device's shard)."""
    mesh = make_mesh(spec)
    hidden, weight, bias, labels = _inputs(v=v)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0)
    compiled, args = _compiled(
        mesh, impl, hidden, np.ascontiguousarray(weight.T), bias, labels, weight_layout="dv", **kw
    )
    (loss, grads), (want, want_grads) = compiled(*args), _loss_and_grads(None, impl, hidden, weight, bias, labels, **kw)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for g, w in zip(grads, (want_grads[0], want_grads[1].T, want_grads[2])):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert grads[1].sharding.is_equivalent_to(args[1].sharding, 2)  # dW in the head's layout and sharding
    d, per = hidden.shape[1], v // mesh.shape["tensor"]
    heads = {shape for rows in (v, per * mesh.shape["tensor"], per) for shape in ((rows, d), (d, rows))}
    transposed = {
        (int(a), int(b)) for a, b in re.findall(r"f32\[(\d+),(\d+)\]\{[\d,]*\} transpose\(", compiled.as_text())
    }
    assert not transposed & heads, transposed


@pytest.mark.parametrize(
    "spec, reduction, layout",
    [("data=8", "mean", "vd"), ("data=2,fsdp=4", "sum", "dv"), ("data=2,fsdp=4", "mean", "dv")],
)
def test_one_pass_on_the_batch_axes_equals_one_device(spec, reduction, layout):
    """The one-pass path per device (ls_jax.sharded.sharded_one_pass): "mean" divides by the
    global weight of the valid tokens (per-token weights here), the partial sums are psummed."""
    mesh = make_mesh(spec)
    hidden, weight, bias, labels = _inputs()
    weight = weight if layout == "vd" else np.ascontiguousarray(weight.T)
    kw = dict(
        label_smoothing=0.1,
        z_loss=1e-3,
        logit_softcap=5.0,
        reduction=reduction,
        weight_layout=layout,
        weights=np.random.RandomState(2).rand(len(hidden)).astype(np.float32),
    )

    def run(m):
        f = lambda h, w, b: linear_smoothed_cross_entropy(h, w, labels, bias=b, impl="xla", mesh=m, **kw)
        args = (hidden, weight, bias)
        if m is not None:
            args = jax.device_put(
                args, (NamedSharding(m, P(("data", "fsdp"))), NamedSharding(m, P()), NamedSharding(m, P()))
            )
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(*args), args

    lowered, args = run(mesh)
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    (loss, grads), (want, want_grads) = (
        lowered.compile()(*args),
        jax.jit(
            jax.value_and_grad(
                lambda h, w, b: linear_smoothed_cross_entropy(h, w, labels, bias=b, impl="xla", **kw), argnums=(0, 1, 2)
            )
        )(hidden, weight, bias),
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for g, w in zip(grads, want_grads):  # dW, db: fp32 sums over the devices in another order
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())


def test_one_pass_on_the_batch_axes_does_6ndv_per_device():
    """Compiled FLOPs per device of value_and_grad on data=8: the one-pass 6 (N / 8) D V (logits,
    dh, dW in one sweep), not the two-pass 8 (N / 8) D V. One token chunk per device: XLA's cost
    analysis counts a loop body once."""
    mesh = make_mesh("data=8")
    n, d, v = 512, 32, 256
    hidden, weight, _, labels = _inputs(n=n, d=d, v=v)
    f = lambda h, w: linear_smoothed_cross_entropy(
        h, w, labels, label_smoothing=0.1, impl="xla", mesh=mesh, blocks=BlockSizes(block_n=n // 8)
    )
    args = jax.device_put((hidden, weight), (NamedSharding(mesh, P("data")), NamedSharding(mesh, P())))
    flops = jax.jit(jax.grad(f, argnums=(0, 1))).lower(*args).compile().cost_analysis()["flops"]
    ndv = n // 8 * d * v
    assert 5.5 * ndv < flops < 7.5 * ndv, flops / ndv


@pytest.mark.parametrize("spec", ["tensor=8", "data=2,tensor=4"])
def test_ragged_vocabulary_and_stats(spec):
    """V = 101 rows over 8 or 4 vocabulary shards: no class dropped; argmax ties to the lowest
    index across shards; no softcap (the logit sum by the rank-1 path)."""
    mesh = make_mesh(spec)
    hidden, weight, bias, labels = _inputs(v=101, seed=1)
    weight[77] = weight[3]  # identical rows in different shards: a tie broken by the lower index
    bias[77] = bias[3] = 50.0
    weight[100] = 0.0  # the last class (in the rest computed by every device) wins some tokens
    bias[100] = 49.0

    def run(m):
        return jax.jit(
            lambda h, w, b: linear_smoothed_cross_entropy(
                h,
                w,
                labels,
                bias=b,
                label_smoothing=0.2,
                impl="xla",
                mesh=m,
                reduction="none",
                return_stats=True,
                blocks=BlockSizes(block_v=16),
            )
        )(hidden, weight, bias)

    (loss, stats), (want, want_stats) = run(mesh), run(None)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(stats, want_stats):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert set(np.asarray(stats.prediction)) <= {3, 100} and 3 in set(np.asarray(stats.prediction))


def test_ignored_token_with_inf_hidden_on_a_ragged_vocabulary():
    """An ignored token contributes exactly 0 whatever its hidden state holds, also through the
    dense pass over a ragged V's last classes that every device computes."""
    hidden, weight, bias, (ids, weights) = _inputs(v=101, seed=2)
    ids[5] = -100
    hidden[5] = np.inf
    labels = (ids, weights)
    (loss, grads), (want, want_grads) = (
        _loss_and_grads(m, "xla", hidden, weight, bias, labels, label_smoothing=0.1)
        for m in (make_mesh("tensor=8"), None)
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert not np.asarray(grads[0])[5].any()


def test_ambient_mesh_is_used():
    """Without mesh=, the mesh of jax.set_mesh splits the loss the same way."""
    mesh = make_mesh("data=2,tensor=4")
    hidden, weight, bias, labels = _inputs()
    want = linear_smoothed_cross_entropy(hidden, weight, labels, bias=bias, impl="xla")
    with jax.set_mesh(mesh):
        got = jax.jit(lambda h, w, b: linear_smoothed_cross_entropy(h, w, labels, bias=b, impl="xla"))(
            hidden, weight, bias
        )
        text = (
            jax.jit(lambda h, w: linear_smoothed_cross_entropy(h, w, labels, impl="xla"))
            .lower(hidden, weight)
            .as_text()
        )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert "shard_map" in text or "sdy.manual_computation" in text


def test_batch_not_divisible_by_the_mesh():
    mesh = make_mesh("data=8")
    hidden, weight, _, _ = _inputs(n=12)
    with pytest.raises(ValueError, match="hidden has 12 tokens, not divisible by the mesh's batch axes data=8 = 8"):
        linear_smoothed_cross_entropy(hidden, weight, jnp.zeros(12, jnp.int32), mesh=mesh)


@pytest.mark.parametrize("spec", ["data=8", "tensor=8"])
def test_pallas_kernels_get_one_devices_block_when_lowered_for_cuda(spec):
    """The real Triton lowering (from the CPU) of value_and_grad of the sharded pallas loss: every
    kernel's hidden operand has one device's tokens (256 of 2048 with data=8), and with tensor=8
    its weight operand one shard's rows (128 of 1024), never all V."""
    if jax.__version_info__ >= (0, 11):
        pytest.skip("jax >= 0.11 refuses to lower for CUDA on a machine without a GPU")
    from functools import partial

    from ls_jax.kernels import fused
    from ls_jax.logit_stats import Backend, two_pass
    from ls_jax.sharded import sharded_logit_stats

    mesh = make_mesh(spec)
    n, d, v = 2048, 256, 1024
    tokens, rows = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P("tensor"))
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=tokens),
        jax.ShapeDtypeStruct((v, d), jnp.bfloat16, sharding=rows),
        jax.ShapeDtypeStruct((n, 1), jnp.int32, sharding=tokens),
    )
    on_gpu = two_pass(
        Backend(partial(fused.forward, interpret=False), fused.backward_fn("two_kernel", interpret=False))
    )

    def loss(h, w, ids):
        stats = sharded_logit_stats(
            on_gpu,
            h,
            w,
            None,
            ids,
            jnp.ones(ids.shape, jnp.float32),
            mesh=mesh,
            softcap=None,
            need_sum=False,
            blocks=BlockSizes(),
        )
        return (stats.lse - stats.target).sum()

    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    calls = [
        re.search(r"triton\((.*?)\).*?:\s*\(tensor<(\d+)x\d+xbf16>, tensor<(\d+)x\d+xbf16>", line)
        for line in text.splitlines()
        if "__gpu$xla.gpu.triton" in line
    ]
    assert len(calls) >= 3 and all(calls), text[:2000]  # forward, and the backward's kernels
    want = (n // mesh.shape["data"], v // mesh.shape["tensor"])
    assert {(int(c.group(2)), int(c.group(3))) for c in calls} == {want}
