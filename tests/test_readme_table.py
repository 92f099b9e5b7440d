"""README.md's table of the default run is what ``python train.py`` prints (the real command,
offline: about 3 CPU-minutes, the slowest test here).

The run is deterministic on a given CPU; another CPU's float rounding may move a last digit, so
each number may differ by 0.01 (plus 2 % of itself); every label and the layout must match.
"""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- default run: begin -->", "<!-- default run: end -->"
NUMBER = re.compile(r"-?\d+\.\d+")


def readme_table() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n")
    return "\n".join(line[4:] if line.startswith("    ") else line for line in block.splitlines())


def printed_tables(stdout: str) -> str:
    """The tables: everything the command prints before its closing "checkpoints, ..." line."""
    return stdout[: stdout.index("checkpoints, metrics.jsonl")].strip("\n")


def assert_same_table(got: str, expected: str) -> None:
    got_lines, expected_lines = got.splitlines(), expected.splitlines()
    assert len(got_lines) == len(expected_lines), f"printed:\n{got}\n\nREADME:\n{expected}"
    for g, e in zip(got_lines, expected_lines):
        assert NUMBER.sub("#", g).split() == NUMBER.sub("#", e).split(), f"printed: {g!r}\nREADME:  {e!r}"
        for x, y in zip(map(float, NUMBER.findall(g)), map(float, NUMBER.findall(e))):
            assert x == pytest.approx(y, abs=0.01, rel=0.02), f"printed: {g!r}\nREADME:  {e!r}"


def test_comparison_rejects_a_changed_number():
    table = "stage  ECE\nbase   0.040"
    assert_same_table("stage  ECE\nbase   0.045", table)
    with pytest.raises(AssertionError):
        assert_same_table("stage  ECE\nbase   0.060", table)
    with pytest.raises(AssertionError):
        assert_same_table("stage  ECE\nSFT    0.040", table)


def test_readme_table_is_what_train_py_prints(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--no-progress", "--output-dir", str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_table(printed_tables(proc.stdout), readme_table())
