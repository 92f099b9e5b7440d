"""Answer-level calibration against independent oracles: the full logits of the model one
unpadded row at a time, the KV-cached decoder's own log-probabilities, numpy formulas, and the
trainer's tokenisation of the generated rows (one prompt format with ls_jax.evaluate)."""

import numpy as np
import pytest

from ls_jax import calibration as C
from ls_jax.answer_calibration import (
    answer_calibration,
    continuation_logits,
    generate_answers,
    option_scores,
    references,
    split_rows,
)
from ls_jax.data import IGNORE_INDEX, tokenize_example
from ls_jax.evaluate import evaluate_multiple_choice, option_token_ids
from ls_jax.generation import generate
from ls_jax.models import from_config, tiny_llama_config
from ls_jax.tokenizer import train_bpe_tokenizer
from ls_jax.train import synthetic


@pytest.fixture(scope="module")
def setup():
    train, held = synthetic.generate(400, 24, seed=3)
    tok = train_bpe_tokenizer([r["prompt"] + r["response"] for r in train])
    model = from_config(tiny_llama_config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1), seed=0)
    return tok, model, held


def test_generated_multiple_choice_rows_share_the_evaluate_format(setup):
    """ls_jax.evaluate reads the trainer's multiple-choice rows token for token: its prompt is the
    row's prompt and the option letter token is the row's response (then end-of-sequence)."""
    tok, _, held = setup
    mc, gen = split_rows(held)
    assert len(mc) == len(gen) == 12
    letters = option_token_ids(tok, synthetic.NUM_OPTIONS)
    for row in mc:
        ids, labels = tokenize_example(row, tok)
        response = ids[labels != IGNORE_INDEX].tolist()
        assert response == [letters[row["answer"]], tok.eos_token_id]
        prompt = [tok.bos_token_id] + tok(
            synthetic.format_prompt(row["question"], row["choices"]), add_special_tokens=False
        )["input_ids"]
        assert ids[labels == IGNORE_INDEX].tolist() == prompt


def test_option_scores_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, 50)
    s = option_scores(logits, labels, temperature=1.7)
    p = np.exp(logits / 1.7 - logits.max(1, keepdims=True) / 1.7)
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(s.confidence, p.max(1), rtol=1e-5)
    np.testing.assert_array_equal(s.correct, p.argmax(1) == labels)
    np.testing.assert_allclose(s.nll, -np.log(p[np.arange(50), labels]), rtol=1e-5)
    np.testing.assert_allclose(s.brier, ((p - np.eye(4)[labels]) ** 2).sum(1), rtol=1e-5)
    m = s.metrics()
    scaled = C.apply_temperature(logits, 1.7)
    assert m["ece"] == pytest.approx(float(C.calibration_error(scaled, labels, from_logits=True)), abs=1e-6)
    assert m["ece10"] == pytest.approx(
        float(C.calibration_error(scaled, labels, from_logits=True, n_bins=10)), abs=1e-6
    )
    assert m["brier"] == pytest.approx(float(C.brier_score(scaled, labels, from_logits=True)), rel=1e-5)


def test_continuation_logits_equal_unpadded_full_logits(setup):
    tok, model, held = setup
    prompts, refs, skipped = references(tok, split_rows(held)[1])
    assert skipped == 0 and all(r[-1] == tok.eos_token_id for r in refs)
    got = continuation_logits(model, prompts, refs, pad_id=tok.pad_token_id, batch_size=5)
    for i, (p, r) in enumerate(zip(prompts, refs)):
        full = np.asarray(model.logits(np.asarray([p + r])))[0]
        np.testing.assert_allclose(got.logits[got.row == i], full[len(p) - 1 : len(p) + len(r) - 1], atol=2e-5)
        np.testing.assert_array_equal(got.tokens[got.row == i], r)


def test_greedy_answers_confidence_is_the_decoders_sequence_probability(setup):
    """Teacher-forced log-probability of the greedy answer equals the KV-cached decoder's own
    (ls_jax.generation), and correct means the answer's tokens are the reference's."""
    tok, model, held = setup
    rows = split_rows(held)[1]
    out = generate_answers(model, tok, rows, batch_size=8)
    prompts, refs, _ = references(tok, rows)
    decoded = generate(model, tok, prompts, max_new_tokens=max(map(len, refs)) + 8, batch_size=8)
    assert out.answers == [g.tokens for g in decoded]
    np.testing.assert_allclose(out.answer_logits.log_prob(), [g.logprob for g in decoded], atol=1e-4)
    np.testing.assert_array_equal(out.correct, [a == r for a, r in zip(out.answers, refs)])
    s = out.scores(temperature=2.0)
    cold = out.scores()
    assert not np.allclose(np.log(s.confidence), np.log(cold.confidence))  # the probabilities follow T
    np.testing.assert_allclose(s.brier, (s.confidence - s.correct) ** 2)


def test_temperatures_are_fitted_on_the_calibration_rows(setup):
    tok, model, held = setup
    test_rows, cal_rows = held[:12], held[12:]
    result = answer_calibration(model, tok, test_rows, cal_rows, batch_size=8)
    cal = evaluate_multiple_choice(model, tok, split_rows(cal_rows)[0])
    t = float(C.fit_temperature(cal.option_logits, cal.labels))
    assert result.temperature["multiple_choice"] == pytest.approx(t)
    test = evaluate_multiple_choice(model, tok, split_rows(test_rows)[0])
    expected = option_scores(test.option_logits, test.labels, t).metrics()
    assert result.metrics()["multiple_choice_scaled"] == pytest.approx({**expected, "temperature": t})
    prompts, refs, _ = references(tok, split_rows(cal_rows)[1])
    ref = continuation_logits(model, prompts, refs, pad_id=tok.pad_token_id)
    assert result.temperature["generated"] == pytest.approx(float(C.fit_temperature(ref.logits, ref.tokens)))
    assert set(result.metrics()) == {"multiple_choice", "multiple_choice_scaled", "generated", "generated_scaled"}
