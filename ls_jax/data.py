"""Supervised fine-tuning data: local files -> token ids with prompt masking -> batches.

Input rows (through ``datasets``, offline) have either chat ``messages`` (a list of
``{"role", "content"}``) or ``prompt`` / ``response`` strings. A row may give several weighted
answers instead of one (sequence-level soft labels): ``"responses": [{"text": "Positive", "p": 0.6},
{"text": "Neutral", "p": 0.4}]`` with a ``prompt`` (or with ``messages``, the conversation each
answer continues as the last assistant message). :func:`expand_responses` makes one example per
answer, weighted by its probability: each of its tokens counts ``p`` in the loss (the mean is
over the total weight), so a row's answers together weigh as one response.

* ``prompt``/``response``: the token ids are ``[bos] + tok(prompt) + tok(response) + [eos]``
  (bos only when the tokenizer has one); the loss covers the response and the eos.
* ``messages``: rendered with the tokenizer's chat template when it has one; otherwise with
  :data:`SIMPLE_TEMPLATE`, i.e. ``"<|role|>\\ncontent\\n"`` per message and ``"<|assistant|>\\n"``
  before each assistant reply. Every assistant message (and the eos after it, for the simple
  template) is a response; all other text is prompt.

Labels are aligned with ``input_ids`` (the model wrapper shifts them): ``-100`` on prompt and
padding tokens. Examples longer than ``max_length`` are cut at the end and counted; those left
without a response token are dropped and counted. Batches have a fixed shape ``[B, max_length]``
and are drawn in a seeded order per epoch, addressed by a plain integer position so a run can
resume exactly.
"""

import json
import numbers
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

IGNORE_INDEX = -100
SIMPLE_TEMPLATE = "<|{role}|>\n{content}\n"


class DataError(ValueError):
    """Bad training data (missing file, malformed row, nothing to train on); one-line message."""


# --------------------------------------------------------------------------- loading


