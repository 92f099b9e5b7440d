"""A row rendered as token ids with prompt masking: chat templates, the simple template, prompt/response.

* ``prompt``/``response``: the token ids are ``[bos] + tok(prompt) + tok(response) + [eos]``
  (bos only when the tokenizer has one); the loss covers the response and the eos.
* ``messages``: rendered with the tokenizer's chat template when it has one; otherwise with
  :data:`SIMPLE_TEMPLATE`, i.e. ``"<|role|>\\ncontent\\n"`` per message and ``"<|assistant|>\\n"``
  before each assistant reply. Every assistant message (and the eos after it, for the simple
  template) is a response; all other text is prompt.
"""

import numpy as np

from ls_jax.data.errors import DataError

IGNORE_INDEX = -100
SIMPLE_TEMPLATE = "<|{role}|>\n{content}\n"


def _segments(row: dict, tokenizer, where: str) -> list[tuple[str, bool]]:
    """The example as ``(text, is_response)`` pieces, in order; ``where`` names the row in errors."""
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if not isinstance(msgs, (list, tuple)) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
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


def _responses(row: dict) -> list[str]:
    """The response texts of a row that :func:`_segments` accepted."""
    if row.get("messages") is not None:
        return [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    return [row["response"]]


def _chat_template_segments(msgs: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    """Split a chat-template rendering at each assistant message by rendering prefixes."""
    out, done = [], ""
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not before.startswith(done) or not upto.startswith(before):
            raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
        out += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not full.startswith(done):
        raise DataError(f"{where}: the chat template does not render conversations prefix by prefix")
    out.append((full[len(done) :], False))
    return out


def _encode(segs: list[tuple[str, bool]], tokenizer, templated: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, labels)`` of the pieces ``segs``, a bos first unless ``templated``."""
    ids: list[int] = []
    labels: list[int] = []
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


def tokenize_example(row: dict, tokenizer, where: str = "row 1") -> tuple[np.ndarray, np.ndarray]:
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
