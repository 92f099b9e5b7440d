"""Bad inputs to the loss API: a ValueError / TypeError naming the argument, or (under jit,
where values cannot be inspected) the documented NaN for the affected token only."""

import jax
import numpy as np
import optax
import pytest

from ls_jax import linear_smoothed_cross_entropy, smoothed_cross_entropy
from ls_jax.dispatch import IMPLS

RNG = np.random.RandomState(0)
H = RNG.randn(3, 4).astype(np.float32)
W = RNG.randn(5, 4).astype(np.float32)
Z = H @ W.T
LABELS = np.array([3, 1, 4])
LOSSES = (smoothed_cross_entropy, lambda z, labels, **kw: linear_smoothed_cross_entropy(H, W, labels, **kw))


@pytest.mark.parametrize("loss", LOSSES, ids=("dense", "fused"))
def test_int64_labels_outside_int32_are_errors_not_wrapped(loss):
    """With 64-bit mode off a cast to int32 would turn 2**32 + 3 into class 3 and 2**32 - 100
    into ignore_index -100."""
    for bad in (2**32 + 3, 2**32 - 100, -(2**32) + 1):
        for labels in (np.array([3, bad, 1], np.int64), [3, bad, 1]):
            with pytest.raises(ValueError, match=f"label {bad} is outside"):
                loss(Z, labels, reduction="none")
    with pytest.raises(ValueError, match=f"label {2**32 + 3} is outside"):  # soft-label ids too
        loss(Z, (np.array([[3], [2**32 + 3], [1]], np.int64), np.ones((3, 1), np.float32)), reduction="none")
    # in-range int64 and unsigned ids are fine
    expected = optax.softmax_cross_entropy_with_integer_labels(Z, LABELS)
    for labels in (LABELS.astype(np.int64), LABELS.astype(np.uint8), LABELS.astype(np.uint64)):
        np.testing.assert_allclose(loss(Z, labels, reduction="none"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", LOSSES, ids=("dense", "fused"))
def test_negative_soft_label_weights(loss):
    ids = np.array([[3, 0], [1, 2], [4, 4]])
    weights = np.array([[0.5, 0.5], [1.0, -0.25], [1.0, 0.0]], np.float32)
    with pytest.raises(ValueError, match="soft-label weights must be >= 0, got -0.25"):
        loss(Z, (ids, weights), reduction="none")
    traced = np.asarray(jax.jit(lambda w: loss(Z, (ids, w), reduction="none"))(weights))
    dense = np.zeros((3, 5), np.float32)
    np.add.at(dense, (np.arange(3)[:, None], ids), weights)
    expected = np.asarray(optax.softmax_cross_entropy(Z, dense))
    assert np.isnan(traced[1])
    np.testing.assert_allclose(traced[[0, 2]], expected[[0, 2]], rtol=1e-5, atol=1e-6)


def test_negative_dense_targets():
    q = np.array([[0.5, 0.5, 0, 0, 0], [-1.0, 2.0, 0, 0, 0], [0, 0, 0, 0, 1.0]], np.float32)
    with pytest.raises(ValueError, match="dense target distribution must be >= 0"):
        smoothed_cross_entropy(Z, q)
    traced = np.asarray(jax.jit(lambda q: smoothed_cross_entropy(Z, q))(q))
    assert np.isnan(traced[1])
    np.testing.assert_allclose(
        traced[[0, 2]], np.asarray(optax.softmax_cross_entropy(Z, q))[[0, 2]], rtol=1e-5, atol=1e-6
    )


def test_complex_inputs_are_type_errors():
    with pytest.raises(TypeError, match="logits must hold real numbers, got dtype complex64"):
        smoothed_cross_entropy(Z.astype(np.complex64), LABELS)
    for name in ("hidden", "weight", "bias"):
        args = {"hidden": H, "weight": W, "bias": np.zeros(5, np.float32)}
        args[name] = args[name].astype(np.complex64)
        with pytest.raises(TypeError, match=f"{name} must hold real numbers"):
            linear_smoothed_cross_entropy(args["hidden"], args["weight"], LABELS, bias=args["bias"])


def test_empty_class_or_hidden_axis_is_a_value_error():
    with pytest.raises(ValueError, match=r"logits has shape \(3, 0\)"):
        smoothed_cross_entropy(np.zeros((3, 0), np.float32), LABELS)
    with pytest.raises(ValueError, match=r"hidden has shape \(3, 0\)"):
        linear_smoothed_cross_entropy(np.zeros((3, 0), np.float32), np.zeros((5, 0), np.float32), LABELS)
    with pytest.raises(ValueError, match=r"weight has shape \(0, 4\)"):
        linear_smoothed_cross_entropy(H, np.zeros((0, 4), np.float32), np.full(3, -100))


@pytest.mark.parametrize("loss", LOSSES, ids=("dense", "fused"))
def test_ignore_index_must_be_an_int32(loss):
    with pytest.raises(TypeError, match="ignore_index must be an integer, got NoneType"):
        loss(Z, LABELS, ignore_index=None)
    with pytest.raises(ValueError, match="ignore_index must fit int32"):
        loss(Z, LABELS, ignore_index=2**40)
    labels = np.array([3, 7, 4])  # 7 ignored: same as masking it out
    np.testing.assert_allclose(
        loss(Z, labels, ignore_index=np.int64(7), reduction="none"),
        loss(Z, LABELS, where=labels != 7, reduction="none"),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("loss", LOSSES, ids=("dense", "fused"))
def test_options_must_be_real_numbers(loss):
    for name, value in [
        ("label_smoothing", "0.1"),
        ("z_loss", "0"),
        ("logit_softcap", "30"),
        ("label_smoothing", True),
        ("z_loss", 1e-4 + 0j),
    ]:
        with pytest.raises(TypeError, match=f"{name} must be a real number"):
            loss(Z, LABELS, **{name: value})
    np.testing.assert_allclose(
        loss(Z, LABELS, label_smoothing=np.float32(0.25), reduction="none"),
        optax.softmax_cross_entropy(Z, optax.smooth_labels(np.eye(5)[LABELS], 0.25)),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_traced_label_smoothing_outside_its_range_is_nan(impl, reduction):
    """A traced label_smoothing outside [0, 1] (a concrete one raises) gives NaN, not a number."""
    f = jax.jit(
        lambda a: linear_smoothed_cross_entropy(H, W, LABELS, label_smoothing=a, impl=impl, reduction=reduction)
    )
    for a in (1.5, -0.1, float("nan")):
        assert np.isnan(np.asarray(f(a))).all(), a
    assert np.isfinite(np.asarray(f(1.0))).all() and np.isfinite(np.asarray(f(0.0))).all()
    dense = jax.jit(lambda a: smoothed_cross_entropy(Z, LABELS, label_smoothing=a))
    assert np.isnan(np.asarray(dense(1.5))).all()


@pytest.mark.parametrize("loss", LOSSES, ids=("dense", "fused"))
def test_where_is_a_boolean_mask_whatever_its_dtype(loss):
    for mask in (np.array([1, 0, 1]), np.array([1.0, 0.0, 1.0], np.float32)):
        with pytest.raises(TypeError, match=r"where must be a boolean mask.*astype\(bool\)"):
            loss(Z, LABELS, where=mask)
    got = loss(Z, LABELS, where=np.array([True, False, True]), reduction="none")
    assert float(got[1]) == 0.0 and float(got[0]) > 0


def test_dense_target_of_the_wrong_class_count_names_the_dense_form():
    with pytest.raises(ValueError, match=r"dense target distribution the logits' shape \(3, 5\)"):
        smoothed_cross_entropy(Z, np.full((3, 4), 0.25, np.float32))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_labels_with_no_entries_are_an_empty_batch(impl, reduction):
    """K = 0 entries per token: every token ignored, loss 0 and zero gradients (no IndexError)."""
    labels = (np.zeros((3, 0), np.int32), np.zeros((3, 0), np.float32))
    f = lambda h, w: linear_smoothed_cross_entropy(
        h, w, labels, label_smoothing=0.1, impl=impl, reduction=reduction
    ).sum()
    loss, grads = jax.value_and_grad(f, argnums=(0, 1))(H, W)
    assert float(loss) == 0.0 and all(not np.asarray(g).any() for g in grads)


def test_token_stats_of_ignored_tokens_are_zero_in_every_impl():
    labels = np.array([3, -100, 4])
    stats = [linear_smoothed_cross_entropy(H, W, labels, impl=impl, return_stats=True)[1] for impl in IMPLS]
    for s in stats:
        assert not bool(s.valid[1])
        assert float(s.lse[1]) == float(s.max_logit[1]) == float(s.target_logprob[1]) == int(s.prediction[1]) == 0
        np.testing.assert_allclose(s.lse, stats[0].lse, rtol=1e-5)
    dense = smoothed_cross_entropy(Z, labels, return_stats=True)[1]
    assert float(dense.lse[1]) == 0.0 and int(dense.prediction[1]) == 0
