"""Build an S3FT training set (Gupta et al., "Selective Self-to-Supervised Fine-Tuning", arXiv 2502.08130).

For each row (prompt x, gold response y): the model answers x greedily (y_hat); if the judge
accepts y_hat, y_hat is the target ("self"); otherwise the model is asked to rewrite y in its
own words, and an accepted rewrite is the target ("paraphrase"); otherwise y is ("gold").
Rows keep their format (``prompt``/``response`` or ``messages``, whose last assistant message
is the gold and gets replaced) and gain ``s3ft_row`` (the input row's number), ``s3ft_source``, ``s3ft_self_verdict``,
``s3ft_paraphrase_verdict``, ``s3ft_self`` and ``s3ft_paraphrase`` fields.

Verdicts: "correct", "incorrect", "truncated" (the generation hit ``max_new_tokens``: not used,
judge not asked), "error" (the judge raised: counted as incorrect and reported) and "" (not run).
Rows that cannot take part (no gold response, an unknown judge, a ``code`` row without tests)
are kept out of the training set and listed with the reason in :attr:`S3FTSet.skipped`. The
``code`` judge runs model-written code and needs ``allow_code_execution=True``: without it a
build that asks for it (by default or in a row) raises before anything is generated.
"""

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ls_jax import data
from ls_jax.atomic import write_text
from ls_jax.s3ft import execution, judges

SOURCES = ("self", "paraphrase", "gold")
PARAPHRASE_TEMPLATE = (
    "{prompt}\n\nHere is a correct response:\n{gold}\n\n"
    "Rewrite this response in your own words, keeping its final answer.\n"
)


@dataclass
class S3FTSet:
    """The new training rows, the rows left out (``{"row": i, "reason": str}``) and notes."""

    rows: list[dict]
    skipped: list[dict]
    notes: list[str] = field(default_factory=list)

    def kept_rows(self) -> list[int]:
        """The input row number of each training row."""
        return [r["s3ft_row"] for r in self.rows]

    def counts(self) -> dict[str, int]:
        """Rows per source (self / paraphrase / gold) and skipped."""
        out = {s: sum(r["s3ft_source"] == s for r in self.rows) for s in SOURCES}
        out["skipped"] = len(self.skipped)
        return out

    def table(self) -> str:
        """The counts per source as a text table (the paper's breakdown)."""
        counts = self.counts()
        total = max(sum(counts.values()), 1)
        lines = [f"{'target':<12}{'rows':>7}{'share':>8}"]
        lines += [f"{k:<12}{v:>7}{v / total:>8.1%}" for k, v in counts.items()]
        verdicts = {}
        for r in self.rows:
            for stage in ("self", "paraphrase"):
                v = r[f"s3ft_{stage}_verdict"]
                if v:
                    verdicts[(stage, v)] = verdicts.get((stage, v), 0) + 1
        lines.append("verdicts: " + ", ".join(f"{s} {v}: {n}" for (s, v), n in sorted(verdicts.items())))
        return "\n".join(lines + self.notes)


def gold_of(row: dict) -> tuple[str | None, str | None]:
    """(prompt text for the judge, gold response) of a row; None for what is missing."""
    msgs = row.get("messages")
    if msgs:
        if not isinstance(msgs, (list, tuple)) or not all(isinstance(m, dict) for m in msgs):
            return None, None
        last = msgs[-1]
        gold = last.get("content") if last.get("role") == "assistant" else None
        users = [m.get("content") for m in msgs[:-1] if m.get("role") == "user"]
        return (str(users[-1]) if users else ""), (None if gold in (None, "") else str(gold))
    gold = row.get("response")
    prompt = row.get("prompt")
    return (None if prompt is None else str(prompt)), (None if gold in (None, "") else str(gold))


def with_target(row: dict, text: str) -> dict:
    """A copy of ``row`` whose gold response (``response`` or the last message) is ``text``."""
    out = dict(row)
    if row.get("messages"):
        out["messages"] = [*row["messages"][:-1], {**row["messages"][-1], "content": text}]
    else:
        out["response"] = text
    return out


