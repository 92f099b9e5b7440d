"""NNX models vs transformers' PyTorch implementations on tiny random checkpoints (fp32, CPU).

Each checkpoint is saved with ``save_pretrained`` (safetensors) to a temp dir and read back
with ``from_pretrained``; logits are compared on a batch with right and left padding, only at
real tokens. HF gets explicit position ids (count of real tokens before each one), which is
what our models use by default.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from ls_jax.models import (
    CausalLM,
    CausalLMProtocol,
    SequenceClassifier,
    check_pretrained,
    from_config,
    from_pretrained,
    save_pretrained,
    sequence_classification_loss,
    tiny_llama_config,
)

V, PAD = 128, 0
TOL = 1e-4
TINY = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    pad_token_id=PAD,
    max_position_embeddings=256,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY),
    "llama3_rope_bias_tied": lambda: LlamaConfig(
        **TINY,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        rope_theta=10000.0,  # legacy config.json layout of Llama 3.1, as on the hub
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        },
    ),
    "mistral_sliding": lambda: MistralConfig(**TINY, sliding_window=3),
    "qwen2_bias_sliding": lambda: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "gemma2": lambda: Gemma2Config(
        **TINY,
        head_dim=16,
        sliding_window=3,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
    ),
}


def perturbed(hf_model, seed=0):
    """Add noise to every parameter so norms, biases and heads are not at their trivial init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return hf_model.eval()


def save_hf(config, path, cls=AutoModelForCausalLM, **save_kwargs):
    """A randomly initialised, perturbed HF model of ``config`` saved to ``path`` (safetensors)."""
    torch.manual_seed(0)
    hf = perturbed(cls.from_config(config, attn_implementation="eager"))
    hf.save_pretrained(path, **save_kwargs)
    return hf


def perturbed_nnx(model, seed=0):
    """Add noise to every parameter of an NNX model (norms and biases off their trivial init)."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def padded_batch(seed=0, b=3, t=11):
    """ids [B, T] (pad id at padding), mask [B, T]: row 0 full, row 1 right-, row 2 left-padded."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, V, size=(b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, t - 4 :] = 0
    mask[2, :3] = 0
    return np.where(mask == 1, ids, PAD), mask


def hf_positions(mask):
    return np.maximum(np.cumsum(mask, -1) - 1, 0)


def hf_logits(hf, ids, mask):
    with torch.no_grad():
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(hf_positions(mask)))
    return out.logits.float().numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal_lm_logits_match_transformers(name, tmp_path):
    hf = save_hf(CONFIGS[name](), tmp_path)
    model = from_pretrained(str(tmp_path))
    assert isinstance(model, CausalLM) and isinstance(model, CausalLMProtocol)
    ids, mask = padded_batch()
    ours = np.asarray(model.logits(jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 0.5  # the comparison is not between near-zero logits
    assert np.abs(ours[real] - ref[real]).max() < TOL


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_hf(CONFIGS["gemma2"](), tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    ids, mask = padded_batch(1)
    ours = np.asarray(from_pretrained(str(tmp_path)).logits(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert np.abs(ours[real] - hf_logits(hf, ids, mask)[real]).max() < TOL


def test_packed_segments_equal_separate_sequences():
    model = from_config(CONFIGS["gemma2"](), seed=1)
    logits = nnx.jit(lambda m, ids, seg: m.logits(ids, segment_ids=seg))
    a, b = np.random.RandomState(2).randint(3, V, size=(2, 1, 6))
    packed = logits(model, jnp.asarray(np.concatenate([a, b], axis=1)), jnp.asarray([[0] * 6 + [1] * 6]))
    separate = logits(model, jnp.asarray(np.concatenate([a, b])), jnp.zeros((2, 6), jnp.int32))
    np.testing.assert_allclose(np.asarray(packed)[0, :6], np.asarray(separate)[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(packed)[0, 6:], np.asarray(separate)[1], atol=1e-5)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"gpt2.*supported model types: \['gemma2', 'llama', 'mistral', 'qwen2'\]"):
        from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="supported model types"):
        from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2))


def test_checkpoint_mismatch_is_an_error(tmp_path):
    save_hf(CONFIGS["llama"](), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    for load in (from_pretrained, check_pretrained):  # check_pretrained: from the headers, no weights read
        with pytest.raises(ValueError, match=r"mlp\.\w+_proj\.weight: checkpoint shape \(\d+, \d+\), model expects"):
            load(str(tmp_path))


def test_check_pretrained_finds_missing_files(tmp_path):
    save_hf(CONFIGS["gemma2"](), tmp_path, max_shard_size="40KB")
    check_pretrained(str(tmp_path))  # a complete checkpoint passes
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    for load in (from_pretrained, check_pretrained):
        with pytest.raises(FileNotFoundError, match=f"missing checkpoint file {shard}"):
            load(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        check_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["gemma2", "qwen2_bias_sliding"])
def test_sequence_classification_matches_transformers(name, tmp_path):
    config = CONFIGS[name]()
    config.num_labels = 3
    hf = save_hf(config, tmp_path, cls=AutoModelForSequenceClassification)
    model = from_pretrained(str(tmp_path))
    assert isinstance(model, SequenceClassifier)
    ids, mask = padded_batch(3)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    assert ours.shape == (3, 3) and np.abs(ours - ref).max() < TOL

    # training objective: smoothed CE with soft labels == torch's cross_entropy on HF's logits
    soft = np.random.RandomState(4).dirichlet(np.ones(3), size=3).astype(np.float32)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(soft)}
    loss, metrics = sequence_classification_loss(model, batch, label_smoothing=0.1)
    ref_loss = torch.nn.functional.cross_entropy(torch.tensor(ref), torch.tensor(soft), label_smoothing=0.1)
    assert abs(float(loss) - float(ref_loss)) < TOL
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(ref.argmax(-1) == soft.argmax(-1)))
    hard = np.array([2, 0, 1])
    loss, _ = sequence_classification_loss(model, dict(batch, labels=jnp.asarray(hard)), label_smoothing=0.2)
    ref_loss = torch.nn.functional.cross_entropy(torch.tensor(ref), torch.tensor(hard), label_smoothing=0.2)
    assert abs(float(loss) - float(ref_loss)) < TOL


def test_classifier_from_causal_checkpoint_initialises_score(tmp_path):
    save_hf(CONFIGS["gemma2"](), tmp_path)
    lm = from_pretrained(str(tmp_path))
    clf = from_pretrained(str(tmp_path), task="sequence_classification", num_labels=3)
    ids, mask = padded_batch(5)
    np.testing.assert_array_equal(
        np.asarray(clf.model(jnp.asarray(ids), jnp.asarray(mask))), np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))
    )
    assert clf.score.kernel[...].shape == (64, 3) and float(jnp.abs(clf.score.kernel[...]).max()) > 0
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.array([0, 1, 2])}
    grads = nnx.jit(nnx.grad(lambda m: sequence_classification_loss(m, batch, label_smoothing=0.1)[0]))(clf)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_remat_gives_the_same_gradients():
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(2, 6)))

    def grads(remat):
        model = from_config(tiny_llama_config(vocab_size=64, hidden_size=32), remat=remat)
        return nnx.jit(nnx.grad(lambda m: jnp.mean(m.logits(ids) ** 2)))(model)

    ref = grads(False)
    for remat in (True, "full", "dots"):
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(grads(remat))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="remat must be one of"):
        from_config(tiny_llama_config(vocab_size=64, hidden_size=32), remat="some")


