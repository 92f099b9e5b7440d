"""Multiple-choice scoring against the full logits of the same model (a minimal protocol model
here; a Hugging Face torch Llama for the command line), padding / batch invariance, bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ls_jax import calibration as C
from ls_jax.evaluate import evaluate_multiple_choice, format_prompt, load_questions, main, option_token_ids

RECORDS = [
    {"question": "Which is red?", "choices": ["sky", "blood", "grass", "snow"], "answer": 1},
    {"question": "Two plus two?", "choices": ["three", "four"], "answer": "B"},
    {"question": "Largest planet?", "choices": ["Mars", "Venus", "Jupiter"], "answer": "c"},
    {"question": "Cold season?", "choices": ["summer", "winter", "spring", "autumn"], "answer": 1},
    {"question": "A fruit?", "choices": ["apple", "rock", "chair"], "answer": 0},
    {
        "question": "Not an animal, surely not an animal at all?",
        "choices": ["cat", "dog", "table", "cow"],
        "answer": "C",
    },
    {"question": "Water freezes at?", "choices": ["zero", "ten", "fifty", "ninety"], "answer": 0},
]


def word_tokenizer(records, letters="ABCD"):
    """WordLevel tokenizer over ' ?word' pieces of the prompts; ' A' ... are single tokens."""
    pre = pre_tokenizers.Split(Regex(r" ?[^\s]+|\s"), behavior="isolated")
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2}
    texts = [format_prompt(r["question"], r["choices"]) for r in records] + [" " + c for c in letters]
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")


class TinyLM(nnx.Module):
    """Minimal protocol model: token + position embeddings, causal mean over real tokens, an MLP.

    Padding-correct: positions count real tokens, pads are excluded from the running mean.
    """

    def __init__(self, vocab: int, d: int = 16, softcap=None, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(128, d, rngs=rngs)
        self.mix = nnx.Linear(d, d, rngs=rngs)
        self.head = nnx.Param(jax.random.normal(rngs.params(), (vocab, d)) * 2.0)
        self.final_logit_softcap = softcap

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        m = jnp.ones(input_ids.shape) if attention_mask is None else attention_mask.astype(jnp.float32)
        pos = jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0).astype(jnp.int32)
        x = self.embed(input_ids) + self.pos(pos)
        mean = jnp.cumsum(x * m[..., None], axis=1) / jnp.maximum(jnp.cumsum(m, axis=1), 1.0)[..., None]
        return jnp.tanh(self.mix(mean)) + x

    def unembedding(self):
        return self.head[...]

    def logits(self, input_ids, attention_mask=None, positions=None, segment_ids=None):
        z = self(input_ids, attention_mask) @ self.head[...].T
        c = self.final_logit_softcap
        return z if c is None else c * jnp.tanh(z / c)


def oracle_probs(full_logits_fn, tokenizer, records, letters="ABCD"):
    """float64 option probabilities [N, K_max] (0 past a question's choices), one unpadded
    question at a time, from the full-vocabulary logits at the prompt's last token."""
    letter_ids = [tokenizer.convert_tokens_to_ids(" " + c) for c in letters]
    probs = np.zeros((len(records), len(letters)))
    for i, r in enumerate(records):
        ids = [tokenizer.bos_token_id] + tokenizer(
            format_prompt(r["question"], r["choices"]), add_special_tokens=False
        )["input_ids"]
        z = np.asarray(full_logits_fn(np.array([ids])), np.float64)[0, -1]
        k = len(r["choices"])
        zk = z[letter_ids[:k]]
        probs[i, :k] = np.exp(zk - zk.max()) / np.exp(zk - zk.max()).sum()
    return probs


def labels_of(records):
    return np.array([q.answer for q in load_questions(records)])


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_scores_equal_full_logits(softcap):
    tok = word_tokenizer(RECORDS)
    model = TinyLM(len(tok), softcap=softcap)
    result = evaluate_multiple_choice(model, tok, RECORDS, batch_size=3)
    expected = oracle_probs(lambda ids: model.logits(jnp.asarray(ids)), tok, RECORDS)
    np.testing.assert_allclose(result.probs, expected, atol=2e-6)
    y = labels_of(RECORDS)
    n = len(y)
    report = result.report
    assert report.count == n
    np.testing.assert_allclose(report.accuracy, np.mean(expected.argmax(1) == y), atol=1e-7)
    np.testing.assert_allclose(report.nll, -np.mean(np.log(expected[np.arange(n), y])), rtol=1e-5)
    np.testing.assert_allclose(report.brier, np.mean(((expected - np.eye(4)[y]) ** 2).sum(1)), rtol=1e-5)
    np.testing.assert_allclose(report.ece, float(C.calibration_error(expected.astype(np.float32), y)), atol=1e-6)


def test_padding_side_and_batch_size_do_not_matter():
    tok = word_tokenizer(RECORDS)
    model = TinyLM(len(tok), seed=1)
    base = evaluate_multiple_choice(model, tok, RECORDS, batch_size=len(RECORDS), pad_to_multiple_of=1)
    for side in ("left", "right"):
        for batch_size, multiple in [(1, 1), (3, 16), (16, 8)]:
            other = evaluate_multiple_choice(
                model, tok, RECORDS, batch_size=batch_size, padding_side=side, pad_to_multiple_of=multiple
            )
            np.testing.assert_allclose(other.option_logits, base.option_logits, atol=1e-5)


def test_save_writes_metrics_png_and_predictions(tmp_path):
    tok = word_tokenizer(RECORDS)
    result = evaluate_multiple_choice(TinyLM(len(tok)), tok, RECORDS)
    paths = result.save(str(tmp_path))
    metrics = json.load(open(paths["metrics.json"]))
    assert metrics["count"] == len(RECORDS) and metrics["ece"] == pytest.approx(result.report.ece)
    assert open(paths["reliability.png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in open(paths["predictions.jsonl"])]
    assert [len(r["probs"]) for r in rows] == [len(r["choices"]) for r in RECORDS]
    assert [r["answer"] for r in rows] == ["B", "B", "C", "B", "A", "C", "A"]


# ------------------------------------------------------------------------------ bad input


def test_letters_must_be_single_known_tokens():
    from ls_jax.tokenizer import train_bpe_tokenizer

    byte_level = train_bpe_tokenizer(["x"], vocab_size=259)  # no merges: " A" is two tokens
    with pytest.raises(ValueError, match="one known token"):
        option_token_ids(byte_level, 4)
    tok = word_tokenizer(RECORDS)  # knows " A" .. " D" only
    five = [{"question": "q", "choices": list("vwxyz"), "answer": 4}]
    with pytest.raises(ValueError, match="' E'"):
        evaluate_multiple_choice(TinyLM(len(tok)), tok, five)


def test_bad_data_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_questions(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n\n" + '{"question": "q", "choices": [\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 3: malformed JSON"):
        load_questions(str(bad))
    cases = [
        ({"question": "q", "choices": ["a", "b", "c"], "answer": 3}, "out of range for 3 choices"),
        ({"question": "q", "choices": ["a", "b", "c"], "answer": "D"}, "out of range for 3 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "index or a letter"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "2 to 26 strings"),
        ({"question": "q", "answer": 0}, "missing field"),
        (["q"], "JSON object"),
    ]
    for record, message in cases:
        with pytest.raises(ValueError, match=message):
            load_questions([RECORDS[0], record])
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(cases[0][0]) + "\n")
    with pytest.raises(ValueError, match="one.jsonl: line 2: answer 3 is out of range"):
        load_questions(str(one))
    with pytest.raises(ValueError, match="no questions"):
        load_questions([])
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--data", str(tmp_path / "nope.jsonl")])
    assert "--data: file not found" in capsys.readouterr().err
    # a bad record or checkpoint: one "error:" line and exit status 2, not a traceback
    afile = tmp_path / "afile"
    afile.write_text("x")
    for model, data, out, message in [
        (tmp_path / "nope", one, None, "is not a local checkpoint directory"),
        (tmp_path, one, None, "config.json"),
        (tmp_path, one, afile / "out", f"--out {afile / 'out'}: {afile} is a file, not a directory"),
        (tmp_path, one, afile, f"{afile} is a file, not a directory"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(model), "--data", str(data), *(["--out", str(out)] if out else [])])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith("python -m ls_jax.evaluate: error: ") and message in last, last
    assert afile.read_text() == "x"


def test_unreadable_checkpoint_or_data_is_a_clear_error(tmp_path, capsys):
    """A model.safetensors cut short (a killed copy), a data file that is not UTF-8: one error
    line naming the file, exit status 2, nothing written."""
    from ls_jax.models import from_config, save_pretrained, tiny_llama_config

    tok = word_tokenizer(RECORDS)
    ckpt, cut = tmp_path / "ckpt", tmp_path / "cut"
    for path in (ckpt, cut):
        save_pretrained(from_config(tiny_llama_config(vocab_size=len(tok))), str(path))
        tok.save_pretrained(path)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) - 100])
    data, latin = tmp_path / "mc.jsonl", tmp_path / "latin.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    latin.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + '{"question": "caf\u00e9"}'.encode("latin-1"))
    for model, path, message in [
        (cut, data, "model.safetensors: not a complete safetensors file"),
        (ckpt, latin, "latin.jsonl: line 2: not UTF-8 text (byte 0xe9 at column 18)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", str(model), "--data", str(path), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert message in last, last
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- command line, end to end


def test_command_line_on_a_saved_llama_checkpoint(tmp_path, capsys):
    """A tiny torch Llama saved by transformers, loaded by ls_jax.models.from_pretrained:
    the command's metrics equal those of the torch model's own logits."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer(RECORDS)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        initializer_range=0.5,
    )
    hf = LlamaForCausalLM(config).eval()
    ckpt = tmp_path / "ckpt"
    hf.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))

    out = tmp_path / "out"
    metrics = main(
        ["--model", str(ckpt), "--data", str(data), "--out", str(out), "--batch-size", "4", "--padding-side", "left"]
    )
    assert json.loads(capsys.readouterr().out)["ece"] == pytest.approx(metrics["ece"])

    with torch.no_grad():
        expected = oracle_probs(lambda ids: hf(torch.tensor(ids)).logits.double().numpy(), tok, RECORDS)
    y = labels_of(RECORDS)
    n = len(y)
    assert metrics["count"] == n
    np.testing.assert_allclose(metrics["nll"], -np.mean(np.log(expected[np.arange(n), y])), rtol=1e-4)
    np.testing.assert_allclose(metrics["brier"], np.mean(((expected - np.eye(4)[y]) ** 2).sum(1)), rtol=1e-4)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(expected.argmax(1) == y))
    np.testing.assert_allclose(metrics["ece"], float(C.calibration_error(expected.astype(np.float32), y)), atol=1e-4)
    predictions = [json.loads(line)["probs"] for line in open(out / "predictions.jsonl")]
    for row, p in zip(predictions, expected):
        np.testing.assert_allclose(row, p[: len(row)], atol=1e-4)
    assert (out / "reliability.png").stat().st_size > 5000
