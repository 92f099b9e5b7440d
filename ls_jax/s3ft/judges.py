"""Judges: does a candidate response answer the prompt as correctly as the gold one?

Every judge is a callable ``judge(prompt, gold, candidate) -> bool``:

* ``exact``: equal after normalisation (lower case, punctuation, articles and extra spaces removed).
* ``numeric``: the final numbers agree within a tolerance; the final number of a text is the one
  after ``####`` (GSM8K style) if there is one, else its last number (``1,234`` and ``-0.5`` read).
* ``code``: the candidate (the code of its first fenced block, or all of it) followed by the row's
  ``tests`` (Python source, or a list of lines) runs in a child process and exits 0 within
  ``timeout`` seconds; a failure, crash, limit hit or timeout is "incorrect", never an exception.
  It runs model-written code, so it needs the user's opt-in (``allow_code_execution=True``,
  ``--allow-code-execution``); the child is isolated and limited as far as the platform allows
  (:mod:`ls_jax.s3ft.execution`), which guards against a model's mistakes, not hostile code.
* any user callable with that signature.

A row picks its judge with a ``"judge"`` field; otherwise the default (``--judge``) applies.
"""

import re
import string
from collections.abc import Callable

from ls_jax.s3ft import execution

Judge = Callable[[str, str, str], bool]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FENCE = re.compile(r"```[\w+-]*\n(.*?)```", re.S)
REFUSAL = (
    "the 'code' judge runs model-written Python code on this machine and needs --allow-code-execution "
    "(Python: allow_code_execution=True), which allows running it in a child process that is isolated and "
    "limited as far as the platform allows (see ls_jax.s3ft.execution; not a sandbox for hostile code)"
)


class CodeExecutionRefused(ValueError):
    """The ``code`` judge was asked for without the user's opt-in."""


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prompt: str, gold: str, candidate: str) -> bool:
    """``normalize(candidate) == normalize(gold)``."""
    return normalize(candidate) == normalize(gold)


def final_number(text: str) -> float | None:
    """The number after the last ``####`` if present, else the last number in ``text``; None if none."""
    text = str(text)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _NUMBER.search(text)
    else:
        found = list(_NUMBER.finditer(text))
        found = found[-1] if found else None
    if found is None:
        return None
    try:
        return float(found.group().replace(",", ""))
    except ValueError:
        return None


def numeric_match(prompt: str, gold: str, candidate: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """The final numbers of gold and candidate agree within ``rel_tol`` (relative) or ``abs_tol``."""
    want, got = final_number(gold), final_number(candidate)
    if want is None:
        raise ValueError(f"the gold response has no number: {str(gold)[:80]!r}")
    return got is not None and abs(got - want) <= max(abs_tol, rel_tol * abs(want))


def extract_code(text: str) -> str:
    """The first fenced code block of ``text`` (```python ... ```), or the whole text."""
    found = _FENCE.search(str(text))
    return found.group(1) if found else str(text)


def run_python_tests(code: str, tests, *, timeout: float = 10.0) -> bool:
    """Whether ``code`` then ``tests`` run in an isolated, limited child and exit 0 in time.

    Args:
        code: a response (the code of its first fenced block, or all of it, runs).
        tests: Python source, or a list of lines.
        timeout: wall-clock seconds (also the child's CPU-seconds limit).

    Returns:
        True when the program exited 0 within ``timeout``; see :func:`ls_jax.s3ft.execution.run`.
    """
    tests = "\n".join(tests) if isinstance(tests, (list, tuple)) else str(tests)
    return execution.run(extract_code(code) + "\n\n" + tests + "\n", timeout).passed


JUDGES = {"exact": exact_match, "numeric": numeric_match}
NAMES = ("exact", "numeric", "code")


def require_opt_in(judge, allow_code_execution: bool) -> None:
    """Raise :class:`CodeExecutionRefused` when ``judge`` is ``"code"`` and ``allow_code_execution`` is False."""
    if judge == "code" and not allow_code_execution:
        raise CodeExecutionRefused(REFUSAL)


def chosen(judge, row: dict):
    """The judge ``row`` asks for: its ``"judge"`` field if set, else ``judge``."""
    return row.get("judge") or judge


def resolve(judge, row: dict, *, timeout: float = 10.0, allow_code_execution: bool = False) -> Judge:
    """The judge for ``row``: its ``"judge"`` field if set, else ``judge`` (a name or a callable).

    Args:
        judge: the default judge, a name in :data:`NAMES` or a callable.
        row: the row (its ``"judge"`` and, for ``code``, ``"tests"`` fields).
        timeout: seconds per ``code`` run.
        allow_code_execution: the user's opt-in to the ``code`` judge.

    Returns:
        A callable ``(prompt, gold, candidate) -> bool``; ``code`` binds the row's ``tests``.

    Raises:
        CodeExecutionRefused: ``code`` without ``allow_code_execution``.
        ValueError: an unknown name, or a ``code`` row without tests.
    """
    name = chosen(judge, row)
    if callable(name):
        return name
    require_opt_in(name, allow_code_execution)
    if name == "code":
        tests = row.get("tests")
        if not tests:
            raise ValueError("the code judge needs the row's 'tests' (Python source or a list of lines)")
        return lambda prompt, gold, candidate: run_python_tests(candidate, tests, timeout=timeout)
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(NAMES)} (or a callable)")
    return JUDGES[name]