def read_jsonl(path: str) -> List[Tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a ``.jsonl`` file (lines counted
    from 1); a line that is not UTF-8, malformed or not an object raises :class:`DataError`
    naming it (``"PATH: line K: ..."``)."""
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}: line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def _read_json(path: str) -> List[dict]:
    """Rows of a ``.json`` list / {"data": [...]}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return data


def _read_table(path: str, split: str) -> List[dict]:
    """Rows of a ``.parquet`` file or a ``datasets`` save_to_disk directory."""
    import pyarrow as pa

    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a datasets save_to_disk directory ({str(e).splitlines()[0]})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split {split!r} (have {sorted(ds)})")
            ds = ds[split]
        return ds.to_list()
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None


def load_rows(path: str, split: str = "train") -> Tuple[List[dict], List[str]]:
    """``(rows, where)`` from a local .jsonl/.json/.parquet file or a save_to_disk dir:
    the rows as dicts (each with its own keys), and each row's place for messages (``"line K"``
    in a .jsonl file, ``"row K"`` otherwise, counted from 1).

    A saved ``DatasetDict`` is indexed by ``split``. Raises :class:`DataError` when the path
    does not exist, cannot be parsed or holds no rows.
    """
    if not os.path.exists(path):
        raise DataError(f"data not found: {path}")
    if path.endswith(".jsonl") and not os.path.isdir(path):
        lines = read_jsonl(path)
        rows, where = [row for _, row in lines], [f"line {n}" for n, _ in lines]
    else:
        if os.path.isdir(path) or path.endswith(".parquet"):
            rows = _read_table(path, split)
        elif path.endswith(".json"):
            rows = _read_json(path)
        else:
            raise DataError(f"{path}: unsupported data format (use .jsonl, .json, .parquet or a save_to_disk directory)")
        where = [f"row {i}" for i in range(1, len(rows) + 1)]
    if not rows:
        raise DataError(f"{path}: the data set is empty")
    return rows, where


# --------------------------------------------------------------------------- soft labels

PROBABILITY_TOLERANCE = 1e-3


def probabilities(pairs: Sequence[Tuple[str, object]], where: str, label) -> List[float]:
    """The probabilities of ``(name, p)`` pairs, checked to be a distribution: each a real number
    >= 0 (not a bool), summing to 1 within :data:`PROBABILITY_TOLERANCE`. ``label`` is shown in
    the error. Raises :class:`DataError` (``"WHERE: ..."``) otherwise."""
    for name, p in pairs:
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < float("inf"):
            raise DataError(f"{where}: soft label probability {p!r} of {name!r} is not a number >= 0")
    total = float(sum(float(p) for _, p in pairs))
    if abs(total - 1.0) > PROBABILITY_TOLERANCE:
        raise DataError(f"{where}: soft label {label} is not a distribution (sums to {total:g}, not 1)")
    return [float(p) for _, p in pairs]


def weighted_responses(row: dict, where: str) -> Optional[List[Tuple[str, float]]]:
    """``[(text, p)]`` of a row's ``responses`` (validated, :func:`probabilities`), or None for a
    row without them. Raises :class:`DataError` for a malformed list or a row that also has a
    ``response``."""
    answers = row.get("responses")
    if answers is None:
        return None
    if row.get("response") is not None:
        raise DataError(f"{where}: has both 'response' and 'responses': give one")
    if not isinstance(answers, (list, tuple)) or not answers or not all(
            isinstance(a, dict) and isinstance(a.get("text"), str) and "p" in a for a in answers):
        raise DataError(f"{where}: 'responses' must be a non-empty list of {{'text': str, 'p': probability}} objects")
    pairs = [(a["text"], a["p"]) for a in answers]
    return list(zip((text for text, _ in pairs), probabilities(pairs, where, dict(pairs))))


def expand_responses(rows: Sequence[dict], where: Optional[Sequence[str]] = None
                     ) -> Tuple[List[dict], List[str], List[float]]:
    """``(rows, where, weights)``: every row with ``responses`` replaced by one single-response row
    per answer (``prompt`` + ``response``, or ``messages`` + a final assistant message) of weight
    ``p``, its place ``"WHERE (response K)"``; other rows kept, weight 1. ``where`` as in
    :func:`prepare`. Raises :class:`DataError` for a bad ``responses`` list."""
    where = [f"row {i + 1}" for i in range(len(rows))] if where is None else where
    out, out_where, weights = [], [], []
    for row, w in zip(rows, where):
        answers = weighted_responses(row, w) if isinstance(row, dict) else None
        if answers is None:
            out.append(row)
            out_where.append(w)
            weights.append(1.0)
            continue
        for k, (text, p) in enumerate(answers, 1):
            single = {key: v for key, v in row.items() if key != "responses"}
            if single.get("messages") is not None:
                single["messages"] = list(single["messages"]) + [{"role": "assistant", "content": text}]
            else:
                single["response"] = text
            out.append(single)
            out_where.append(f"{w} (response {k})")
            weights.append(p)
    return out, out_where, weights


# --------------------------------------------------------------------------- tokenisation


def _segments(row: dict, tokenizer, where: str) -> List[Tuple[str, bool]]:
    """The example as ``(text, is_response)`` pieces, in order; ``where`` names the row in errors."""
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not isinstance(msgs, (list, tuple)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise DataError(f"{where}: 'messages' must be a list of {{'role': str, 'content': str}} objects")
        if getattr(tokenizer, "chat_template", None):
            return _chat_template_segments(list(msgs), tokenizer, where)
        out = []
        for m in msgs:
            if m["role"] == "assistant":
                out.append(("<|assistant|>\n", False))
                out.append((m["content"] + (tokenizer.eos_token or ""), True))
                out.append(("\n", False))
            else:
                out.append((SIMPLE_TEMPLATE.format(role=m["role"], content=m["content"]), False))
        return out
    if row.get("prompt") is not None and row.get("response") is not None:
        for key in ("prompt", "response"):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__} {row[key]!r}")
        return [(row["prompt"], False), (row["response"] + (tokenizer.eos_token or ""), True)]
    fields = sorted(k for k, v in row.items() if v is not None)  # tables fill a row's missing columns with None
    raise DataError(f"{where}: needs 'messages' or 'prompt' and 'response' fields, has {fields}")


def _responses(row: dict) -> List[str]:
    """The response texts of a row that :func:`_segments` accepted."""
    if row.get("messages") is not None:
        return [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    return [row["response"]]


def _chat_template_segments(msgs: List[dict], tokenizer, where: str) -> List[Tuple[str, bool]]:
    """Split a chat-template rendering at each assistant message by rendering prefixes."""
    out, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not before.startswith(done) or not upto.startswith(before):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
        out += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(done):
        raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
    out.append((full[len(done):], False))
    return out


def _encode(segs: List[Tuple[str, bool]], tokenizer, templated: bool) -> Tuple[np.ndarray, np.ndarray]:
    """``(input_ids, labels)`` of the pieces ``segs``, a bos first unless ``templated``."""
    ids: List[int] = []
    labels: List[int] = []
    if tokenizer.bos_token_id is not None and not templated:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, is_response in segs:
        if not text:
            continue
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if is_response else [IGNORE_INDEX] * len(piece)
    return np.asarray(ids, np.int32), np.asarray(labels, np.int32)


def _templated(row: dict, tokenizer) -> bool:
    return "messages" in row and bool(getattr(tokenizer, "chat_template", None))


def tokenize_example(row: dict, tokenizer, where: str = "row 1") -> Tuple[np.ndarray, np.ndarray]:
    """``(input_ids [T] int32, labels [T] int32)`` with ``IGNORE_INDEX`` on prompt tokens.

    With no chat template a bos token (if the tokenizer has one) starts the sequence.
    ``where`` names the row in a :class:`DataError`.
    """
    return _encode(_segments(row, tokenizer, where), tokenizer, _templated(row, tokenizer))


def prompt_ids(row: dict, tokenizer, where: str = "row 1") -> np.ndarray:
    """int32 ids of what precedes the row's last response, exactly as training renders it: the
    context a model generates that response from (``[bos] + tok(prompt)`` for a
    ``prompt``/``response`` row; the conversation up to the last assistant reply, with the
    template's generation prompt, for ``messages``). The response text itself may be empty."""
    segs = _segments(row, tokenizer, where)
    last = max((i for i, (_, is_response) in enumerate(segs) if is_response), default=None)
    if last is None:
        raise DataError(f"{where}: no assistant reply to take the prompt before")
    return _encode(segs[:last], tokenizer, _templated(row, tokenizer))[0]


@dataclass
class PrepareStats:
    """Counts from :func:`prepare`: rows in, rows cut at max_length, rows dropped (no response
    left), rows kept whose responses are all empty text (only an end token is learned)."""

    rows: int
    truncated: int
    dropped: int
    empty: int = 0

    def log_line(self, name: str, max_length: int) -> str:
        line = (f"{name}: {self.rows} examples, {self.truncated} truncated to {max_length} tokens, "
                f"{self.dropped} dropped with no response token left")
        return line + (f", {self.empty} with an empty response" if self.empty else "")


Encoded = Tuple[np.ndarray, np.ndarray, bool]  # (input_ids, labels) cut to max_length, whether cut


def encode_row(rows, i: int, tokenizer, max_length: int, where: Optional[Sequence[str]] = None) -> Encoded:
    """Row ``i`` of ``rows`` tokenised (:func:`tokenize_example`) and cut to ``max_length``; ``where``
    as in :func:`prepare`. Raises :class:`DataError` for a bad row."""
    ids, labels = tokenize_example(rows[i], tokenizer, f"row {i + 1}" if where is None else where[i])
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def encode_shared(rows, tokenizer, max_length: int, where: Optional[Sequence[str]], index: int, count: int,
                  gather: Callable[[np.ndarray], List[np.ndarray]]) -> Callable[[int], Encoded]:
    """:func:`encode_row` of every row, process ``index`` of ``count`` tokenising only its share
    (rows ``index``, ``index + count``, ...): the shares are exchanged through ``gather`` (every
    process's int32 array ``[*]``, in process order: an all-gather). Returns ``encoded(i)``. A row
    that failed is re-tokenised by whoever asks for it, so the same :class:`DataError` is raised
    by every process (:func:`prepare` asks in row order: the first bad row's error)."""
    mine = []
    for i in range(index, len(rows), count):
        try:
            ids, labels, cut = encode_row(rows, i, tokenizer, max_length, where)
            mine.append(np.concatenate([[i, 1, cut, len(ids)], ids, labels]))
        except DataError:
            mine.append(np.array([i, 0, 0, 0]))
    table = {}
    for part in gather(np.concatenate(mine + [np.zeros(0, np.int64)]).astype(np.int32)):
        at = 0
        while at < len(part):
            i, ok, cut, n = (int(x) for x in part[at:at + 4])
            table[i] = (part[at + 4:at + 4 + n], part[at + 4 + n:at + 4 + 2 * n], bool(cut)) if ok else None
            at += 4 + 2 * n
    return lambda i: table[i] or encode_row(rows, i, tokenizer, max_length, where)


Example = Tuple[np.ndarray, np.ndarray, float]  # (input_ids [T] int32, labels [T] int32, weight of its tokens)


def prepare(rows, tokenizer, max_length: int, name: str = "data", where: Optional[Sequence[str]] = None,
            encoded: Optional[Callable[[int], Encoded]] = None,
            weights: Optional[Sequence[float]] = None) -> Tuple[List[Example], PrepareStats]:
    """Tokenise, truncate to ``max_length`` and drop examples without response tokens.

    Returns the examples ``(input_ids, labels, weight)`` and the counts; ``weights``: each row's
    weight (:func:`expand_responses`; default 1).

    Raises :class:`DataError` naming ``name`` and the row for a bad row (``where``: the rows'
    places in their source, default ``"row 1"``, ``"row 2"``, ...), and when nothing is left
    to learn: no response token, or only empty responses. A response token at position 0
    cannot be predicted (nothing precedes it), so only positions >= 1 count as response tokens.
    ``encoded(i)``: row ``i`` already tokenised (:func:`encode_shared`; default :func:`encode_row`).
    """
    examples, truncated, dropped, empty = [], 0, 0, 0
    for i, row in enumerate(rows):
        try:
            ids, labels, cut = (encoded or (lambda i: encode_row(rows, i, tokenizer, max_length, where)))(i)
        except DataError as e:
            raise DataError(f"{name}: {e}") from None
        truncated += cut
        if not (labels[1:] != IGNORE_INDEX).any():
            dropped += 1
            continue
        empty += not any(text.strip() for text in _responses(row))
        examples.append((ids, labels, 1.0 if weights is None else float(weights[i])))
    stats = PrepareStats(len(rows), truncated, dropped, empty)
    if not examples:
        raise DataError(f"{name}: no example has a response token after truncation to {max_length} tokens "
                        f"({stats.rows} rows, {stats.truncated} truncated)")
    if empty == len(examples):
        raise DataError(f"{name}: every response is empty ({empty} examples): there is nothing to learn but the end token")
    return examples, stats


# --------------------------------------------------------------------------- rows and batches


def pack(examples: Sequence[Example], max_length: int) -> List[List[int]]:
    """Greedy first-fit packing: a list of rows, each the indices of the examples it holds."""
    rows: List[List[int]] = []
    room: List[int] = []
    for i, example in enumerate(examples):
        n = len(example[0])
        for r, free in enumerate(room):
            if free >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


def build_row(examples, members: Sequence[int], max_length: int, pad_id: int,
              targets: Optional[Sequence[Dict[str, np.ndarray]]] = None) -> Dict[str, np.ndarray]:
    """One padded row ``[max_length]`` from the examples ``members`` placed end to end.

    input_ids, labels (IGNORE_INDEX on padding and on each segment's first token, so no
    token is predicted across a segment boundary), positions (restart at 0 per segment),
    segment_ids (1, 2, ... per example; 0 on padding): int32; weights: float32, each example's
    weight on its tokens (0 on padding). ``targets``: per example, arrays ``[T_i, ...]`` aligned
    with its tokens (a teacher's sparse targets, :func:`ls_jax.teacher_targets.soft_targets`), placed
    as the labels are (zeros, or IGNORE_INDEX for int arrays, elsewhere).
    """
    out = {
        "input_ids": np.full(max_length, pad_id, np.int32),
        "labels": np.full(max_length, IGNORE_INDEX, np.int32),
        "positions": np.zeros(max_length, np.int32),
        "segment_ids": np.zeros(max_length, np.int32),
        "weights": np.zeros(max_length, np.float32),
    }
    for key, value in (targets[0] if targets else {}).items():
        fill = IGNORE_INDEX if np.issubdtype(value.dtype, np.integer) else 0
        out[key] = np.full((max_length,) + value.shape[1:], fill, value.dtype)
    at = 0
    for seg, i in enumerate(members, 1):
        ids, labels, weight = examples[i]
        n = len(ids)
        out["input_ids"][at:at + n] = ids
        out["labels"][at + 1:at + n] = labels[1:]
        out["positions"][at:at + n] = np.arange(n)
        out["segment_ids"][at:at + n] = seg
        out["weights"][at:at + n] = weight
        for key, value in (targets[i] if targets else {}).items():
            out[key][at + 1:at + n] = value[1:]
        at += n
    return out


class Batches:
    """Fixed-shape batches ``[batch_size, max_length]`` in a seeded order, addressed by position.

    ``batch(p)`` is batch number ``p`` counted from the start of training over all epochs:
    epoch ``p // per_epoch`` visits the rows in ``permutation(seed + epoch)`` order, and a
    trailing partial batch is skipped. The same ``p`` always gives the same batch, which is
    what makes ``--resume`` exact. With ``packing`` rows hold several examples; ``targets`` as in
    :func:`build_row`.
    """

    def __init__(self, examples, batch_size: int, max_length: int, pad_id: int, *,
                 seed: int = 0, packing: bool = False, shuffle: bool = True, targets=None):
        members = pack(examples, max_length) if packing else [[i] for i in range(len(examples))]
        self.rows = [build_row(examples, m, max_length, pad_id, targets) for m in members]
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.per_epoch = len(self.rows) // batch_size
        if self.per_epoch == 0:
            raise DataError(f"only {len(self.rows)} rows of data for a batch size of {batch_size}")

    def batch(self, position: int, rows: slice = slice(None)) -> Dict[str, np.ndarray]:
        """Batch number ``position``: dict of arrays ``[batch_size, max_length]`` (:func:`build_row`); with
        ``rows``, only those rows of it (a process's share of a batch split across processes)."""
        epoch, k = divmod(position, self.per_epoch)
        order = (np.random.default_rng(self.seed + epoch).permutation(len(self.rows))
                 if self.shuffle else np.arange(len(self.rows)))
        take = order[k * self.batch_size:(k + 1) * self.batch_size][rows]
        return {key: np.stack([self.rows[i][key] for i in take]) for key in self.rows[0]}

    def __len__(self) -> int:
        return self.per_epoch


def eval_batches(examples, batch_size: int, max_length: int, pad_id: int) -> List[Dict[str, np.ndarray]]:
    """Every example once, in order, padded to ``[batch_size, max_length]`` (pad rows are all-ignored)."""
    rows = [build_row(examples, [i], max_length, pad_id) for i in range(len(examples))]
    blank = build_row([], [], max_length, pad_id)
    rows += [blank] * (-len(rows) % batch_size)
    return [{k: np.stack([r[k] for r in rows[s:s + batch_size]]) for k in rows[0]}
            for s in range(0, len(rows), batch_size)]
