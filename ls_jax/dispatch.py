"""The one dispatch table: ``impl`` name -> the implementation of the logit-statistics seam.

Every entry has the signature of ``ls_jax.logit_stats.two_pass``'s functions:
``f(hidden [N, D], weight [V, D], bias [V] | None, ids [N, K], weights [N, K], *, softcap,
need_sum, blocks) -> LogitStats``. :data:`ONE_PASS` lists the implementations that also make a
scalar loss's gradients in the forward sweep (ls_jax/xla.py).

"auto" is "xla" on every backend, chosen from figures (benchmarks/RESULTS.md, kernels/NOTES.md):
on an H200 the one-pass xla path was the fastest correct path at the Llama-3 head (53.7 ms
fwd+bwd, 1.58x the 6NDV floor; the dense reference 77.7, pallas 89, Liger 54.5, CCE 97.6); CPU
and TPU have no faster path measured.
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
    # the Pallas forward kernel with the blocked XLA backward: the fastest backward measured on an
    # H200 (benchmarks/RESULTS.md: 89 ms fwd+bwd at the Llama-3 head, against 223 ms with the
    # kernels' two_kernel backward and 595 ms with the atomic one; kernels/NOTES.md says why)
    "pallas": _pallas("xla"),
    "pallas_two_kernel": _pallas("two_kernel"),  # deterministic dh and dW kernels
    "pallas_atomic": _pallas("atomic"),  # one backward kernel, fp32 atomic adds
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
