"""Several weighted responses per prompt (sequence-level soft labels) in train.py's causal-LM data:
the loss against dense per-response oracles (fp32, bf16), bad rows on the command line, and the
answer-level scores of a prompt's answer against its distribution."""

import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ls_jax import calibration as C
from ls_jax.data import IGNORE_INDEX, eval_batches, expand_responses, prepare
from ls_jax.models import from_config, tiny_llama_config
from ls_jax.tokenizer import train_bpe_tokenizer
from ls_jax.train import main
from ls_jax.train.config import TrainConfig
from ls_jax.train.sharding import make_mesh, tree_shardings
from ls_jax.train.step import make_train_step

ROWS = [
    {
        "prompt": "Classify this review: It was not bad.\nAnswer: ",
        "responses": [{"text": "Positive", "p": 0.6}, {"text": "Neutral", "p": 0.4}],
    },
    {"prompt": "Classify this review: Awful.\nAnswer: ", "response": "Negative"},
    {
        "messages": [{"role": "user", "content": "Classify: fine, I guess."}],
        "responses": [{"text": "Neutral", "p": 0.7}, {"text": "Positive", "p": 0.2}, {"text": "Negative", "p": 0.1}],
    },
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(
        ["Classify this review: It was not bad. Awful. fine, I guess. Answer: Positive Neutral Negative user assistant"]
    )


def _dense_losses(model, ids, labels, a):
    """float64 per-token smoothed cross-entropy of one unpadded example from its dense logits
    (numpy): the response tokens' losses."""
    z = np.asarray(model.logits(jnp.asarray(ids)[None]), np.float64)[0, :-1]
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    y = labels[1:]
    keep = y != IGNORE_INDEX
    return -((1 - a) * logp[np.arange(len(y)), np.where(keep, y, 0)] + a * logp.mean(-1))[keep]


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_weighted_response_loss_is_the_weighted_sum_of_dense_losses(tok, dtype, rtol):
    """The train step's loss on a batch of weighted answers (and one plain row) equals
    sum_r p_r * (response r's summed dense loss) / sum_r p_r * (its tokens), smoothing on top."""
    rows, _, weights = expand_responses(ROWS)
    examples, _ = prepare(rows, tok, 48, weights=weights)
    assert [w for *_, w in examples] == [0.6, 0.4, 1.0, 0.7, 0.2, 0.1]
    (batch,) = eval_batches(examples, 6, 48, tok.pad_token_id)
    model = from_config(
        tiny_llama_config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1), seed=0, dtype=dtype
    )
    a = 0.1
    per_response = [_dense_losses(model, ids, labels, a) for ids, labels, _ in examples]
    want = sum(w * l.sum() for (*_, w), l in zip(examples, per_response)) / sum(
        w * len(l) for (*_, w), l in zip(examples, per_response)
    )

    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    mesh = make_mesh("data=1,fsdp=1,tensor=1")
    tx = optax.sgd(0.0)
    step = make_train_step(
        graphdef,
        tx,
        TrainConfig(label_smoothing=a, impl="xla"),
        param_shardings=tree_shardings(params, mesh),
        frozen_shardings=tree_shardings(frozen, mesh),
        opt_shardings=tree_shardings(tx.init(params), mesh),
        mesh=mesh,
    )
    _, _, metrics = step(params, frozen, tx.init(params), {k: v[None] for k, v in batch.items()})
    assert float(metrics["loss"]) == pytest.approx(want, rel=rtol)
    assert int(metrics["tokens"]) == sum(len(l) for l in per_response)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"p": 0.5}, "line 3: soft label {'Positive': 0.5, 'Neutral': 0.4} is not a distribution (sums to 0.9, not 1)"),
        ({"p": -0.1}, "line 3: soft label probability -0.1 of 'Positive' is not a number >= 0"),
    ],
)
def test_bad_weighted_rows_are_refused_on_the_command_line(tok, tmp_path, capsys, bad, message):
    rows = [ROWS[1]] * 10
    rows[2] = {**ROWS[0], "responses": [{**ROWS[0]["responses"][0], **bad}, ROWS[0]["responses"][1]]}
    data = _write(tmp_path / "rows.jsonl", rows)
    held = _write(tmp_path / "held.jsonl", [ROWS[1]] * 2)
    out = tmp_path / "out"
    assert (
        main(
            [
                "--data",
                data,
                "--eval-data",
                held,
                "--output-dir",
                str(out),
                "--no-progress",
                "--batch-size",
                "2",
                "--steps",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == f"error: {data} (train): {message}", err
    assert not out.exists()


def test_answer_level_scores_against_the_answers_distribution():
    """A row with weighted answers: NLL -sum_r p_r log p(r) (each reference's log-probability from
    the full logits of its unpadded sequence), correct against the heaviest answer, Brier against
    the probability the row gives the decoded answer; a one-answer row is scored as before."""
    from ls_jax.answer_calibration import answer_calibration, generate_answers, reference_answers
    from ls_jax.data import tokenize_example
    from ls_jax.train import synthetic

    train, held = synthetic.generate(200, 24, seed=3)
    tok = train_bpe_tokenizer([r["prompt"] + r["response"] for r in train])
    model = from_config(tiny_llama_config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1), seed=0)
    plain = [r for r in held if r.get("choices") is None][:4]
    rows = [
        {"prompt": r["prompt"], "responses": [{"text": r["response"], "p": 0.3}, {"text": "7", "p": 0.7}]}
        for r in plain[:3]
    ] + plain[3:]
    out = generate_answers(model, tok, rows, batch_size=4)
    prompts, answers, skipped = reference_answers(tok, rows)
    assert skipped == 0 and [[p for _, p in a] for a in answers] == [[0.3, 0.7]] * 3 + [[1.0]]
    for (p_ids, a), row in zip(zip(prompts, answers), expand_responses(rows)[0][::2] + [rows[3]]):
        assert p_ids + a[0][0] == tokenize_example(row, tok)[0].tolist()  # as the trainer tokenises
    s = out.scores()
    for i, (p_ids, a) in enumerate(zip(prompts, answers)):
        log_q = []
        for ref, _ in a:
            z = np.asarray(model.logits(jnp.asarray([p_ids + ref])), np.float64)[0, len(p_ids) - 1 : -1]
            log_q.append((z[np.arange(len(ref)), ref] - np.log(np.exp(z).sum(-1))).sum())
        assert s.nll[i] == pytest.approx(-sum(p * lq for (_, p), lq in zip(a, log_q)), rel=1e-4)
        heaviest = max(a, key=lambda x: x[1])[0]
        assert out.correct[i] == (out.answers[i] == heaviest)
        t = sum(p for ref, p in a if ref == out.answers[i])
        assert s.brier[i] == pytest.approx((s.confidence[i] - t) ** 2)
    result = answer_calibration(model, tok, rows, rows, batch_size=4)  # T: each answer's tokens weigh its p
    p = out.reference_p[out.reference_logits.row]
    t = float(C.fit_temperature(out.reference_logits.logits, out.reference_logits.tokens, weights=p))
    assert result.temperature["generated"] == pytest.approx(t)
    assert set(result.metrics()) == {"generated", "generated_scaled"}


def test_weighted_temperature_fit_equals_repeated_samples():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(40, 5)).astype(np.float32) * 2, rng.integers(0, 5, 40)
    w = rng.integers(1, 3, 40)
    assert float(C.fit_temperature(z, y, weights=w.astype(np.float32))) == pytest.approx(
        float(C.fit_temperature(np.repeat(z, w, 0), np.repeat(y, w))), rel=1e-5
    )


def test_a_run_on_weighted_answers(tmp_path):
    """train.py end to end on rows with weighted answers (and messages): it trains, the held-out
    loss is the weighted one, and the answer-level scores cover the weighted rows."""
    rows = [ROWS[i % 3] for i in range(24)]
    data, held = _write(tmp_path / "rows.jsonl", rows), _write(tmp_path / "held.jsonl", ROWS[:2] * 2)
    out = tmp_path / "out"
    assert (
        main(
            [
                "--data",
                data,
                "--eval-data",
                held,
                "--output-dir",
                str(out),
                "--no-progress",
                "--batch-size",
                "8",
                "--steps",
                "3",
                "--max-length",
                "48",
                "--answer-rows",
                "4",
                "--label-smoothing",
                "0.1",
                "--warmup-steps",
                "1",
                "--log-every",
                "1",
            ]
        )
        == 0
    )
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 3 and final["answers"]["generated"]["count"] == 2
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").open()) if r["kind"] == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses))
