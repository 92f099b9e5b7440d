"""README's commands as a new user runs them: ``python train.py`` from the repository root, in a
subprocess with the installed dependencies (transformers imports Hugging Face's ``kernels``,
which the root must not shadow), on the smallest settings of the default run and of docs/classification.md's
classification command with ``--compare-smoothing``, each to its final table."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--steps",
    "2",
    "--num-train",
    "48",
    "--num-eval",
    "16",
    "--batch-size",
    "16",
    "--no-progress",
    "--eval-every",
    "2",
    "--log-every",
    "1",
]


def _train(tmp_path, *flags):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "train.py", *SMALL, *flags, "--output-dir", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()


def test_default_run_from_the_root(tmp_path):
    """The default: a base model, then SFT at a = 0 and 0.1, the comparison table at the end."""
    out = _train(tmp_path, "--base-steps", "2", "--num-base", "32", "--seeds", "0", "--max-length", "40")
    stages = [line.split("  ")[0] for line in out if line.startswith(("base ", "SFT "))]
    assert stages[-3:] == ["base", "SFT a=0", "SFT a=0.1"], out[-20:]  # the last table: content tokens
    assert out[-1].startswith("checkpoints, metrics.jsonl, reliability.png")


def test_classification_compare_smoothing_from_the_root(tmp_path):
    out = _train(tmp_path, "--task", "classification", "--compare-smoothing", "0,0.2")
    rows = [line.split()[0] for line in out if line.split()[:1] in (["0.00"], ["0.20"])]
    assert rows[-2:] == ["0.00", "0.20"], out[-20:]
    assert (tmp_path / "out" / "reliability.png").stat().st_size > 0
