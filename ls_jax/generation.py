"""Batched text generation with the causal LMs here: greedy or sampled, KV-cached, jit-compiled.

``generate(model, tokenizer, prompts)`` returns one :class:`Generation` per prompt: the new
text, its token ids, each token's log-probability under the model and why it stopped.
Prompts are left-padded into batches; the prompt (prefill) and each decoding step run as
jit-compiled functions over a fixed-size :class:`~ls_jax.models.KVCache`. Shapes are bucketed
(prompt length and cache size to powers of two, the batch to ``batch_size``), so a run over many
prompts compiles a handful of times, not once per batch.

Greedy decoding takes the lowest-index argmax, like ``transformers``' ``generate``; with the
same checkpoint in float32 both produce the same tokens (tested). Log-probabilities are those
of the model itself (``log_softmax`` of the logits: temperature 1, no top-p), so
:attr:`Generation.logprob` is the log-probability of the whole generated sequence (its EOS
included), usable as the confidence of an answer.
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ls_jax.data import prompt_ids
from ls_jax.models.transformer import KVCache


@dataclass
class Generation:
    """One prompt's continuation.

    text: the decoded new tokens, up to (not including) the EOS token or stop string.
    tokens: the generated ids; the EOS token is the last one when it ended the sequence; with a
    stop string, the fewest tokens whose text contains it.
    logprobs: float32 ``[len(tokens)]``, ``log p(token | prompt, previous tokens)``.
    finish_reason: "eos", "stop" (a stop string) or "length" (``max_new_tokens`` reached).
    """

    text: str
    tokens: list[int]
    logprobs: np.ndarray
    finish_reason: str

    @property
    def logprob(self) -> float:
        """Log-probability of the whole generated sequence: the float64 sum of :attr:`logprobs`.

        Examples:
          >>> import numpy as np
          >>> from ls_jax.generation import Generation
          >>> g = Generation("4", [23, 2], np.log(np.array([0.5, 0.8], np.float32)), "eos")
          >>> print(round(float(np.exp(g.logprob)), 4))
          0.4
        """
        return float(np.sum(self.logprobs, dtype=np.float64))


class _State(NamedTuple):
    """Decoding state carried between steps (a pytree; B rows, N output slots)."""

    logits: jax.Array  # float32 [B, V]: next-token logits
    cache: KVCache
    tokens: jax.Array  # int32 [B, N]: generated ids (pad after a row is done)
    logprobs: jax.Array  # float32 [B, N]
    done: jax.Array  # bool [B]
    step: jax.Array  # int32 scalar: tokens generated so far
    key: jax.Array  # PRNG key of the sampling


def _bucket(n: int, floor: int) -> int:
    """The smallest power of two >= max(n, floor)."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """Nucleus (top-p) filtering: every token outside the top-p nucleus set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (ties with its last one kept).

    Args:
      logits: float ``[B, V]``.
      top_p: the probability mass kept, in (0, 1].

    Returns:
      ``logits`` with the tokens outside the nucleus at -inf, ``[B, V]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from ls_jax.generation import top_p_filter
      >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
      >>> print(jnp.isfinite(top_p_filter(logits, 0.7)).tolist())
      [[True, True, False]]
    """
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    kept = jnp.where(before < top_p, ordered, jnp.inf).min(-1, keepdims=True)
    return jnp.where(logits >= kept, logits, -jnp.inf)


def _choose(logits, key, temperature, top_p, sample: bool):
    """Next token ``[B]``: argmax, or a draw from ``softmax(logits / temperature)`` in the nucleus."""
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, top_p_filter(logits / temperature, top_p)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "out_slots"))
def _prefill(graphdef, params, ids, mask, out_slots: int, key):
    """Run the left-padded prompts ``ids [B, P]`` into a fresh cache of ``P + out_slots`` slots."""
    model = nnx.merge(graphdef, params)
    b, p = ids.shape
    cache = KVCache.empty(model.spec, b, p + out_slots, model.model.dtype)
    hidden, cache = model(ids, mask, cache=cache)
    return _State(
        model.project(hidden[:, -1]),
        cache,
        jnp.zeros((b, out_slots), jnp.int32),
        jnp.zeros((b, out_slots), jnp.float32),
        ~mask.any(-1),
        jnp.zeros((), jnp.int32),
        key,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "sample"), donate_argnames=("state",))
def _decode(graphdef, params, state: _State, until, eos_ids, pad_id, temperature, top_p, sample: bool):
    """Generate until ``state.step == until`` or every row is done."""
    model = nnx.merge(graphdef, params)

    def running(s):
        return (s.step < until) & ~s.done.all()

    def step(s):
        token = _choose(s.logits, jax.random.fold_in(s.key, s.step), temperature, top_p, sample)
        logprob = jnp.take_along_axis(jax.nn.log_softmax(s.logits, axis=-1), token[:, None], axis=-1)[:, 0]
        token = jnp.where(s.done, pad_id, token)
        logprob = jnp.where(s.done, 0.0, logprob)
        hidden, cache = model(token[:, None], (~s.done)[:, None].astype(jnp.int32), cache=s.cache)
        return _State(
            model.project(hidden[:, 0]),
            cache,
            s.tokens.at[:, s.step].set(token),
            s.logprobs.at[:, s.step].set(logprob),
            s.done | jnp.isin(token, eos_ids),
            s.step + 1,
            s.key,
        )

    return jax.lax.while_loop(running, step, state)


def _check(max_new_tokens, temperature, top_p, batch_size, chunk):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if batch_size < 1 or chunk < 1:
        raise ValueError(f"batch_size and chunk must be >= 1, got {batch_size!r} and {chunk!r}")


def _encode(prompts, tokenizer) -> list[np.ndarray]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompts (strings or token-id lists), not one string")
    out = []
    for i, p in enumerate(prompts):
        ids = prompt_ids({"prompt": p, "response": ""}, tokenizer) if isinstance(p, str) else np.asarray(p, np.int32)
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError(f"prompts[{i}] has no tokens (a prompt needs at least one)")
        out.append(ids)
    return out


def _cut_at_stop(gen_tokens, tokenizer, stop) -> tuple | None:
    """(text, token count) of the shortest prefix whose text holds a stop string, or None."""
    text = tokenizer.decode(gen_tokens, skip_special_tokens=True)
    if not any(s in text for s in stop):
        return None
    n = next(
        n
        for n in range(1, len(gen_tokens) + 1)
        if any(s in tokenizer.decode(gen_tokens[:n], skip_special_tokens=True) for s in stop)
    )
    text = tokenizer.decode(gen_tokens[:n], skip_special_tokens=True)
    return text[: min(text.index(s) for s in stop if s in text)], n


def generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] = (),
    eos_token_id: None | int | Sequence[int] = None,
    batch_size: int = 8,
    chunk: int = 16,
    progress=None,
) -> list[Generation]:
    """Continue each prompt, greedily or by sampling; one :class:`Generation` per prompt, in order.

    A sequence ends at an ``eos_token_id``, at a ``stop`` string or after ``max_new_tokens``.
    Prompts run ``batch_size`` at a time, longest first.

    Args:
      model: a :class:`~ls_jax.models.CausalLM`.
      tokenizer: its transformers tokenizer (decoding; default EOS and pad ids).
      prompts: strings (encoded as training encodes a prompt, :func:`ls_jax.data.prompt_ids`:
        bos + tokens) or token-id lists.
      max_new_tokens: the most tokens generated per prompt, >= 1.
      temperature: 0 is greedy (lowest-index argmax); > 0 samples from
        ``softmax(logits / temperature)`` restricted to the ``top_p`` nucleus.
      top_p: the nucleus mass, in (0, 1] (:func:`top_p_filter`).
      seed: the sampling seed (reproducible for a seed and the same batching).
      stop: strings that end a sequence (checked every ``chunk`` tokens, cut exactly).
      eos_token_id: the end token (default: the tokenizer's), a list for several, ``[]`` for none.
      batch_size: prompts per batch, >= 1.
      chunk: decoding steps between stop-string checks, >= 1.
      progress: optional callable taking the number of prompts just finished (e.g. a tqdm
        bar's ``update``).

    Returns:
      list of :class:`Generation`, one per prompt.

    Raises:
      TypeError: ``prompts`` is one string instead of a sequence.
      ValueError: a prompt has no tokens, or ``max_new_tokens``, ``temperature``, ``top_p``,
        ``batch_size`` or ``chunk`` is out of range.

    Examples:
      >>> from ls_jax.generation import generate
      >>> from ls_jax.models import from_config, tiny_llama_config
      >>> from ls_jax.tokenizer import train_bpe_tokenizer
      >>> tok = train_bpe_tokenizer(["hello world", "the answer is 42"])
      >>> model = from_config(tiny_llama_config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1))
      >>> out = generate(model, tok, ["hello", "the answer is"], max_new_tokens=4, eos_token_id=[])
      >>> print(len(out), [g.finish_reason for g in out], [len(g.tokens) for g in out], out[0].logprobs.shape)
      2 ['length', 'length'] [4, 4] (4,)
      >>> ids = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in ["hello", "the answer is"]]
      >>> [g.tokens for g in generate(model, tok, ids, max_new_tokens=4, eos_token_id=[])] == [g.tokens for g in out]
      True
    """
    _check(max_new_tokens, temperature, top_p, batch_size, chunk)
    encoded = _encode(prompts, tokenizer)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else np.atleast_1d(eos).tolist()
    eos_ids = np.full(_bucket(len(eos), 4), -1, np.int32)  # padded with an id no token has: one shape
    eos_ids[: len(eos)] = eos
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
    graphdef, params = nnx.split(model)
    rows = min(batch_size, _bucket(len(encoded), 1))
    out_slots = _bucket(max_new_tokens, chunk)
    key = jax.random.key(seed)
    results: list[Generation | None] = [None] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), rows):
        members = order[start : start + rows]
        width = _bucket(max(len(encoded[i]) for i in members), 8)
        ids = np.full((rows, width), pad_id, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for r, i in enumerate(members):
            ids[r, width - len(encoded[i]) :] = encoded[i]
            mask[r, width - len(encoded[i]) :] = 1
        state = _prefill(
            graphdef, params, jnp.asarray(ids), jnp.asarray(mask), out_slots, jax.random.fold_in(key, start)
        )
        args = (jnp.asarray(eos_ids), pad_id, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), temperature > 0)
        while True:
            until = min(int(state.step) + chunk, max_new_tokens) if stop else max_new_tokens
            state = _decode(graphdef, params, state, until, *args)
            steps, done = int(state.step), np.asarray(state.done)
            if stop:  # end the rows whose text holds a stop string (cut exactly in _finish)
                tokens = np.asarray(state.tokens)
                hit = [
                    not d and any(s in tokenizer.decode(t[:steps].tolist(), skip_special_tokens=True) for s in stop)
                    for d, t in zip(done, tokens)
                ]
                state = state._replace(done=jnp.asarray(done | np.asarray(hit)))
            if steps >= max_new_tokens or bool(state.done.all()):
                break
        tokens, logprobs = np.asarray(state.tokens), np.asarray(state.logprobs)
        for r, i in enumerate(members):
            results[i] = _finish(tokens[r, :steps], logprobs[r, :steps], set(eos), stop, tokenizer)
        if progress is not None:
            progress(len(members))
    return results


def _finish(tokens: np.ndarray, logprobs: np.ndarray, eos: set, stop, tokenizer) -> Generation:
    """The :class:`Generation` of one row's generated slots."""
    ends = [k for k, t in enumerate(tokens.tolist()) if t in eos]
    n, reason = (ends[0] + 1, "eos") if ends else (len(tokens), "length")
    body = tokens[: n - 1] if ends else tokens[:n]
    cut = _cut_at_stop(body.tolist(), tokenizer, stop) if stop else None
    if cut is not None:
        text, n = cut
        return Generation(text, tokens[:n].tolist(), logprobs[:n].copy(), "stop")
    return Generation(
        tokenizer.decode(body.tolist(), skip_special_tokens=True), tokens[:n].tolist(), logprobs[:n].copy(), reason
    )
