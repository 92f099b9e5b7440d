"""Attention through ``jax.nn.dot_product_attention`` (issue 24) equals the explicit einsum path:
GQA, fp32 / bf16, padding, packing, sliding windows, KV-cache offsets, gradients; the models on it
equal transformers; the path choice (``attention_path``); the train step's unpacked inputs.
Splash attention (the TPU kernel, in Pallas interpret mode here) equals the explicit path too:
GQA, fp32 / bf16, windows, Gemma 2's softcap, gradients, the models."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import CONFIGS, TOL, V, hf_logits, padded_batch, perturbed_nnx, save_hf

from ls_jax.models import CausalLM, from_config, from_pretrained, layers, splash
from ls_jax.models.layers import AttentionMask, attention, attention_path, token_mask
from ls_jax.train.config import LossOptions
from ls_jax.train.step import _loss_sum, model_inputs

B, T, H, K, DH = 3, 10, 4, 2, 8


def qkv(dtype, s=T, seed=0):
    """Random q ``[B, T, H, Dh]`` and k, v ``[B, s, K, Dh]`` in ``dtype``."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(kq, (B, T, H, DH)).astype(dtype),
        jax.random.normal(kk, (B, s, K, DH)).astype(dtype),
        jax.random.normal(kv, (B, s, K, DH)).astype(dtype),
    )


def padding():
    """int32 [B, T]: row 0 full, row 1 right-, row 2 left-padded."""
    m = np.ones((B, T), np.int32)
    m[1, -3:] = 0
    m[2, :4] = 0
    return jnp.asarray(m)


MASKS = {
    "causal": lambda: AttentionMask(),
    "padding": lambda: AttentionMask(token_mask(padding(), None, (B, T))),
    "packed": lambda: AttentionMask(token_mask(padding(), jnp.asarray([[1] * 4 + [2] * 6] * B), (B, T))),
}


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("kind", sorted(MASKS))
def test_dot_product_attention_equals_the_explicit_path(kind, window, dtype, tol):
    q, k, v = qkv(dtype)
    mask = MASKS[kind]()
    run = jax.jit(
        lambda q, k, v, impl: attention(q, k, v, mask, scale=0.3, window=window, implementation=impl), static_argnums=3
    )
    fused, explicit = run(q, k, v, "auto"), run(q, k, v, "explicit")
    assert fused.dtype == dtype and fused.shape == (B, T, H, DH)
    real = np.asarray(padding(), bool) if kind != "causal" else np.ones((B, T), bool)
    np.testing.assert_allclose(
        np.asarray(fused, np.float32)[real], np.asarray(explicit, np.float32)[real], atol=tol, rtol=0
    )


def test_causal_form_equals_the_dense_causal_mask_and_gradients_match():
    q, k, v = qkv(jnp.float32)
    dense = AttentionMask(token_mask(None, None, (B, T)))

    def loss(impl, mask):
        return jax.grad(
            lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, scale=0.3, window=4, implementation=impl))),
            argnums=(0, 1, 2),
        )(q, k, v)

    ref = loss("explicit", dense)
    for impl, mask in (("auto", AttentionMask()), ("xla", dense), ("explicit", AttentionMask())):
        for a, b in zip(loss(impl, mask), ref):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
def test_cache_offset_queries(window):
    """A few queries at slots 5.. against 12 key slots (a KV cache's decoding step), left padding."""
    s, offset = 12, 5
    q, k, v = qkv(jnp.float32, s=s)
    keys = np.ones((B, s), np.int32)
    keys[2, :2] = 0
    mask = AttentionMask(token_mask(jnp.asarray(keys), None, (B, 3), jnp.int32(offset)), jnp.int32(offset))
    q = q[:, :3]
    out = {
        impl: attention(q, k, v, mask, scale=0.3, window=window, implementation=impl) for impl in ("auto", "explicit")
    }
    np.testing.assert_allclose(out["auto"], out["explicit"], atol=1e-5)


