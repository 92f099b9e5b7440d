"""Data pipeline: loading formats, prompt masking, truncation counts, packing, batch order."""

import json
import re

import datasets
import numpy as np
import pytest

from ls_jax.data import (
    IGNORE_INDEX,
    Batches,
    DataError,
    build_row,
    eval_batches,
    expand_responses,
    load_rows,
    pack,
    prepare,
    tokenize_example,
)
from ls_jax.tokenizer import train_bpe_tokenizer
from ls_jax.train import synthetic

ROWS = [
    {"prompt": "What is 3 + 4?\nAnswer: ", "response": "7"},
    {"prompt": "Which number is the largest?\nA) 1\nB) 9\nAnswer: ", "response": "B"},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
]


@pytest.fixture(scope="module")
def tok():
    train, _ = synthetic.generate(200, 0, seed=1)
    return train_bpe_tokenizer([r["prompt"] + r["response"] for r in train] + ["Say hi there user assistant"])


def _decode(tok, ids):
    return tok.decode(list(ids), skip_special_tokens=False)


def test_tokenizer_round_trip_and_single_digits(tok):
    text = "What is 1234 + 5?\nAnswer: 1239"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert _decode(tok, ids) == text
    digits = [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert digits == list("123451239")
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")


def test_prompt_response_masking(tok):
    ids, labels = tokenize_example(ROWS[0], tok)
    resp = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[resp], ids[resp])
    assert _decode(tok, ids[resp]) == "7<eos>"
    assert _decode(tok, ids[~resp]) == "<bos>" + ROWS[0]["prompt"]
    assert resp[-2:].all() and not resp[:-2].any()  # response contiguous at the end


def test_messages_simple_template_masking(tok):
    assert not tok.chat_template
    ids, labels = tokenize_example(ROWS[2], tok)
    resp = labels != IGNORE_INDEX
    assert _decode(tok, ids[resp]) == "hi there<eos>"
    assert _decode(tok, ids) == "<bos><|user|>\nSay hi\n<|assistant|>\nhi there<eos>\n"


def test_messages_chat_template_multi_turn(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    templated = type(tok).from_pretrained(tmp_path)
    templated.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    row = {
        "messages": [
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "there"},
        ]
    }
    ids, labels = tokenize_example(row, templated)
    resp = labels != IGNORE_INDEX
    assert _decode(templated, ids) == templated.apply_chat_template(row["messages"], tokenize=False)
    # response runs: each assistant message with its end-of-turn token, nothing else
    runs, cur = [], []
    for i, r in zip(ids, resp):
        if r:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert [_decode(templated, r) for r in runs] == ["hi<eos>", "there<eos>"]


def test_bad_rows(tok):
    with pytest.raises(DataError, match="row 1"):
        tokenize_example({"text": "x"}, tok)
    with pytest.raises(DataError, match="'response' must be a string, got int 3"):
        tokenize_example({"prompt": "1 + 2 = ", "response": 3}, tok)
    with pytest.raises(DataError, match="'messages' must be a list"):
        tokenize_example({"messages": [{"role": "user", "content": ["x"]}]}, tok)
    with pytest.raises(DataError, match="messages"):
        tokenize_example({"messages": [{"role": "user"}]}, tok)
    # a row missing a column of the file: datasets fills it with None, which is not a response "None"
    (missing,) = [r for r in datasets.Dataset.from_list([{"prompt": "a", "response": "b"}, {"prompt": "x"}])][1:]
    with pytest.raises(DataError, match=re.escape("has ['prompt']")):
        tokenize_example(missing, tok)


def test_truncation_counts_and_drops(tok):
    m = len(tokenize_example(ROWS[0], tok)[0])  # fits exactly
    long_prompt = {"prompt": "What is 1 + 1? " * 5, "response": "2"}  # cut inside the prompt: dropped
    long_resp = {"prompt": "Q: ", "response": "1 2 3 4 5 6 7 8 9 " * 3}  # cut inside the response: kept
    examples, stats = prepare([ROWS[0], long_prompt, long_resp], tok, max_length=m)
    assert (stats.rows, stats.truncated, stats.dropped) == (3, 2, 1)
    assert [len(ids) for ids, _, _ in examples] == [m, m]
    np.testing.assert_array_equal(examples[1][0], tokenize_example(long_resp, tok)[0][:m])
    assert f"2 truncated to {m} tokens, 1 dropped" in stats.log_line("train", m)
    with pytest.raises(DataError, match="no example has a response token after truncation"):
        prepare([long_prompt], tok, max_length=m)


