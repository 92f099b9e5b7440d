"""Output files: where they may go, and atomic writes (build a file or a directory under a
temporary name beside it, then rename).

A process killed mid-write leaves the previous version of ``path`` (or none), never a partial
one. The temporary name is fixed (``.NAME.tmp.EXT`` in the same directory), so the next write
replaces what a killed one left behind.
"""

import contextlib
import os
import shutil
from collections.abc import Iterator


def check_output_dir(path: str) -> None:
    """Raise ValueError unless ``path`` is, or can be created as, a writable directory
    (nothing is created)."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: {parent} is not writable")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path to write instead of ``path`` (a file or a directory; same
    extension, for writers that choose the format by it). When the block completes it replaces
    ``path``; when it raises, it is removed."""
    head, name = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(name)
    tmp, old = os.path.join(head, f".{root}.tmp{ext}"), os.path.join(head, f".{root}.old{ext}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if os.path.isdir(path) and not os.path.islink(path):  # a directory cannot be renamed over another
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