def _paraphrase_ids(prompt: str, gold: str, tokenizer, template: str):
    """Prompt ids asking the model to rewrite ``gold``: a user turn with the chat template, plain text without."""
    request = template.format(prompt=prompt, gold=gold)
    if getattr(tokenizer, "chat_template", None):
        row = {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": ""}]}
    else:
        row = {"prompt": request, "response": ""}
    return data.prompt_ids(row, tokenizer)


def _verdict(judge, prompt, gold, gen, index, errors) -> str:
    if gen.finish_reason == "length":
        return "truncated"
    try:
        return "correct" if judge(prompt, gold, gen.text) else "incorrect"
    except Exception as e:  # a judge's failure is that row's verdict, reported, never a crash
        errors.append(f"row {index}: {type(e).__name__}: {e}")
        return "error"


def build(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    judge="exact",
    paraphrase: bool = True,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    template: str = PARAPHRASE_TEMPLATE,
    timeout: float = 10.0,
    progress: bool = True,
    where: Sequence[str] | None = None,
    allow_code_execution: bool = False,
) -> S3FTSet:
    """The S3FT training set of ``rows`` for ``model`` (greedy generation, see the module doc).

    judge: a name in :data:`ls_jax.s3ft.judges.NAMES` or a callable ``(prompt, gold, candidate)
    -> bool``; a row's ``"judge"`` field overrides it. paraphrase: False skips step 2 (rows the
    model gets wrong take the gold). where: each row's place for messages (default ``"row K"``,
    from 1). allow_code_execution: the user's opt-in to the ``code`` judge (runs model-written
    code). Raises ValueError for an unknown ``judge`` name,
    :class:`ls_jax.s3ft.judges.CodeExecutionRefused` for the ``code`` judge without the opt-in and
    RuntimeError when it cannot run a child here (all before generating).
    """
    if not callable(judge) and judge not in judges.NAMES:
        raise ValueError(f"unknown judge {judge!r}; known: {', '.join(judges.NAMES)} (or a callable)")
    from tqdm import tqdm

    from ls_jax.generation import generate

    usable, skipped = [], []
    for i, row in enumerate(rows):
        prompt, gold = gold_of(row)
        reason = "no gold response" if gold is None else None
        if reason is None:
            try:
                judge_fn = judges.resolve(judge, row, timeout=timeout, allow_code_execution=allow_code_execution)
                ids = data.prompt_ids(row, tokenizer, where[i] if where else f"row {i + 1}")
            except judges.CodeExecutionRefused:
                raise
            except ValueError as e:  # DataError is a ValueError
                reason = str(e)
        if reason is not None:
            skipped.append({"row": i, "reason": reason})
            continue
        usable.append((i, row, prompt or "", gold, judge_fn, ids))
    # the code judge's protections, found (or found missing: RuntimeError) before anything is generated
    uses_code = any(judges.chosen(judge, u[1]) == "code" for u in usable)
    isolation = execution.best_isolation() if uses_code else None
    bar = tqdm(total=len(usable) * (2 if paraphrase else 1), desc="s3ft generate", disable=not progress)
    gens = generate(
        model,
        tokenizer,
        [u[5] for u in usable],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=bar.update,
    )
    errors: list[str] = []
    verdicts = [_verdict(u[4], u[2], u[3], g, u[0], errors) for u, g in zip(usable, gens)]
    wrong = [k for k, v in enumerate(verdicts) if v != "correct"]
    para = {}
    if paraphrase and wrong:
        bar.total = len(usable) + len(wrong)
        asks = [_paraphrase_ids(usable[k][2], usable[k][3], tokenizer, template) for k in wrong]
        para = dict(
            zip(
                wrong,
                generate(
                    model, tokenizer, asks, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=bar.update
                ),
            )
        )
    bar.close()
    out = []
    for k, ((i, row, prompt, gold, judge_fn, _), gen, verdict) in enumerate(zip(usable, gens, verdicts)):
        p_verdict, p_text = "", ""
        if verdict == "correct":
            source, target = "self", gen.text
        else:
            source, target = "gold", gold
            if k in para:
                p_text = para[k].text
                p_verdict = _verdict(judge_fn, prompt, gold, para[k], i, errors)
                if p_verdict == "correct":
                    source, target = "paraphrase", p_text
        out.append(
            {
                **with_target(row, target),
                "s3ft_row": i,
                "s3ft_source": source,
                "s3ft_self_verdict": verdict,
                "s3ft_paraphrase_verdict": p_verdict,
                "s3ft_self": gen.text,
                "s3ft_paraphrase": p_text,
            }
        )
    notes = []
    if isolation is not None:
        notes.append(f"code judge ran in: {isolation.describe()}")
    truncated = sum(r["s3ft_self_verdict"] == "truncated" for r in out)
    if truncated:
        notes.append(f"{truncated} self responses hit max_new_tokens={max_new_tokens} (not used as targets)")
    if errors:
        notes.append(f"the judge raised on {len(errors)} responses (counted incorrect); first: {errors[0]}")
    if skipped:
        notes.append(f"{len(skipped)} rows left out; first: row {skipped[0]['row']}: {skipped[0]['reason']}")
    if paraphrase and not getattr(tokenizer, "chat_template", None):
        notes.append("the tokenizer has no chat template: paraphrase requests were sent as plain-text prompts")
    return S3FTSet(out, skipped, notes)


def fingerprint(rows: Sequence[dict], model_id: str, tokenizer, settings: dict) -> str:
    """sha256 of everything an S3FT set depends on: rows, model, tokenizer and the settings."""
    h = hashlib.sha256()
    for part in (rows, model_id, tokenizer.get_vocab(), getattr(tokenizer, "chat_template", None) or "", settings):
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def checkpoint_id(path: str) -> str:
    """A model directory's identity: its path and each file's name, size and modification time."""
    files = sorted(os.listdir(path))
    stats = [
        (f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f)))
        for f in files
        if os.path.isfile(os.path.join(path, f))
    ]
    return json.dumps([os.path.abspath(path), stats])