def test_packing_positions_segments_labels(tok):
    rows = synthetic.generate(30, 0, seed=3)[0]
    examples, _ = prepare(rows, tok, max_length=64)
    groups = pack(examples, 64)
    assert sorted(i for g in groups for i in g) == list(range(len(examples)))
    assert len(groups) < len(examples)
    for g in groups:
        row = build_row(examples, g, 64, tok.pad_token_id)
        seg = row["segment_ids"]
        assert sorted(set(seg[seg > 0])) == list(range(1, len(g) + 1))
        for s, i in enumerate(g, 1):
            ids, labels, _ = examples[i]
            at = np.flatnonzero(seg == s)
            assert len(at) == len(ids) and (np.diff(at) == 1).all()  # contiguous
            np.testing.assert_array_equal(row["input_ids"][at], ids)
            np.testing.assert_array_equal(row["positions"][at], np.arange(len(ids)))
            assert row["labels"][at[0]] == IGNORE_INDEX  # nothing predicted across a boundary
            np.testing.assert_array_equal(row["labels"][at[1:]], labels[1:])
        pad = seg == 0
        assert (row["labels"][pad] == IGNORE_INDEX).all() and (row["input_ids"][pad] == tok.pad_token_id).all()


def test_batches_deterministic_and_cover_each_epoch(tok):
    examples, _ = prepare(synthetic.generate(50, 0, seed=4)[0], tok, max_length=40)
    a, b = Batches(examples, 8, 40, 0, seed=7), Batches(examples, 8, 40, 0, seed=7)
    assert len(a) == 50 // 8
    for p in (0, 3, 6, 13):
        for k, v in a.batch(p).items():
            np.testing.assert_array_equal(v, b.batch(p)[k])
            assert v.shape == (8, 40) and v.dtype == (np.float32 if k == "weights" else np.int32)
    key = lambda batch: [tuple(r) for r in batch["input_ids"]]  # noqa: E731
    epoch0 = sum((key(a.batch(p)) for p in range(len(a))), [])
    epoch1 = sum((key(a.batch(p)) for p in range(len(a), 2 * len(a))), [])
    assert len(set(epoch0)) == len(epoch0) == len(a) * 8  # no row twice within an epoch
    assert epoch0 != epoch1  # reshuffled
    with pytest.raises(DataError, match="batch size"):
        Batches(examples[:3], 8, 40, 0)


def test_eval_batches_cover_all_once(tok):
    examples, _ = prepare(synthetic.generate(21, 0, seed=5)[0], tok, max_length=40)
    batches = eval_batches(examples, 8, 40, tok.pad_token_id)
    assert len(batches) == 3
    got = np.concatenate([b["labels"] for b in batches])
    assert (got[21:] == IGNORE_INDEX).all()
    for i, (_, labels, _) in enumerate(examples):
        np.testing.assert_array_equal(got[i, 1 : len(labels)], labels[1:])


