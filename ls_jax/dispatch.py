"""The one dispatch table: ``impl`` name -> the implementation of the logit-statistics seam.

Every entry has the signature of ``ls_jax.logit_stats.two_pass``'s functions:
``f(hidden [N, D], weight [V, D], bias [V] | None, ids [N, K], weights [N, K], *, softcap,
need_sum, blocks) -> LogitStats``. :data:`ONE_PASS` lists the implementations that also make a
scalar loss's gradients in the forward sweep (ls_jax/xla.py).

"auto" is "xla" on every backend until the Pallas kernel has been measured on a GPU
(benchmarks/RESULTS.md): a default is chosen from figures, not from expectations.
"""

from ls_jax import reference, xla
from ls_jax.logit_stats import Backend, two_pass


def _pallas(backward: str):
    def make():
        from ls_jax.kernels import fused

        bwd = xla.backward if backward == "xla" else fused.backward_fn(backward)
        return two_pass(Backend(fused.forward, bwd))

    return make


IMPLS = {
    "reference": lambda: reference.logit_stats,
    "xla": lambda: xla.logit_stats,
    "pallas": _pallas("two_kernel"),  # deterministic dh and dW kernels
    "pallas_atomic": _pallas("atomic"),  # one backward kernel, fp32 atomic adds
    "pallas_xla": _pallas("xla"),  # the Pallas forward with the blocked XLA backward
}
ONE_PASS = {"xla": xla.one_pass_loss}
CHOICES = ("auto",) + tuple(IMPLS)


def resolve(impl: str) -> str:
    """The implementation ``impl`` names ("auto" -> "xla"); ValueError for an unknown name."""
    if impl not in CHOICES:
        raise ValueError(f"impl must be one of {CHOICES}, got {impl!r}")
    return "xla" if impl == "auto" else impl


def logit_stats_fn(impl: str):
    """The seam function of ``impl`` (see the module docstring)."""
    return IMPLS[resolve(impl)]()
