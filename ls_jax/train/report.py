"""What a run tells its user: JSON-lines metrics, a progress bar, and the final tables."""

import json
import os
import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from ls_jax.atomic import write_text


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient norm or parameter (one-line message)."""


def bins_json(bins) -> dict[str, list]:
    """The per-bin sums of equal-width bins as JSON lists (``count``, ``confidence_sum``, ``correct_sum``)."""
    return {k: np.asarray(getattr(bins, k)).tolist() for k in ("count", "confidence_sum", "correct_sum")}


class MetricsLog:
    """Appends one JSON object per line to ``path`` (``{"kind": "train" | "eval", "step": ..., ...}``);
    writes nothing when not ``enabled`` (a process other than 0 of a multi-process run)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (logged by a run killed before its next checkpoint),
        and a last line cut short by the kill."""
        if not self.enabled or not os.path.exists(self.path):
            return

        def kept(line: str) -> bool:
            try:
                return line.endswith("\n") and json.loads(line)["step"] <= step
            except json.JSONDecodeError:
                return False

        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if kept(line)]
        write_text(self.path, "".join(keep))  # a kill now leaves the old file, not a cut one

    def write(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")


class Progress:
    """A tqdm bar over optimizer steps showing loss and tokens/s (plain log lines when disabled)."""

    def __init__(self, total: int, start: int, desc: str, enabled: bool):
        self.enabled = enabled
        self.bar = tqdm(
            total=total, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True, disable=not enabled, leave=True
        )

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


def stage_name(result: dict) -> str:
    """``base``, or ``SFT a=<smoothing>`` for a fine-tuning run."""
    return "base" if result.get("stage") == "base" else f"SFT a={result['label_smoothing']:g}"


CLASSIFICATION_COLUMNS = (
    ("label_smoothing", "smoothing", "{:.2f}"),
    ("loss", "eval loss", "{:.4f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("log_loss", "log loss", "{:.4f}"),
    ("brier", "Brier", "{:.4f}"),
    ("ece", "ECE", "{:.4f}"),
    ("mean_confidence", "confidence", "{:.3f}"),
)


def summary_table(rows: Sequence[dict[str, float]], columns) -> str:
    """A fixed-width text table of the final held-out metrics, one row per run."""
    return _table(
        [title for _, title, _ in columns],
        [[fmt.format(r[key]) for key, _, fmt in columns] for r in rows],
        label_column=False,
    )


def by_stage(results: Sequence[dict]) -> dict[str, list[dict]]:
    """The final metrics grouped by stage (seeds together), in run order."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(stage_name(r), []).append(r)
    return groups