def test_load_formats(tmp_path):
    rows = ROWS[:2]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    for name in ("d.jsonl", "d.json", "d.parquet", "saved", "saved_dict"):
        assert load_rows(str(tmp_path / name))[0] == rows, name
    assert load_rows(str(tmp_path / "d.jsonl"))[1] == ["line 1", "line 2"]
    assert load_rows(str(tmp_path / "d.parquet"))[1] == ["row 1", "row 2"]


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"prompt": "x",\n')
    with pytest.raises(DataError, match=re.escape("line 3: malformed JSON")):
        load_rows(str(bad))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        load_rows(str(tmp_path / "x.csv"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(str(tmp_path / "sd"))
    with pytest.raises(DataError, match="no split 'train'"):
        load_rows(str(tmp_path / "sd"))


def test_unreadable_files_are_data_errors(tmp_path):
    """Non-UTF-8 text, cut or garbage parquet: a DataError naming the file (and line)."""
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(
        json.dumps(ROWS[0]).encode() + b"\n" + '{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1")
    )
    with pytest.raises(DataError, match=re.escape(f"{bad}: line 2: not UTF-8 text (byte 0xe9 at column 16)")):
        load_rows(str(bad))
    (tmp_path / "latin1.json").write_bytes('[{"prompt": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_rows(str(tmp_path / "latin1.json"))
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "d.parquet"))
    whole = (tmp_path / "d.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    for name in ("cut.parquet", "garbage.parquet"):
        with pytest.raises(DataError, match="not a readable parquet file"):
            load_rows(str(tmp_path / name))


def test_rows_keep_their_own_columns_and_types_are_checked(tmp_path, tok):
    """Columns are not taken from the first row: a later row's 'messages' is read; a column of
    mixed types is no pyarrow error but a DataError naming the line (counted from 1)."""
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "there"}]}
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(chat) + "\n")
    rows, where = load_rows(str(path))
    assert rows == [ROWS[0], chat] and where == ["line 1", "line 3"]
    examples, _ = prepare(rows, tok, max_length=64, where=where)
    np.testing.assert_array_equal(examples[1][0], tokenize_example(chat, tok)[0])
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "2 + 2 = ", "response": 4}) + "\n")
    with pytest.raises(DataError, match=re.escape("d (train): line 2: 'response' must be a string, got int 4")):
        rows, where = load_rows(str(path))
        prepare(rows, tok, 64, name="d (train)", where=where)


def test_empty_responses_are_counted_and_all_empty_is_an_error(tok):
    empty = {"prompt": "What is 1 + 1? ", "response": " "}
    _, stats = prepare([ROWS[0], empty], tok, max_length=64)
    assert stats.empty == 1 and stats.log_line("train", 64).endswith(", 1 with an empty response")
    with pytest.raises(DataError, match=re.escape("every response is empty (2 examples)")):
        prepare(
            [empty, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}],
            tok,
            max_length=64,
        )


def test_synthetic_answers_check_out_and_split_is_disjoint():
    train, held = synthetic.generate(300, 100, seed=11)
    assert (train, held) == synthetic.generate(300, 100, seed=11)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    kinds = set()
    for r in train + held:
        if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?\nAnswer:", r["prompt"]):
            kinds.add("add")
            assert r["response"] == f" {int(m[1]) + int(m[2])}"
        else:
            kinds.add("mc")
            opts = dict(re.findall(r"([A-D])\. (\d+)", r["prompt"]))
            assert len(opts) == 4 and r["response"] == " " + max(opts, key=lambda k: int(opts[k]))
            assert r["choices"] == list(opts.values()) and "ABCD"[r["answer"]] == r["response"].strip()
    assert kinds == {"add", "mc"}


