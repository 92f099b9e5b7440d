"""Judges: does a candidate response answer the prompt as correctly as the gold one?

Every judge is a callable ``judge(prompt, gold, candidate) -> bool``:

* ``exact``: equal after normalisation (lower case, punctuation, articles and extra spaces removed).
* ``numeric``: the final numbers agree within a tolerance; the final number of a text is the one
  after ``####`` (GSM8K style) if there is one, else its last number (``1,234`` and ``-0.5`` read).
* ``code``: the candidate (the code of its first fenced block, or all of it) followed by the row's
  ``tests`` (Python source, or a list of lines) runs in a fresh Python subprocess and exits 0
  within ``timeout`` seconds. Sockets are disabled in the child; a failure, crash or timeout is
  "incorrect", never an exception. This keeps mistakes of a model from reaching the network or
  running forever; it is not a security sandbox for hostile code.
* any user callable with that signature.

A row picks its judge with a ``"judge"`` field; otherwise the default (``--judge``) applies.
"""

import contextlib
import os
import re
import signal
import string
import subprocess
import sys
import tempfile
from typing import Callable, Optional

Judge = Callable[[str, str, str], bool]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FENCE = re.compile(r"```[\w+-]*\n(.*?)```", re.S)
# run before the candidate's code: no network from the child process
_NO_NETWORK = (
    "import socket as _s\n"
    "def _blocked(*a, **k):\n    raise OSError('network access is disabled while judging code')\n"
    "_s.socket = _s.create_connection = _s.getaddrinfo = _blocked\n"
)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's normalisation)."""
    text = "".join(ch for ch in str(text).lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prompt: str, gold: str, candidate: str) -> bool:
    """``normalize(candidate) == normalize(gold)``."""
    return normalize(candidate) == normalize(gold)


def final_number(text: str) -> Optional[float]:
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
    """True when ``code`` then ``tests`` run in a fresh ``python -I`` process and exit 0 in time."""
    tests = "\n".join(tests) if isinstance(tests, (list, tuple)) else str(tests)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "judge.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_NO_NETWORK + extract_code(code) + "\n\n" + tests + "\n")
        # its own process group, so a timeout also ends any process the code started
        with subprocess.Popen([sys.executable, "-I", path], cwd=tmp, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              env={"PATH": os.environ.get("PATH", "")}) as proc:
            try:
                return proc.wait(timeout=timeout) == 0
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return False


JUDGES = {"exact": exact_match, "numeric": numeric_match}
NAMES = ("exact", "numeric", "code")


def resolve(judge, row: dict, *, timeout: float = 10.0) -> Judge:
    """The judge for ``row``: its ``"judge"`` field if set, else ``judge`` (a name or a callable).

    ``code`` binds the row's ``tests``. Raises ValueError for an unknown name or a ``code`` row
    without tests.
    """
    chosen = row.get("judge") or judge
    if callable(chosen):
        return chosen
    if chosen == "code":
        tests = row.get("tests")
        if not tests:
            raise ValueError("the code judge needs the row's 'tests' (Python source or a list of lines)")
        return lambda prompt, gold, candidate: run_python_tests(candidate, tests, timeout=timeout)
    if chosen not in JUDGES:
        raise ValueError(f"unknown judge {chosen!r}; known: {', '.join(NAMES)} (or a callable)")
    return JUDGES[chosen]