def _cell(values: Sequence[float], fmt: str) -> str:
    """``mean`` of one value, ``mean ± half range`` of several (seeds)."""
    values = np.asarray(values, np.float64)
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(values.mean())} ± {fmt.format((values.max() - values.min()) / 2)}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], label_column: bool = True) -> str:
    """Fixed-width columns, right-aligned but for a first ``label_column`` (left-aligned)."""
    cells = [list(header), *map(list, rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if label_column and not i else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


ANSWER_COLUMNS = (
    ("accuracy", "accuracy", "{:.3f}"),
    ("confidence", "confidence", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"),
    ("ece10", "ECE-10", "{:.3f}"),
    ("brier", "Brier", "{:.3f}"),
    ("nll", "NLL", "{:.3f}"),
)
TOKEN_COLUMNS = (
    ("accuracy", "accuracy", "{:.3f}"),
    ("mean_confidence", "confidence", "{:.3f}"),
    ("ece", "ECE", "{:.3f}"),
    ("brier", "Brier", "{:.3f}"),
    ("nll", "NLL", "{:.3f}"),
    ("special_accuracy", "EOS acc", "{:.3f}"),
    ("special_mean_confidence", "EOS conf", "{:.3f}"),
)
KIND_TITLES = {
    "multiple_choice": "multiple-choice questions: option-letter probabilities normalised over the options",
    "generated": "{questions}: greedy answer, confidence = its sequence probability",
}


def summary_tables(results: Sequence[dict], questions: str = "addition questions") -> str:
    """The final tables: answer level per kind of question (each stage, then after temperature
    scaling), then token level over the content tokens; cells are mean ± half range over seeds.
    ``questions`` names the generated answers' questions in their table's title."""
    groups = by_stage(results)
    seeds = sorted({r.get("seed") for r in results if r.get("stage") != "base"})
    out = []
    for kind, title in KIND_TITLES.items():
        rows = []
        for name, runs in groups.items():
            for scaled in ("", "_scaled"):
                found = [r["answers"][kind + scaled] for r in runs if kind + scaled in r.get("answers", {})]
                if not found:
                    continue
                label = name + (f" + T ({_cell([f['temperature'] for f in found], '{:.2f}')})" if scaled else "")
                rows.append([label] + [_cell([f[k] for f in found], fmt) for k, _, fmt in ANSWER_COLUMNS])
        if rows:
            n = next(r["answers"][kind]["count"] for r in results if kind in r.get("answers", {}))
            out.append(
                f"answer level, {title.format(questions=questions)} ({n} held-out questions):\n"
                + _table(["stage"] + [t for _, t, _ in ANSWER_COLUMNS], rows)
            )
    rows = [[name] + [_cell([r[k] for r in runs], fmt) for k, _, fmt in TOKEN_COLUMNS] for name, runs in groups.items()]
    out.append(
        "token level, content tokens of the held-out responses (EOS apart):\n"
        + _table(["stage"] + [t for _, t, _ in TOKEN_COLUMNS], rows)
    )
    if len(seeds) > 1:
        out.append(
            f"(mean ± half the range over seeds {', '.join(map(str, seeds))}; + T: temperature scaling "
            f"fitted on other held-out questions)"
        )
    return "\n\n".join(out)


def _pooled_bins(runs: Sequence[dict], key: str, kind: str = None):
    """CalibrationBins summed over runs (seeds) from their JSON per-bin sums; None if absent."""
    from ls_jax.calibration import CalibrationBins

    found = [r[key] if kind is None else r.get(key, {}).get(kind) for r in runs]
    if not found or any(f is None for f in found):
        return None
    total = {k: np.sum([f[k] for f in found], axis=0) for k in ("count", "confidence_sum", "correct_sum")}
    return CalibrationBins(
        total["count"], total["confidence_sum"], total["correct_sum"], np.float32(0), np.float32(np.nan)
    )


def _ceiling(run: dict, kind: str | None, num_options: int) -> float | None:
    """The highest confidence a run's smoothed training target allows at a level (``kind``: None
    for tokens or classes, else a kind of answer); None without smoothing or for generated
    answers. A classifier's ``1 - a + a / K`` on K classes (``1 - a`` under the "others"
    convention); a token's ``1 - a + a / V``; the option letters', normalised over
    ``num_options`` options, ``(1 - a + a / V) / (1 - a + num_options * a / V)``."""
    a = run["label_smoothing"]
    if a == 0 or kind == "generated":
        return None
    if "classes" in run:
        return 1 - a if run["smoothing_convention"] == "others" else 1 - a + a / len(run["classes"])
    top = 1 - a + a / run["vocab_size"]
    return top if kind is None else top / (1 - a + num_options * a / run["vocab_size"])


def stage_reliability(results: Sequence[dict], path: str, num_options: int) -> str:
    """One PNG of reliability diagrams, a column per stage (seeds pooled) and a row per level:
    multiple-choice answers (``num_options`` options), generated answers, content tokens; for
    ``--task classification`` runs one row, the predicted class. A smoothed stage shows its
    confidence ceiling (:func:`_ceiling`)."""
    from ls_jax.calibration import reliability_diagrams

    groups = by_stage(results)
    if any("classes" in r for r in results):
        levels = (("token_bins", None, f"{len(results[0]['classes'])} classes"),)
    else:
        levels = (
            ("answer_bins", "multiple_choice", "multiple-choice answers"),
            ("answer_bins", "generated", "generated answers"),
            ("token_bins", None, "content tokens"),
        )
    grid = []
    for key, kind, title in levels:
        row = []
        for name, runs in groups.items():
            bins = _pooled_bins(runs, key, kind)
            if bins is not None:
                row.append((f"{name}, {title}", bins, _ceiling(runs[0], kind, num_options)))
        if row:
            grid.append(row)
    return reliability_diagrams(grid, path)
