"""A teacher's top-k as targets: the fused sparse loss against dense cross-entropy on the explicit
target distribution (fp32, bf16; both rest modes), python -m ls_jax.distill against the teacher's
dense logits, train.py --soft-targets (tokenizer refused, resume in the middle of a run)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from ls_jax import distill, teacher_targets
from ls_jax.data import IGNORE_INDEX, build_row, prepare
from ls_jax.models import from_config, from_pretrained, save_pretrained, tiny_llama_config
from ls_jax.tokenizer import train_bpe_tokenizer
from ls_jax.train import main, run, synthetic
from ls_jax.train.config import TrainConfig
from ls_jax.train.step import lm_weight, soft_loss_sum

ROWS = synthetic.generate(48, 0, seed=2)[0]
K = 4


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([r["prompt"] + r["response"] for r in ROWS])


def _random_targets(examples, v, rng):
    """Teacher targets of each example: k distinct ids per response token, probabilities that
    leave some mass outside them."""
    out = []
    for _, labels, _ in examples:
        at = np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1
        p = rng.dirichlet(np.ones(K + 1), len(at))[:, :K].astype(np.float32)
        out.append(
            {
                "positions": at.astype(np.int32),
                "top_p": p,
                "rest": 1 - p.sum(-1),
                "top_ids": np.stack([rng.permutation(v)[:K] for _ in at]).astype(np.int32),
            }
        )
    return out


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("rest", teacher_targets.REST_MODES)
def test_top_k_loss_is_dense_cross_entropy_against_the_explicit_distribution(tok, dtype, rtol, rest):
    """soft_loss_sum / total weight equals -sum_v q_v log p_v averaged over the response tokens,
    q = (1 - a) (b onehot(y) + (1 - b) teacher) + a / V, the teacher's top k tempered and
    renormalised, its remaining mass dropped or spread uniformly; weighted rows included."""
    a, b, temperature = 0.1, 0.3, 2.0
    examples, _ = prepare(ROWS[:6], tok, 48, weights=[1.0, 0.5, 0.5, 1.0, 0.7, 0.3])
    model = from_config(
        tiny_llama_config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1), seed=0, dtype=dtype
    )
    v = len(tok)
    teacher = _random_targets(examples, v, np.random.default_rng(0))
    soft = [
        teacher_targets.soft_targets(e, t, temperature=temperature, rest=rest, hard_weight=b)
        for e, t in zip(examples, teacher)
    ]
    rows = [build_row(examples, [i], 48, tok.pad_token_id, soft) for i in range(len(examples))]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    got = float(soft_loss_sum(model, batch, TrainConfig(label_smoothing=a, impl="xla")) / lm_weight(batch))

    z = np.asarray(model.logits(batch["input_ids"], batch["segment_ids"] > 0), np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    total, weight = 0.0, 0.0
    for i, ((_, labels, w), t) in enumerate(zip(examples, teacher)):
        for j, tid, tp, r in zip(t["positions"], t["top_ids"], t["top_p"], t["rest"]):
            tempered = tp.astype(np.float64) ** (1 / temperature)
            teach = np.full(v, r / v if rest == "uniform" else 0.0)
            teach[tid] += (1 - r if rest == "uniform" else 1.0) * tempered / tempered.sum()
            q = (1 - a) * ((1 - b) * teach + b * np.eye(v)[labels[j]]) + a / v
            total += w * -(q * logp[i, j - 1]).sum()
            weight += w
    assert got == pytest.approx(total / weight, rel=rtol)


def _teacher(tok, path):
    save_pretrained(
        from_config(tiny_llama_config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1), seed=1), str(path)
    )
    tok.save_pretrained(str(path))
    return str(path)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_distill_stores_the_teachers_top_k_and_train_resumes_on_it(tok, tmp_path, capsys):
    """The parquet's top k per response token are the teacher's dense top k (descending) with
    their probabilities and the mass left; train.py --soft-targets trains on them, and a run
    stopped after 2 steps and resumed logs the losses of an uninterrupted one; another
    tokenizer's targets are refused."""
    teacher = _teacher(tok, tmp_path / "teacher")
    data = _write(tmp_path / "train.jsonl", ROWS)
    out = str(tmp_path / "targets.parquet")
    assert (
        distill.main(
            [
                "--teacher",
                teacher,
                "--data",
                data,
                "--top-k",
                str(K),
                "--out",
                out,
                "--max-length",
                "40",
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    assert "48 examples" in capsys.readouterr().err
    table = teacher_targets.read_targets(out, tok)
    examples, _ = prepare(ROWS, tok, 40)
    model = from_pretrained(teacher)
    for ids, labels, _ in examples[:3]:
        t = table[ids.tobytes()]
        p = np.asarray(model.logits(jnp.asarray(ids)[None]), np.float64)[0]
        p = np.exp(p - p.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_array_equal(t["positions"], np.flatnonzero(labels[1:] != IGNORE_INDEX) + 1)
        want = np.argsort(-p[t["positions"] - 1], axis=-1)[:, :K]
        np.testing.assert_array_equal(t["top_ids"], want)
        np.testing.assert_allclose(t["top_p"], np.take_along_axis(p[t["positions"] - 1], want, -1), atol=1e-6)
        np.testing.assert_allclose(t["rest"], 1 - t["top_p"].sum(-1), atol=1e-6)

    kw = dict(
        model=teacher,
        data=data,
        soft_targets=out,
        distill_temperature=2.0,
        distill_rest="uniform",
        distill_hard_weight=0.2,
        label_smoothing=0.1,
        max_length=40,
        steps=4,
        batch_size=8,
        eval_batch_size=8,
        warmup_steps=1,
        eval_every=1000,
        save_every=2,
        log_every=1,
        progress=False,
        answer_rows=0,
    )
    losses = lambda d: [
        r["loss"]
        for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))  # noqa: E731
        if r["kind"] == "train"
    ]
    run(TrainConfig(output_dir=str(tmp_path / "whole"), **kw))
    run(TrainConfig(output_dir=str(tmp_path / "parts"), **kw), stop_at=2)
    assert len(losses(tmp_path / "parts")) == 2
    run(TrainConfig(output_dir=str(tmp_path / "parts"), resume=True, **kw))
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 4
    with pytest.raises(ValueError, match="distill_rest 'uniform' -> 'renormalise'"):
        run(TrainConfig(output_dir=str(tmp_path / "parts"), resume=True, **{**kw, "distill_rest": "renormalise"}))

    other = train_bpe_tokenizer([r["prompt"] for r in ROWS])
    other.save_pretrained(str(tmp_path / "teacher"))  # the student's tokenizer now differs from the teacher's
    assert (
        main(
            [
                "--model",
                teacher,
                "--data",
                data,
                "--soft-targets",
                out,
                "--output-dir",
                str(tmp_path / "x"),
                "--no-progress",
                "--batch-size",
                "8",
                "--max-length",
                "40",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: --soft-targets {out}: the teacher's tokenizer") and "must share it" in err, err


def test_packed_rows_carry_each_examples_targets(tok):
    """build_row places each example's targets as its labels: from its second token, within its
    segment; IGNORE_INDEX / 0 elsewhere."""
    examples, _ = prepare(ROWS[:2], tok, 40)
    soft = [
        teacher_targets.soft_targets(e, t)
        for e, t in zip(examples, _random_targets(examples, len(tok), np.random.default_rng(1)))
    ]
    row = build_row(examples, [0, 1], 80, tok.pad_token_id, soft)
    n0, n1 = len(examples[0][0]), len(examples[1][0])
    for key in ("target_ids", "target_weights"):
        np.testing.assert_array_equal(row[key][1:n0], soft[0][key][1:])
        np.testing.assert_array_equal(row[key][n0 + 1 : n0 + n1], soft[1][key][1:])
    assert (row["target_ids"][[0, n0]] == IGNORE_INDEX).all() and (row["target_ids"][n0 + n1 :] == IGNORE_INDEX).all()
    assert (row["target_weights"][n0 + n1 :] == 0).all()