def test_bf16_parameters_and_compute(tmp_path):
    save_hf(CONFIGS["llama"](), tmp_path)
    f32 = from_pretrained(str(tmp_path))
    bf16 = from_pretrained(str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    ids, mask = padded_batch(6)
    hidden = bf16(jnp.asarray(ids), jnp.asarray(mask))
    assert hidden.dtype == jnp.bfloat16
    lo, hi = (np.asarray(m.logits(jnp.asarray(ids), jnp.asarray(mask))) for m in (bf16, f32))
    real = mask.astype(bool)
    assert lo.dtype == np.float32
    assert np.abs(lo[real] - hi[real]).max() < 0.05 * np.abs(hi[real]).max()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_pretrained_round_trip_and_transformers(name, tmp_path):
    """from_config -> save_pretrained: from_pretrained gives bit-identical logits, and
    transformers' torch model loaded from the same directory gives the same logits."""
    model = perturbed_nnx(from_config(CONFIGS[name](), seed=1))
    save_pretrained(model, str(tmp_path))
    ids, mask = padded_batch()
    ours = np.asarray(model.logits(jnp.asarray(ids), jnp.asarray(mask)))
    loaded = np.asarray(from_pretrained(str(tmp_path)).logits(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(loaded, ours)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True, attn_implementation="eager").eval()
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 0.5
    assert np.abs(ours[real] - ref[real]).max() < TOL
    with safe_open(str(tmp_path / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
    assert ("lm_head.weight" in names) == (not model.spec.tie_word_embeddings)  # tied: stored once
    assert names == {k for k in hf.state_dict() if k != "lm_head.weight" or not model.spec.tie_word_embeddings}


def test_save_pretrained_keeps_bf16_and_takes_an_explicit_config(tmp_path):
    config = CONFIGS["llama"]()
    model = from_config(config, param_dtype=jnp.bfloat16)
    del model.hf_config  # a model that does not carry its config
    with pytest.raises(ValueError, match="pass config="):
        save_pretrained(model, str(tmp_path))
    save_pretrained(model, str(tmp_path), config=config)
    with safe_open(str(tmp_path / "model.safetensors"), framework="flax") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {jnp.dtype(jnp.bfloat16)}
    loaded = from_pretrained(str(tmp_path), param_dtype=jnp.bfloat16)
    ids, mask = padded_batch()
    np.testing.assert_array_equal(
        np.asarray(loaded.logits(jnp.asarray(ids), jnp.asarray(mask)), np.float32),
        np.asarray(model.logits(jnp.asarray(ids), jnp.asarray(mask)), np.float32),
    )


def test_save_pretrained_classifier_from_a_causal_config(tmp_path):
    """A classifier built from a causal-LM config is written as *ForSequenceClassification:
    from_pretrained and transformers give its logits."""
    config = CONFIGS["qwen2_bias_sliding"]()
    model = perturbed_nnx(from_config(config, task="sequence_classification", num_labels=3, seed=2))
    save_pretrained(model, str(tmp_path))
    assert config.architectures is None  # the caller's config is not modified
    ids, mask = padded_batch(3)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    loaded = from_pretrained(str(tmp_path))
    assert isinstance(loaded, SequenceClassifier)
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask))), ours)
    hf = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path), local_files_only=True, attn_implementation="eager"
    ).eval()
    ref = hf_logits(hf, ids, mask)
    assert ours.shape == (3, 3) and np.abs(ref).max() > 0.1 and np.abs(ours - ref).max() < TOL
