"""What a run tells its user: JSON-lines metrics, a progress bar, and the final table."""

import json
import os
import sys
from typing import Dict, List, Sequence

from tqdm import tqdm

from ls_jax.atomic import write_text


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient norm or parameter (one-line message)."""


class MetricsLog:
    """Appends one JSON object per line to ``path`` (``{"kind": "train" | "eval", "step": ..., ...}``)."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (logged by a run killed before its next checkpoint),
        and a last line cut short by the kill."""
        if not os.path.exists(self.path):
            return

        def kept(line: str) -> bool:
            try:
                return line.endswith("\n") and json.loads(line)["step"] <= step
            except json.JSONDecodeError:
                return False

        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if kept(line)]
        write_text(self.path, "".join(keep))  # a kill now leaves the old file, not a cut one

    def write(self, kind: str, step: int, values: Dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")


class Progress:
    """A tqdm bar over optimizer steps showing loss and tokens/s (plain log lines when disabled)."""

    def __init__(self, total: int, start: int, desc: str, enabled: bool):
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True,
                        disable=not enabled, leave=True)

    def update(self, loss: float, tokens_per_s: float) -> None:
        """Advance one step, showing its loss and throughput."""
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(1)

    def note(self, text: str) -> None:
        """A line printed above the bar (or to stderr when the bar is off)."""
        if self.enabled:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


TABLE_COLUMNS = (("label_smoothing", "smoothing", "{:.2f}"), ("loss", "eval loss", "{:.4f}"),
                 ("accuracy", "token acc", "{:.3f}"), ("answer_accuracy", "answer acc", "{:.3f}"),
                 ("nll", "NLL", "{:.4f}"), ("brier", "Brier", "{:.4f}"),
                 ("ece", "ECE", "{:.4f}"), ("tokens_per_s", "train tok/s", "{:,.0f}"))


CLASSIFICATION_COLUMNS = (("label_smoothing", "smoothing", "{:.2f}"), ("loss", "eval loss", "{:.4f}"),
                          ("accuracy", "accuracy", "{:.3f}"), ("log_loss", "log loss", "{:.4f}"),
                          ("brier", "Brier", "{:.4f}"), ("ece", "ECE", "{:.4f}"),
                          ("mean_confidence", "confidence", "{:.3f}"))


def summary_table(rows: Sequence[Dict[str, float]], columns=TABLE_COLUMNS) -> str:
    """A fixed-width text table of the final held-out metrics, one row per run."""
    cells: List[List[str]] = [[title for _, title, _ in columns]]
    for r in rows:
        cells.append([fmt.format(r[key]) for key, _, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
