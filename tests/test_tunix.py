"""The Tunix drop-in (ls_jax.integrations.tunix) on tiny Tunix Qwen 2 and Gemma models: the loss and
its gradient equal optax's smoothed cross-entropy of the model's own dense logits, the aux metrics
equal the unsmoothed NLL / accuracy of those logits, and PeftTrainer trains with it."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("tunix", reason="google-tunix (the test extra) runs these")
from tunix.models.gemma import model as gemma  # noqa: E402
from tunix.models.qwen2 import model as qwen2  # noqa: E402
from tunix.sft import peft_trainer, utils  # noqa: E402

from ls_jax.integrations.logits_models import sown_hidden_states  # noqa: E402
from ls_jax.integrations.tunix import head, loss_fn  # noqa: E402

V = 61


@pytest.fixture(autouse=True)
def unsharded_variables():
    """Tunix's Gemma / Qwen 3 / Llama 3 modules turn flax's eager variable sharding off when
    imported (their params carry mesh-axis names); its Qwen 2 module does not, so models built
    here without a mesh need the same setting."""
    old = flax.config.flax_always_shard_variable
    flax.config.update("flax_always_shard_variable", False)
    yield
    flax.config.update("flax_always_shard_variable", old)


def _model(kind: str):
    if kind.startswith("qwen2"):
        config = qwen2.ModelConfig(
            num_layers=2,
            vocab_size=V,
            embed_dim=32,
            hidden_dim=64,
            num_heads=4,
            head_dim=8,
            num_kv_heads=2,
            rope_theta=10000,
            norm_eps=1e-6,
            use_tied_embedding=kind == "qwen2_tied",
        )
        return qwen2.Qwen2(config, rngs=nnx.Rngs(0))
    config = gemma.ModelConfig(
        num_layers=2,
        num_embed=V,
        embed_dim=32,
        hidden_dim=64,
        num_heads=4,
        head_dim=8,
        num_kv_heads=2,
        final_logit_softcap=2.0,
        use_post_attn_norm=True,
        use_pre_ffw_norm=True,
        use_post_ffw_norm=True,
        sliding_window_size=4,
        attention_types=(gemma.AttentionType.LOCAL_SLIDING, gemma.AttentionType.GLOBAL),
    )
    return gemma.Transformer(config, rngs=nnx.Rngs(0))


def _inputs(seed=0, b=3, t=9):
    """Tunix's loss_fn keyword arguments: right padding in row 1, a masked prompt in row 2."""
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, V)
    mask = jnp.ones((b, t), bool).at[1, 6:].set(False).at[2, :3].set(False)
    real = jnp.ones((b, t), bool).at[1, 6:].set(False)
    return {
        "input_tokens": tokens,
        "input_mask": mask,
        "positions": utils.build_positions_from_mask(real),
        "attention_mask": utils.make_causal_attn_mask(real),
    }


def _optax_loss(model, inputs, a):
    """Oracle: the model's own dense logits, optax's smoothed labels and cross-entropy, masked mean."""
    logits, _ = model(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
    logits, targets = logits[:, :-1], inputs["input_tokens"][:, 1:]
    mask = inputs["input_mask"][:, 1:].astype(jnp.float32)
    smoothed = optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(targets, V), a))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (logits.argmax(-1) == targets).astype(jnp.float32)
    mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
    return mean(smoothed), {"nll": mean(nll), "accuracy": mean(correct), "tokens": mask.sum()}


@pytest.mark.parametrize("kind", ["qwen2", "qwen2_tied", "gemma"])
def test_loss_and_gradient_equal_optax_on_dense_logits(kind):
    model, inputs, a = _model(kind), _inputs(), 0.1
    weight, layout = head(model)
    assert layout == ("dv" if kind == "qwen2" else "vd") and weight.shape == ((32, V) if layout == "dv" else (V, 32))
    fn = loss_fn(label_smoothing=a)
    (loss, aux), grads = nnx.value_and_grad(lambda m: fn(m, **inputs), has_aux=True)(model)
    (want, ref), want_grads = nnx.value_and_grad(lambda m: _optax_loss(m, inputs, a), has_aux=True)(model)
    np.testing.assert_allclose(loss, want, rtol=2e-6)
    np.testing.assert_allclose(aux["nll"], ref["nll"], rtol=2e-6)  # the true NLL, below the smoothed loss here
    np.testing.assert_allclose(aux["perplexity"], np.exp(ref["nll"]), rtol=1e-5)
    np.testing.assert_allclose(aux["accuracy"], ref["accuracy"])
    assert int(aux["tokens"]) == int(ref["tokens"]) == 8 + 5 + 6
    for (path, g), (_, w) in zip(nnx.to_flat_state(nnx.state(grads)), nnx.to_flat_state(nnx.state(want_grads))):
        np.testing.assert_allclose(g.get_value(), w.get_value(), rtol=1e-4, atol=1e-7, err_msg=str(path))
    assert not nnx.state(model, nnx.Intermediate)  # the sown hidden state was taken back


@pytest.mark.parametrize("kind", ["qwen2", "gemma"])
def test_peft_trainer_trains_with_the_fused_loss(kind, tmp_path):
    model, batch = _model(kind), _inputs(seed=1, b=4)
    fn = loss_fn(label_smoothing=0.1)
    score = nnx.jit(lambda m: fn(m, **batch)[0])
    before = float(score(model))
    config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=6, pbar_description=None)
    trainer = peft_trainer.PeftTrainer(model, optax.adam(1e-2), config)
    trainer = trainer.with_gen_model_input_fn(lambda x: x).with_loss_fn(fn, has_aux=True)
    trainer.train([batch] * 6)
    after = float(score(model))
    assert trainer.train_steps == 6 and after < before - 0.5, (before, after)
    np.testing.assert_allclose(after, _optax_loss(model, batch, 0.1)[0], rtol=2e-6)


def test_the_models_own_logits_are_dropped_under_jit():
    """The model still returns its [B, T, V] logits; compiled, nothing of that shape is left (the
    loss's own vocabulary blocks are [N, block] over the flattened tokens)."""
    model, inputs = _model("gemma"), _inputs()
    graphdef, state = nnx.split(model)
    loss = lambda s: loss_fn(label_smoothing=0.1)(nnx.merge(graphdef, s), **inputs)[0]  # noqa: E731
    hlo = jax.jit(jax.value_and_grad(loss)).lower(state).compile().as_text()
    assert f"f32[3,9,{V}]" not in hlo and f"f32[3,8,{V}]" not in hlo
    logits, _ = model(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
    assert logits.shape == (3, 9, V)  # what the check above would find if XLA kept it


def test_sown_hidden_states_names_what_was_sown():
    model = _model("qwen2")
    inputs = _inputs()
    call = lambda: model(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])  # noqa: E731
    with pytest.raises(ValueError, match="sowed no nnx.Intermediate named 'all_hidden_states'"):
        sown_hidden_states(model, call)
    with pytest.raises(TypeError, match="not a Tunix causal LM"):
        head(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
