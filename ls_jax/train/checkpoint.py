"""Checkpoints through orbax's CheckpointManager: the train state's arrays plus JSON metadata.

A checkpoint at step s holds ``state`` (every array leaf of the trainer's state, i.e.
parameters and optimizer state, as a list in ``jax.tree.leaves`` order) and ``meta`` (JSON:
step, data position, the run's config). Orbax writes each step into a temporary directory
and renames it when complete, so a run killed mid-save leaves the earlier checkpoints
intact; leftover temporary directories are removed when the manager is next opened.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointStore:
    """Save / restore train states under ``directory`` keeping the newest ``keep``."""

    def __init__(self, directory: str, keep: int = 3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """Newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start saving ``state`` (any pytree of arrays) and ``meta`` (JSON-able) as ``step``."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(jax.tree.leaves(state)), meta=ocp.args.JsonSave(meta)),
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step``; ``like`` gives the structure, shapes, dtypes and shardings."""
        leaves, treedef = jax.tree.flatten(like)
        abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in leaves]
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        return jax.tree.unflatten(treedef, list(out["state"])), dict(out["meta"])

    def meta(self, step: int) -> dict:
        """The JSON metadata of ``step`` alone (no arrays are read)."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