def write(result: S3FTSet, out: str, key: str) -> None:
    """``out`` (the rows, JSON lines), ``out + ".skipped.jsonl"`` and ``out + ".meta.json"`` (key, counts, notes)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):  # the old key must not vouch for half-written new rows
        os.remove(out + ".meta.json")
    for path, items in ((out, result.rows), (out + ".skipped.jsonl", result.skipped)):
        write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
    write_text(out + ".meta.json", json.dumps({"key": key, "counts": result.counts(), "notes": result.notes}, indent=2))


def load_if_current(out: str, key: str) -> S3FTSet | None:
    """The set written to ``out`` when it was built from the inputs ``key`` names, else None."""
    try:
        with open(out + ".meta.json") as f:
            meta = json.load(f)
        if meta.get("key") != key:
            return None
        rows = [r for _, r in data.read_jsonl(out)]
        skipped = [r for _, r in data.read_jsonl(out + ".skipped.jsonl")]
    except (OSError, ValueError):
        return None
    return S3FTSet(rows, skipped, list(meta.get("notes", [])))


def build_cached(
    out: str,
    build_model: Callable,
    tokenizer,
    rows: Sequence[dict],
    model_id: str,
    *,
    force: bool = False,
    log=print,
    where: Sequence[str] | None = None,
    allow_code_execution: bool = False,
    **settings,
) -> S3FTSet:
    """:func:`build` into ``out``, or the set already there when its inputs are unchanged
    (``allow_code_execution`` is not one of them: reusing a set runs no code)."""
    safe = {k: (v if not callable(v) else getattr(v, "__qualname__", repr(v))) for k, v in settings.items()}
    key = fingerprint(list(rows), model_id, tokenizer, safe)
    if not force and (cached := load_if_current(out, key)) is not None:
        log(f"s3ft: reusing {out} (built from the same data, model and settings)")
        return cached
    result = build(build_model(), tokenizer, rows, where=where, allow_code_execution=allow_code_execution, **settings)
    write(result, out, key)
    log(f"s3ft: wrote {out} ({len(result.rows)} rows)")
    return result
