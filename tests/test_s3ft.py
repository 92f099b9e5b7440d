"""S3FT: judges on hand-made positives and negatives (code that loops forever, raises or reaches
for the network), the set builder on a tiny model with stub judges (expected sources, verdicts,
rows left out), ``python -m ls_jax.s3ft`` and ``train.py --s3ft`` end to end, and bad input."""

import json
import re

import jax.numpy as jnp
import pytest

from ls_jax.models import from_config, save_pretrained, tiny_llama_config
from ls_jax.s3ft import build, exact_match, final_number, numeric_match, resolve, run_python_tests
from ls_jax.s3ft.__main__ import main as s3ft_main
from ls_jax.s3ft.judges import CodeExecutionRefused
from ls_jax.tokenizer import train_bpe_tokenizer
from ls_jax.train import main as train_main


def test_exact_match_normalises():
    assert exact_match("", "The Eiffel Tower.", "eiffel   tower")
    assert exact_match("", "Paris!", " paris ")
    assert not exact_match("", "Paris", "Paris, France")
    assert not exact_match("", "cba", "abc")


def test_numeric_final_answers():
    assert final_number("step 1: 3 + 4 = 7\n#### 1,234") == 1234
    assert final_number("so we get -0.5 and then 12.") == 12
    assert final_number("no digits") is None
    assert numeric_match("", "#### 42", "the answer is 42.")
    assert numeric_match("", "0.3", "0.1 + 0.2 = 0.30000000000000004")  # within the relative tolerance
    assert numeric_match("", "Sum: 1 + 2 = 3, so the answer is 3.", "3")
    assert not numeric_match("", "#### 42", "41, or maybe 42 and then 43")  # the last number counts
    assert not numeric_match("", "#### 42", "I do not know")
    with pytest.raises(ValueError, match="gold response has no number"):
        numeric_match("", "forty-two", "42")


def test_code_judge_runs_the_tests_and_never_crashes():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    assert run_python_tests("def add(a, b):\n    return a + b\n", tests)
    assert run_python_tests("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", tests)
    assert not run_python_tests("def add(a, b):\n    return a - b\n", tests)
    assert not run_python_tests("def add(a, b):\n    raise RuntimeError('no')\n", tests)
    assert not run_python_tests("this is not python", tests)
    assert not run_python_tests("while True:\n    pass\n", tests, timeout=1.0)  # loops forever: timed out
    net = "import socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b):\n    return a + b\n"
    assert not run_python_tests(net, tests)  # sockets are disabled in the child


def test_resolve_picks_the_rows_judge():
    assert resolve("numeric", {"prompt": "q"}) is numeric_match
    assert resolve("numeric", {"prompt": "q", "judge": "exact"}) is exact_match
    stub = lambda p, g, c: True  # noqa: E731
    assert resolve(stub, {}) is stub
    code_row = {"judge": "code", "tests": "assert f() == 1"}
    assert resolve("exact", code_row, allow_code_execution=True)("", "", "def f():\n    return 1")
    with pytest.raises(CodeExecutionRefused, match="needs --allow-code-execution"):
        resolve("exact", code_row)  # runs model-written code: only with the user's opt-in
    with pytest.raises(ValueError, match="unknown judge 'nope'"):
        resolve("nope", {})
    with pytest.raises(ValueError, match="needs the row's 'tests'"):
        resolve("code", {"prompt": "q"}, allow_code_execution=True)


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([f"question {i} answer {2 * i}" for i in range(50)], vocab_size=280)


@pytest.fixture(scope="module")
def eos_model(tok):
    """A tiny model whose greedy choice is always token 0 (zero head: all logits 0)."""
    model = from_config(tiny_llama_config(vocab_size=len(tok)), seed=0)
    model.lm_head[...] = jnp.zeros_like(model.lm_head[...])
    return model