def _shared(rows, tok, max_length, count, monkeypatch):
    """``prepare`` in ``count`` threads standing for processes (encode_shared with an all-gather
    between the threads). Returns each one's result (or DataError) and the rows (``where``) that
    each one tokenised in encode_shared."""
    import threading

    from ls_jax.data import encoding

    tokenised, shares, parts, out = {}, {}, {}, {}
    barrier = threading.Barrier(count)
    real = encoding.tokenize_example

    def counting(row, tokenizer, where="row 1"):
        tokenised.setdefault(threading.current_thread().name, []).append(where)
        return real(row, tokenizer, where)

    def all_gather(index, local):
        parts[index] = local
        barrier.wait()
        return [parts[q] for q in range(count)]

    def process(index):
        encoded = encoding.encode_shared(rows, tok, max_length, None, index, count, lambda a: all_gather(index, a))
        shares[index] = list(tokenised.get(threading.current_thread().name, []))
        try:
            out[index] = prepare(rows, tok, max_length, encoded=encoded)
        except DataError as e:
            out[index] = e

    monkeypatch.setattr(encoding, "tokenize_example", counting)  # where encode_row looks it up
    threads = [threading.Thread(target=process, args=(q,), name=f"process {q}") for q in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, shares


def test_each_process_tokenises_only_its_share(tok, monkeypatch):
    """encode_shared (multi-process train.py): process q of 3 tokenises rows q, q + 3, ... only,
    and every process gets what one process's prepare gives (truncation and drop counts included)."""
    rows = [ROWS[i % 3] for i in range(10)] + [{"prompt": "x " * 30, "response": "y"}]  # the last: dropped
    want, want_stats = prepare(rows, tok, 22)
    assert want_stats.truncated and want_stats.dropped  # both counts are exercised
    out, shares = _shared(rows, tok, 22, 3, monkeypatch)
    assert shares == {q: [f"row {i + 1}" for i in range(q, len(rows), 3)] for q in range(3)}
    for examples, stats in out.values():
        assert stats == want_stats and len(examples) == len(want)
        for (ids, labels, _), (want_ids, want_labels, _) in zip(examples, want):
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(labels, want_labels)


def test_a_bad_row_in_one_share_fails_every_process_alike(tok, monkeypatch):
    """The first bad row (row 3, process 0's share of 2; row 5 is bad too) is each process's error."""
    rows = [ROWS[0], ROWS[1], {"prompt": "no response field"}, ROWS[0], {"prompt": 3, "response": "x"}]
    with pytest.raises(DataError) as want:
        prepare(rows, tok, 64)
    out, _ = _shared(rows, tok, 64, 2, monkeypatch)
    assert "row 3" in str(want.value) and [str(e) for e in out.values()] == [str(want.value)] * 2


SOFT = {
    "prompt": "Classify this review: It was not bad.\nAnswer: ",
    "responses": [{"text": "Positive", "p": 0.6}, {"text": "Neutral", "p": 0.4}],
}


def test_weighted_responses_become_weighted_examples(tok):
    """A row's answers become one example each (tokenised as a single-response row), weighted by
    their probability on every token of the row; plain rows weigh 1; messages rows end in the answer."""
    chat = {"messages": [{"role": "user", "content": "Say hi"}], "responses": [{"text": "hi", "p": 1.0}]}
    rows, where, weights = expand_responses([ROWS[0], SOFT, chat], ["line 1", "line 2", "line 3"])
    assert where == ["line 1", "line 2 (response 1)", "line 2 (response 2)", "line 3 (response 1)"]
    assert weights == [1.0, 0.6, 0.4, 1.0]
    assert rows[1] == {"prompt": SOFT["prompt"], "response": "Positive"}
    assert rows[3]["messages"][-1] == {"role": "assistant", "content": "hi"}
    examples, stats = prepare(rows, tok, 64, weights=weights)
    assert stats.rows == 4 and [w for *_, w in examples] == weights
    for (ids, _labels, _), row in zip(examples, rows):
        np.testing.assert_array_equal(ids, tokenize_example(row, tok)[0])
    (batch,) = eval_batches(examples, 4, 64, tok.pad_token_id)
    for i, (ids, _, w) in enumerate(examples):
        np.testing.assert_array_equal(batch["weights"][i], np.where(np.arange(64) < len(ids), w, 0).astype(np.float32))


@pytest.mark.parametrize(
    "responses, message",
    [
        (
            [{"text": "a", "p": 0.6}, {"text": "b", "p": 0.6}],
            "line 4: soft label {'a': 0.6, 'b': 0.6} is not a distribution (sums to 1.2, not 1)",
        ),
        (
            [{"text": "a", "p": -0.5}, {"text": "b", "p": 1.5}],
            "line 4: soft label probability -0.5 of 'a' is not a number >= 0",
        ),
        ([{"text": "a", "p": "1"}], "line 4: soft label probability '1' of 'a' is not a number >= 0"),
        ([{"text": "a", "p": True}], "line 4: soft label probability True of 'a' is not a number >= 0"),
        ([], "line 4: 'responses' must be a non-empty list"),
        (["a"], "line 4: 'responses' must be a non-empty list"),
        ([{"text": 3, "p": 1.0}], "line 4: 'responses' must be a non-empty list"),
    ],
)
def test_bad_weighted_responses_name_the_row(responses, message):
    with pytest.raises(DataError) as e:
        expand_responses([ROWS[0], {"prompt": "Q", "responses": responses}], ["line 3", "line 4"])
    assert str(e.value).startswith(message), str(e.value)
    with pytest.raises(DataError, match="line 1: has both 'response' and 'responses'"):
        expand_responses([{"prompt": "Q", "response": "a", "responses": [{"text": "a", "p": 1}]}], ["line 1"])
