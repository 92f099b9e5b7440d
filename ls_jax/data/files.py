"""Rows from local files: ``.jsonl``, ``.json``, ``.parquet`` or a ``datasets`` save_to_disk directory."""

import json
import os

from ls_jax.data.errors import DataError


def read_jsonl(path: str) -> list[tuple[int, dict]]:
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


def _read_json(path: str) -> list[dict]:
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
        raise DataError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
    return data


def _read_table(path: str, split: str) -> list[dict]:
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


def load_rows(path: str, split: str = "train") -> tuple[list[dict], list[str]]:
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
            raise DataError(
                f"{path}: unsupported data format (use .jsonl, .json, .parquet or a save_to_disk directory)"
            )
        where = [f"row {i}" for i in range(1, len(rows) + 1)]
    if not rows:
        raise DataError(f"{path}: the data set is empty")
    return rows, where
