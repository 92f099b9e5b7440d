"""Multi-process runs (one process per host, or several on one machine): joining, and who writes.

Every process runs the same ``train.py`` command. They join through
``jax.distributed.initialize``, from ``--coordinator HOST:PORT --num-processes N --process-id I``
or, with ``--distributed``, from what JAX detects in the environment (Slurm, TPU VMs, Open MPI).
After that ``jax.devices()`` lists every process's devices and the mesh spans them all; each
process tokenises only its share of the examples (:func:`allgather` exchanges the token ids;
``ls_jax.data.encode_shared``) and puts only its own rows of each batch on its devices, orbax
writes one checkpoint across processes, and only process 0 writes the other files (metrics,
report, export).
"""

import jax
import numpy as np

from ls_jax.train.config import ConfigError


def initialize(c) -> None:
    """Join the run's other processes as ``c`` asks (a no-op for a one-process run, or when this
    process has already joined). Raises :class:`ConfigError` for inconsistent flags, and when
    ``--num-processes`` disagrees with the coordinator's count."""
    flags = (c.coordinator, c.num_processes, c.process_id)
    if all(f is None for f in flags) and not c.distributed:
        return
    if any(f is None for f in flags) and not all(f is None for f in flags):
        raise ConfigError(
            "--coordinator, --num-processes and --process-id go together "
            "(or --distributed alone, to take them from Slurm / TPU / MPI)"
        )
    if c.num_processes is not None and not 0 <= c.process_id < c.num_processes:
        raise ConfigError(f"--process-id must be in [0, --num-processes {c.num_processes}), got {c.process_id}")
    if c.init_timeout < 1:
        raise ConfigError(f"--init-timeout must be >= 1, got {c.init_timeout}")
    if not jax.distributed.is_initialized():
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (tests); no-op on GPU / TPU
        try:
            jax.distributed.initialize(
                c.coordinator, c.num_processes, c.process_id, initialization_timeout=c.init_timeout
            )
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot join the other processes: {str(e).strip().splitlines()[0]}") from None
    if c.num_processes is not None and jax.process_count() != c.num_processes:
        raise ConfigError(
            f"--num-processes {c.num_processes} does not match the coordinator's {jax.process_count()} processes"
        )


def is_main() -> bool:
    """Whether this is process 0, the one that writes metrics, reports and the export."""
    return jax.process_index() == 0


def allgather(local: np.ndarray) -> list[np.ndarray]:
    """Every process's 1-d int32 array (their lengths may differ), in process order."""
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.array([local.size], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.int32)
    padded[: local.size] = local
    stacked = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [stacked[q, : int(n)] for q, n in enumerate(sizes)]
