"""causal_lm_loss: torch's cross_entropy(label_smoothing=...) on HF logits is the oracle; gradients
match the dense reference path; a user-defined NNX model following the protocol works too."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from test_models import CONFIGS, V, hf_logits, padded_batch, save_hf

from ls_jax.lm_loss import causal_lm_loss, next_token_targets
from ls_jax.logit_stats import BlockSizes
from ls_jax.models import CausalLMProtocol, from_pretrained

IGNORE = -100


def lm_batch(seed=0):
    """Padded batch whose labels ignore padding and the first 2 (prompt) tokens of each row."""
    ids, mask = padded_batch(seed)
    labels = np.where(mask == 1, ids, IGNORE)
    first_real = mask.argmax(-1)
    for row, start in enumerate(first_real):
        labels[row, start : start + 2] = IGNORE
    return ids, mask, labels


def torch_loss(logits, labels, smoothing):
    """HF convention: logits[:, :-1] predict labels[:, 1:]; mean over non-ignored tokens."""
    z = torch.tensor(logits[:, :-1]).reshape(-1, logits.shape[-1])
    y = torch.tensor(labels[:, 1:]).reshape(-1)
    return float(torch.nn.functional.cross_entropy(z, y, ignore_index=IGNORE, label_smoothing=smoothing)), z, y


@pytest.mark.parametrize("name", ["llama", "gemma2"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_metrics_match_torch_on_hf_logits(name, smoothing, tmp_path):
    hf = save_hf(CONFIGS[name](), tmp_path)
    model = from_pretrained(str(tmp_path))
    ids, mask, labels = lm_batch()
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    loss, metrics = causal_lm_loss(model, batch, label_smoothing=smoothing, impl="xla", blocks=BlockSizes(block_v=48))
    ref, z, y = torch_loss(hf_logits(hf, ids, mask), labels, smoothing)
    assert abs(float(loss) - ref) < 1e-4
    scored = y != IGNORE
    assert int(metrics["tokens"]) == int(scored.sum())
    acc = (z.argmax(-1) == y)[scored].float().mean()
    assert float(metrics["accuracy"]) == pytest.approx(float(acc), abs=1e-6)
    lse = torch.logsumexp(z, -1)[scored]
    assert float(metrics["mean_lse"]) == pytest.approx(float(lse.mean()), abs=1e-4)
    conf = torch.softmax(z, -1).max(-1).values[scored].sum()
    assert float(metrics["confidence_sum"]) == pytest.approx(float(conf), abs=1e-4)


def test_softcap_override_uses_uncapped_logits(tmp_path):
    hf = save_hf(CONFIGS["gemma2"](), tmp_path)
    model = from_pretrained(str(tmp_path))
    ids, mask, labels = lm_batch(1)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    loss, _ = causal_lm_loss(model, batch, label_smoothing=0.1, logit_softcap=None, impl="reference")
    with torch.no_grad():
        out = hf(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0)),
            output_hidden_states=True,
        )
        raw = hf.lm_head(out.hidden_states[-1]).numpy()  # before the final softcap
    assert abs(float(loss) - torch_loss(raw, labels, 0.1)[0]) < 1e-4
    with pytest.raises(ValueError, match="logit_softcap"):
        causal_lm_loss(model, batch, logit_softcap="none")


def test_gradients_finite_and_match_reference_path(tmp_path):
    save_hf(CONFIGS["gemma2"](), tmp_path)
    model = from_pretrained(str(tmp_path))
    ids, mask, labels = lm_batch(2)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}

    @nnx.jit(static_argnums=1)
    def grads(m, impl):
        return nnx.grad(
            lambda m: causal_lm_loss(
                m, batch, label_smoothing=0.1, z_loss=1e-3, impl=impl, blocks=BlockSizes(block_v=48)
            )[0]
        )(m)

    fused, dense = jax.tree.leaves(grads(model, "xla")), jax.tree.leaves(grads(model, "reference"))
    assert all(bool(jnp.isfinite(g).all()) for g in fused)
    assert max(float(jnp.abs(g).max()) for g in dense) > 1e-3
    for a, b in zip(fused, dense):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_next_token_targets_matches_a_loop():
    rng = np.random.RandomState(3)
    labels = rng.randint(0, V, size=(2, 8))
    labels[0, 2] = IGNORE
    mask = np.ones((2, 8), int)
    mask[1, :2] = 0
    segments = np.array([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    got = np.asarray(next_token_targets(jnp.asarray(labels), jnp.asarray(mask), jnp.asarray(segments), IGNORE))
    want = np.full_like(labels, IGNORE)
    for b in range(2):
        for t in range(7):
            if mask[b, t] and mask[b, t + 1] and segments[b, t] == segments[b, t + 1]:
                want[b, t] = labels[b, t + 1]
    np.testing.assert_array_equal(got, want)


class BagOfWordsLM(nnx.Module):
    """A user model following the protocol: causal running mean of embeddings, own output head."""

    final_logit_softcap = None

    def __init__(self, vocab: int, dim: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.mix = nnx.Linear(dim, dim, rngs=rngs)
        self.head = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim)))

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        x = self.embed(input_ids)
        w = jnp.ones(input_ids.shape) if attention_mask is None else attention_mask.astype(jnp.float32)
        mean = jnp.cumsum(x * w[..., None], 1) / jnp.maximum(jnp.cumsum(w, 1), 1)[..., None]
        return jnp.tanh(self.mix(mean))

    def unembedding(self):
        return self.head[...]

    def logits(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        return self(input_ids, attention_mask) @ self.head[...].T


def test_user_model_following_the_protocol():
    model = BagOfWordsLM(V, 16, nnx.Rngs(0))
    assert isinstance(model, CausalLMProtocol)
    ids, mask, labels = lm_batch(4)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}
    loss, metrics = causal_lm_loss(model, batch, label_smoothing=0.2, impl="xla")
    # optax oracle on the materialised logits, shifted by hand
    z = model.logits(jnp.asarray(ids), jnp.asarray(mask))[:, :-1]
    y = labels[:, 1:]
    keep = y != IGNORE
    targets = optax.smooth_labels(jax.nn.one_hot(np.where(keep, y, 0), V), 0.2)
    per_token = optax.softmax_cross_entropy(z, targets)
    assert float(loss) == pytest.approx(float(per_token[keep].mean()), abs=1e-5)
    assert int(metrics["tokens"]) == int(keep.sum())
    # pre-shifted labels give the same loss
    shifted = dict(batch, labels=next_token_targets(jnp.asarray(labels), jnp.asarray(mask)))
    loss2, _ = causal_lm_loss(model, shifted, label_smoothing=0.2, impl="xla", shift_labels=False)
    assert float(loss2) == pytest.approx(float(loss), abs=1e-6)
    total, _ = causal_lm_loss(model, batch, label_smoothing=0.2, impl="xla", reduction="sum")
    assert float(total) == pytest.approx(float(per_token[keep].sum()), rel=1e-5)