def test_attention_path():
    causal = AttentionMask()
    softcapped = "splash" if splash.on_tpu() else "explicit"  # Gemma 2
    assert attention_path("auto", causal, 50.0, jnp.bfloat16, 128, 128) == softcapped
    assert attention_path("explicit", causal, None, jnp.bfloat16, 128, 128) == "explicit"
    assert attention_path("auto", causal, None, jnp.bfloat16, 128, 128) == ("cudnn" if layers.on_cuda() else "xla")
    with pytest.raises(ValueError, match="supported"):
        attention_path("flash", causal, None, jnp.bfloat16, 128, 128)


def test_auto_takes_cudnn_where_it_applies_on_a_gpu(monkeypatch):
    monkeypatch.setattr(layers, "on_cuda", lambda: True)
    causal, dense = AttentionMask(), AttentionMask(jnp.ones((1, 2, 2), bool))
    assert attention_path("auto", causal, None, jnp.bfloat16, 128, 128) == "cudnn"
    assert attention_path("auto", causal, None, jnp.float16, 64, 128) == "cudnn"
    assert attention_path("auto", dense, None, jnp.bfloat16, 128, 128) == "xla"  # padding / packing / cache
    assert attention_path("auto", causal, None, jnp.float32, 128, 128) == "xla"
    assert attention_path("auto", causal, None, jnp.bfloat16, 256, 128) == "xla"
    assert attention_path("auto", causal, 50.0, jnp.bfloat16, 128, 128) == "explicit"


def test_auto_takes_splash_where_it_applies_on_a_tpu(monkeypatch):
    monkeypatch.setattr(splash, "on_tpu", lambda: True)
    causal, dense = AttentionMask(), AttentionMask(jnp.ones((1, 2, 2), bool))
    assert attention_path("auto", causal, None, jnp.bfloat16, 128, 4096) == "splash"
    assert attention_path("auto", causal, 50.0, jnp.bfloat16, 256, 256) == "splash"  # softcap: a splash feature
    assert attention_path("auto", causal, None, jnp.float32, 128, 128) == "splash"
    assert attention_path("auto", causal, None, jnp.bfloat16, 64, 128) == "xla"  # head dim not 128 lanes
    assert attention_path("auto", causal, 50.0, jnp.bfloat16, 128, 100) == "explicit"  # length not 128 lanes
    assert attention_path("auto", dense, None, jnp.bfloat16, 128, 128) == "xla"  # padding / packing / cache
    assert attention_path("explicit", causal, None, jnp.bfloat16, 128, 128) == "explicit"
    with pytest.raises(ValueError, match="plain causal"):
        attention_path("splash", dense, None, jnp.bfloat16, 128, 128)


SPLASH_T = 128  # the kernel's key blocks are multiples of 128 tokens


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 2.0), (5, 2.0)])
def test_splash_equals_the_explicit_path(window, softcap, dtype, tol):
    kq, kk, kv = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(kq, (2, SPLASH_T, H, DH)).astype(dtype)
    k, v = (jax.random.normal(key, (2, SPLASH_T, K, DH)).astype(dtype) for key in (kk, kv))
    run = jax.jit(
        lambda q, k, v, impl: attention(
            q, k, v, AttentionMask(), scale=0.3, softcap=softcap, window=window, implementation=impl
        ),
        static_argnums=3,
    )
    got, want = run(q, k, v, "splash"), run(q, k, v, "explicit")
    assert got.dtype == dtype and got.shape == q.shape
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=0)


