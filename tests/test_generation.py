"""Generation: greedy tokens equal transformers' ``generate`` (torch, fp32) on tiny random
checkpoints; the KV-cached path gives the no-cache logits; log-probabilities, EOS, stop strings,
sampling (temperature, top-p, seed) and bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_models import CONFIGS, perturbed_nnx, save_hf

from ls_jax.generation import generate, top_p_filter
from ls_jax.models import KVCache, from_config, from_pretrained
from ls_jax.tokenizer import train_bpe_tokenizer

PROMPTS = ["hello world 3", "hi", "plus 4 plus 5 hello world 12", "world"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([f"hello world {i} plus {3 * i}" for i in range(100)], vocab_size=300)


def encode(tok, prompts):
    return [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def hf_generate(hf, prompts, max_new_tokens, eos, pad):
    """transformers' greedy generate on the left-padded batch: each row's new tokens, cut after eos."""
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad)
    mask = np.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    rows = out[:, width:].tolist()
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


@pytest.mark.parametrize("name", ["llama", "qwen2_bias_sliding", "gemma2"])
def test_greedy_equals_transformers_generate(name, tok, tmp_path):
    config = CONFIGS[name]()
    config.vocab_size = len(tok)
    config.tie_word_embeddings = False  # tied, sqrt(D)-scaled embeddings: the random Gemma repeats its last token
    hf = save_hf(config, tmp_path)
    model = from_pretrained(str(tmp_path))
    prompts = encode(tok, PROMPTS)
    free = generate(model, tok, prompts, max_new_tokens=9, eos_token_id=[], batch_size=4)
    assert [g.tokens for g in free] == hf_generate(hf, prompts, 9, None, tok.pad_token_id)
    assert all(g.finish_reason == "length" and len(g.tokens) == 9 for g in free)
    # an eos that some row r first produces at its k-th token (k >= 3): row r stops there, all rows as transformers
    r, k = next(
        (r, k + 1) for r, g in enumerate(free) for k, t in enumerate(g.tokens) if k >= 2 and t not in g.tokens[:k]
    )
    eos = free[r].tokens[k - 1]
    ended = generate(model, tok, prompts, max_new_tokens=9, eos_token_id=eos, batch_size=4)
    assert [g.tokens for g in ended] == hf_generate(hf, prompts, 9, eos, tok.pad_token_id)
    assert ended[r].finish_reason == "eos" and ended[r].tokens == free[r].tokens[:k]
    assert ended[r].text == tok.decode(free[r].tokens[: k - 1], skip_special_tokens=True)


@pytest.mark.parametrize("name", ["gemma2", "qwen2_bias_sliding"])
def test_kv_cache_gives_the_no_cache_logits(name):
    """Prefill of a left-padded prompt, then one token at a time through the cache, equals one
    pass over the whole sequence (sliding window 3 < sequence length, so windows are exercised)."""
    model = from_config(CONFIGS[name](), seed=1)
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 128, size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded
    full = np.asarray(nnx.jit(lambda m, x, k: m.logits(x, k))(model, jnp.asarray(ids), jnp.asarray(mask)))
    prompt = 5
    step = nnx.jit(lambda m, t, k, c: m(t, k, cache=c))
    hidden, cache = step(
        model, jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]), KVCache.empty(model.spec, 2, 16)
    )
    cached = [model.project(hidden)]
    for t in range(prompt, ids.shape[1]):
        hidden, cache = step(model, jnp.asarray(ids[:, t : t + 1]), None, cache)
        cached.append(model.project(hidden))
    cached = np.concatenate([np.asarray(c) for c in cached], axis=1)
    real = mask.astype(bool)
    assert int(cache.index) == ids.shape[1] and np.array_equal(np.asarray(cache.mask)[:, :12], mask)
    np.testing.assert_allclose(cached[real], full[real], atol=2e-5, rtol=0)


def test_logprobs_are_the_models_and_stop_strings_cut(tok):
    config = CONFIGS["gemma2"]()
    config.vocab_size = len(tok)
    model = from_config(config, seed=2)
    prompts = encode(tok, PROMPTS[:3])
    gens = generate(model, tok, prompts, max_new_tokens=12, eos_token_id=[], batch_size=2)  # 2 batches
    # teacher-forced oracle: one pass over each prompt + generation (right-padded together)
    seqs = [p + g.tokens for p, g in zip(prompts, gens)]
    width = max(map(len, seqs))
    ids = np.asarray([s + [0] * (width - len(s)) for s in seqs])
    logp = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, x: m.logits(x))(model, jnp.asarray(ids)), axis=-1))
    for row, (p, g) in enumerate(zip(prompts, gens)):
        at = np.arange(len(p) - 1, len(p) - 1 + len(g.tokens))
        expected = logp[row, at, g.tokens]
        np.testing.assert_allclose(g.logprobs, expected, atol=1e-5)
        assert g.logprob == pytest.approx(float(expected.sum()), abs=1e-4)
    # a stop string taken from row 1's text: that row ends just before it, the others are unchanged
    text = gens[1].text
    stop = text[4:6]
    stopped = generate(model, tok, prompts, max_new_tokens=12, eos_token_id=[], stop=[stop], chunk=4, batch_size=2)
    first = text.index(stop)
    assert stopped[1].finish_reason == "stop" and stopped[1].text == text[:first]
    n = len(stopped[1].tokens)
    assert stopped[1].tokens == gens[1].tokens[:n] and stop in tok.decode(stopped[1].tokens)
    assert stop not in tok.decode(stopped[1].tokens[:-1])
    for a, b in zip(stopped, gens):
        if stop not in b.text:
            assert a.tokens == b.tokens and a.finish_reason == "length"


def test_top_p_filter_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25]]))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
    # row 0: 0.5 + 0.3 reaches 0.7; row 1: ties with the last kept token are kept
    assert kept.tolist() == [[True, False, True, False], [True, True, True, True]]
    assert np.isfinite(np.asarray(top_p_filter(logits, 1e-6))).sum(-1).tolist() == [1, 4]


def test_sampling_follows_the_softmax_and_the_seed(tok):
    config = CONFIGS["llama"]()
    config.vocab_size = len(tok)
    model = perturbed_nnx(from_config(config, seed=3))
    prompt = encode(tok, ["hello"])
    n, temperature = 512, 0.5
    draws = generate(
        model, tok, prompt * n, max_new_tokens=1, temperature=temperature, seed=0, batch_size=n, eos_token_id=[]
    )
    freq = np.bincount([g.tokens[0] for g in draws], minlength=len(tok)) / n
    probs = np.asarray(jax.nn.softmax(model.logits(jnp.asarray(prompt))[0, -1] / temperature))
    top = np.argsort(-probs)[:5]
    assert probs[top].sum() > 0.3  # peaked enough for a test with 512 draws
    bound = 4 * np.sqrt(probs[top] * (1 - probs[top]) / n)  # 4 standard deviations of each frequency
    assert (np.abs(freq[top] - probs[top]) < bound).all(), (freq[top], probs[top])
    again = generate(
        model, tok, prompt * n, max_new_tokens=1, temperature=temperature, seed=0, batch_size=n, eos_token_id=[]
    )
    other = generate(
        model, tok, prompt * n, max_new_tokens=1, temperature=temperature, seed=1, batch_size=n, eos_token_id=[]
    )
    assert [g.tokens for g in again] == [g.tokens for g in draws] != [g.tokens for g in other]
    # same shapes as above (one compilation each for sampling and greedy): a tiny nucleus is greedy
    greedy = generate(model, tok, prompt * n, max_new_tokens=5, batch_size=n, eos_token_id=[])
    nucleus = generate(
        model, tok, prompt * n, max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=4, batch_size=n, eos_token_id=[]
    )
    assert [g.tokens for g in nucleus] == [g.tokens for g in greedy]


def test_bad_arguments_are_clear_errors(tok):
    model = from_config(CONFIGS["llama"](), seed=0)
    for kwargs, match in [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(batch_size=0), "batch_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            generate(model, tok, ["hi"], **kwargs)
    with pytest.raises(ValueError, match=r"prompts\[1\] has no tokens"):
        generate(model, tok, [[3, 4], []])
    with pytest.raises(TypeError, match="not one string"):
        generate(model, tok, "hi")