def test_build_gives_the_expected_sources(tok, eos_model):
    """With eos = token 0 every generation ends at once (text ""); a stub judge decides by the
    gold and by whether it judges the self response (first call) or the paraphrase (second)."""
    tok = train_bpe_tokenizer(["x"], vocab_size=260)
    tok.eos_token = tok.pad_token  # token 0, what the zero-head model always picks
    calls = {}

    def judge(prompt, gold, candidate):
        assert candidate == ""
        calls[prompt] = calls.get(prompt, 0) + 1
        if gold == "boom":
            raise RuntimeError("judge failed")
        return {"S": calls[prompt] == 1, "P": calls[prompt] == 2, "G": False}[gold]

    rows = [
        {"prompt": "a", "response": "S"},
        {"prompt": "b", "response": "P"},
        {"prompt": "c", "response": "G"},
        {"prompt": "d", "response": "boom"},
        {"prompt": "e", "response": None},
        {"prompt": "f", "response": "S", "judge": "nope"},
        {"messages": [{"role": "user", "content": "g"}, {"role": "assistant", "content": "P"}]},
    ]
    result = build(eos_model, tok, rows, judge=judge, max_new_tokens=4, progress=False)
    sources = {
        r["s3ft_row"]: (r["s3ft_source"], r["s3ft_self_verdict"], r["s3ft_paraphrase_verdict"]) for r in result.rows
    }
    assert sources == {
        0: ("self", "correct", ""),
        1: ("paraphrase", "incorrect", "correct"),
        2: ("gold", "incorrect", "incorrect"),
        3: ("gold", "error", "error"),
        6: ("paraphrase", "incorrect", "correct"),
    }
    assert result.rows[0]["response"] == "" and result.rows[2]["response"] == "G"  # self: the model's text
    assert result.rows[4]["messages"][-1] == {"role": "assistant", "content": ""}
    assert result.skipped == [
        {"row": 4, "reason": "no gold response"},
        {"row": 5, "reason": "unknown judge 'nope'; known: exact, numeric, code (or a callable)"},
    ]
    assert result.counts() == {"self": 1, "paraphrase": 2, "gold": 2, "skipped": 2}
    table = result.table()
    assert "judge raised on 2 responses" in table and "row 3: RuntimeError: judge failed" in table
    assert "2 rows left out" in table and "no chat template" in table


def test_length_limited_generations_are_not_targets(tok, eos_model):
    """eos = token 1, which the zero-head model never picks: every response hits the limit."""
    rows = [{"prompt": "q", "response": "a"}, {"prompt": "r", "response": "b"}]
    result = build(eos_model, tok, rows, judge=lambda p, g, c: True, max_new_tokens=3, paraphrase=False, progress=False)
    assert [(r["s3ft_source"], r["s3ft_self_verdict"]) for r in result.rows] == [("gold", "truncated")] * 2
    assert "2 self responses hit max_new_tokens=3" in result.table()
    with pytest.raises(ValueError, match="unknown judge"):
        build(eos_model, tok, rows, judge="fuzzy")


def test_cli_builds_reuses_and_rejects_bad_input(tok, eos_model, tmp_path, capsys):
    model_dir = str(tmp_path / "model")
    save_pretrained(eos_model, model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"#### {i}"}) + "\n" for i in range(5)))
    out = str(tmp_path / "s3ft.jsonl")
    args = [
        "--model",
        model_dir,
        "--data",
        str(data),
        "--judge",
        "numeric",
        "--out",
        out,
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    assert s3ft_main(args) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["s3ft_source"] for r in rows] == ["gold"] * 5 and rows[3]["response"] == "#### 3"
    assert json.load(open(out + ".meta.json"))["counts"] == {"self": 0, "paraphrase": 0, "gold": 5, "skipped": 0}
    assert re.search(r"gold +5 +100.0%", capsys.readouterr().out)
    assert s3ft_main(args) == 0
    assert "reusing" in capsys.readouterr().out
    data.write_text(data.read_text() + json.dumps({"prompt": "q9", "response": "#### 9"}) + "\n")
    assert s3ft_main(args) == 0  # the data changed: rebuilt
    assert len(open(out).readlines()) == 6
    for bad, message in [
        (["--judge", "fuzzy"], "unknown --judge 'fuzzy'"),
        (["--data", str(tmp_path / "missing.jsonl")], "data not found"),
        (["--model", str(tmp_path)], "not a checkpoint directory"),
    ]:
        assert s3ft_main(args + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err


def test_train_s3ft_end_to_end_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    flags = [
        "--s3ft",
        "--judge",
        "exact",
        "--steps",
        "2",
        "--num-train",
        "48",
        "--num-eval",
        "16",
        "--batch-size",
        "16",
        "--eval-batch-size",
        "16",
        "--max-length",
        "40",
        "--compare-smoothing",
        "",
        "--no-progress",
        "--output-dir",
        str(out),
    ]
    assert train_main(flags) == 0
    cache = tmp_path / "s3ft-cache" / "generated-tiny.jsonl"
    rows = [json.loads(line) for line in open(cache)]
    assert len(rows) == 48 and all(r["s3ft_source"] in ("self", "paraphrase", "gold") for r in rows)
    err = capsys.readouterr().err
    assert "s3ft targets (train rows):" in err and "train: 48 examples" in err
    assert train_main(flags[:-1] + [str(tmp_path / "run2")]) == 0
    assert "s3ft: reusing" in capsys.readouterr().err
    assert train_main(flags[:1] + ["--judge", "fuzzy"] + flags[3:-1] + [str(tmp_path / "run3")]) == 2
    assert "error: --judge must be one of" in capsys.readouterr().err