def test_splash_gradients_equal_the_explicit_path():
    kq, kk, kv = jax.random.split(jax.random.key(5), 3)
    q = jax.random.normal(kq, (2, SPLASH_T, H, DH))
    k, v = (jax.random.normal(key, (2, SPLASH_T, K, DH)) for key in (kk, kv))

    def grads(impl):
        f = lambda q, k, v: jnp.sum(
            jnp.sin(attention(q, k, v, AttentionMask(), scale=0.3, softcap=2.0, window=5, implementation=impl))
        )
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    for got, want in zip(grads("splash"), grads("explicit")):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_splash_refuses_a_length_off_its_blocks():
    q, k, v = qkv(jnp.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        attention(q, k, v, AttentionMask(), scale=0.3, implementation="splash")


def with_attention(model, implementation):
    """A copy of ``model`` (same parameters) whose spec forces ``implementation``."""
    spec = dataclasses.replace(model.spec, attention=implementation)
    other = nnx.eval_shape(lambda: CausalLM(spec, rngs=nnx.Rngs(0)))
    nnx.update(other, nnx.state(model))
    return other


@pytest.mark.parametrize("name", ["llama", "mistral_sliding", "qwen2_bias_sliding", "gemma2"])
def test_models_equal_the_explicit_path_padded_and_packed(name):
    model = perturbed_nnx(from_config(CONFIGS[name](), seed=1))
    explicit = with_attention(model, "explicit")
    ids, mask = (jnp.asarray(x) for x in padded_batch())
    seg = jnp.asarray([[1] * 5 + [2] * 6] * 3)
    logits = nnx.jit(lambda m, ids, mask, seg: m.logits(ids, mask, segment_ids=seg))
    for args in ((ids, mask, None), (ids, None, seg), (ids, None, None)):
        np.testing.assert_allclose(logits(model, *args), logits(explicit, *args), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama", "mistral_sliding", "qwen2_bias_sliding", "gemma2"])
def test_causal_form_matches_transformers(name, tmp_path):
    """No mask: the plain causal form (cuDNN's on a GPU; XLA here) against transformers."""
    hf = save_hf(CONFIGS[name](), tmp_path)
    model = from_pretrained(str(tmp_path))
    ids = np.random.RandomState(3).randint(3, V, size=(2, 9))
    ours = np.asarray(model.logits(jnp.asarray(ids)))
    ref = hf_logits(hf, ids, np.ones_like(ids))
    assert np.abs(ours - ref).max() < TOL


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_models_on_splash_equal_the_explicit_path(name):
    """Llama (GQA) and Gemma 2 (sliding windows, attention softcap) through splash at 128 tokens."""
    model = perturbed_nnx(from_config(CONFIGS[name](), seed=1))
    ids = jnp.asarray(np.random.RandomState(5).randint(3, V, size=(2, SPLASH_T)))
    logits = nnx.jit(lambda m, ids: m.logits(ids))
    got, want = logits(with_attention(model, "splash"), ids), logits(with_attention(model, "explicit"), ids)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_unpacked_train_inputs_give_the_same_loss_and_gradients():
    """Right-padded one-example rows: the causal form (no mask, no segments) equals the masked one."""
    model = perturbed_nnx(from_config(CONFIGS["qwen2_bias_sliding"](), seed=1))
    ids, _ = padded_batch()
    seg = np.ones_like(ids)
    seg[1, -4:] = 0
    seg[2, -1:] = 0
    labels = np.where(seg > 0, ids, -100)
    labels[:, 0] = -100
    batch = {
        "input_ids": jnp.asarray(ids),
        "labels": jnp.asarray(labels),
        "segment_ids": jnp.asarray(seg),
        "positions": jnp.asarray(np.maximum(np.cumsum(seg, -1) - 1, 0)),
    }
    assert model_inputs(batch, packed=False)["attention_mask"] is None
    opts = LossOptions(label_smoothing=0.1)
    grads = {
        p: nnx.jit(nnx.value_and_grad(lambda m: _loss_sum(m, batch, opts, packed=p)))(model) for p in (True, False)
    }
    np.testing.assert_allclose(grads[True][0], grads[False][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads[True][1]), jax.tree.leaves(grads[False][1])):
        np.testing.assert_allclose(a, b, atol=1e-6)
