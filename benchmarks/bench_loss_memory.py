"""Loss + gradient (hidden, weight): time, CPU time, memory and float64 error of every arm, one run.

Arms (``--arms``; each runs in its own subprocess so memory peaks do not mix):

* ``one_pass``: ``linear_smoothed_cross_entropy(impl="xla", reduction="mean")``, gradients made
  in the forward sweep (6NDV). ``one_pass_bn<K>``: the same with ``BlockSizes(block_n=K)``.
* ``two_pass``: ``impl="xla", reduction="none"``, summed / N: per-token losses, the backward
  recomputes the logits (8NDV).
* ``reference``: ``impl="reference"``, dense ``[N, V]`` logits (the library's oracle).
* ``optax``: ``optax.softmax_cross_entropy`` on dense float32 logits and ``optax.smooth_labels``.
* peers, when importable (``--peers``): ``tokamax`` (``tokamax.linear_softmax_cross_entropy_loss``,
  ``implementation="xla"``, reduction "mean"; weight passed as ``W.T``), ``jax_cce``
  (``jax_cce.linear_cross_entropy``, vocabulary chunks of 4096, custom VJP). Neither takes label
  smoothing: they run at ``--smoothing 0`` only.

Per arm: wall and CPU seconds of the compiled step (``resource.getrusage`` of the child, all its
threads; these machines are shared, so CPU seconds are the comparable figure), XLA's
temporaries (``memory_analysis().temp_size_in_bytes``: buffers beyond inputs and outputs),
the measured peak growth of resident memory while the step runs (outputs included; on GPU,
``peak_bytes_in_use``), and the error of loss, dhidden and dweight against a float64 NumPy oracle
computed in token chunks from the same (rounded) inputs: ``max|x - exact| / max|exact|``.

    python benchmarks/bench_loss_memory.py                              # N=8192 D=1024 V=65536
    python benchmarks/bench_loss_memory.py --n 512 --v 4096 --dtype bfloat16 --smoothing 0
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

LS_ARMS = ("one_pass", "two_pass", "reference", "optax")
PEERS = ("tokamax", "jax_cce")
SMOOTHING = set(LS_ARMS)  # arms that take label smoothing (the peers take none)


def inputs(n, d, v, dtype):
    """hidden [N, D], weight [V, D] in ``dtype`` and labels [N] int32; the same in every arm."""
    import jax

    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (n, d)).astype(dtype)
    w = (jax.random.normal(k[1], (v, d)) * d**-0.5).astype(dtype)
    y = jax.random.randint(k[2], (n,), 0, v)
    return h, w, y


def loss_fn(arm: str, smoothing: float):
    """(hidden [N, D], weight [V, D], labels [N]) -> mean loss, float32 scalar, for one arm."""
    import jax
    import jax.numpy as jnp
    import optax

    from ls_jax import linear_smoothed_cross_entropy
    from ls_jax.logit_stats import BlockSizes

    if arm not in SMOOTHING and not arm.startswith("one_pass_bn") and smoothing:
        raise ValueError(f"{arm} takes no label smoothing")
    if arm == "one_pass" or arm.startswith("one_pass_bn"):
        blocks = BlockSizes(block_n=int(arm[len("one_pass_bn") :])) if arm != "one_pass" else None
        return lambda h, w, y: linear_smoothed_cross_entropy(
            h, w, y, label_smoothing=smoothing, impl="xla", blocks=blocks
        )
    if arm == "two_pass":
        return lambda h, w, y: (
            linear_smoothed_cross_entropy(h, w, y, label_smoothing=smoothing, impl="xla", reduction="none").sum()
            / y.shape[0]
        )
    if arm == "reference":
        return lambda h, w, y: linear_smoothed_cross_entropy(h, w, y, label_smoothing=smoothing, impl="reference")
    if arm == "optax":

        def dense(h, w, y):
            logits = jnp.einsum("nd,vd->nv", h, w, preferred_element_type=jnp.float32)
            return optax.softmax_cross_entropy(
                logits, optax.smooth_labels(jax.nn.one_hot(y, w.shape[0]), smoothing)
            ).mean()

        return dense
    if arm == "tokamax":
        import tokamax

        return lambda h, w, y: tokamax.linear_softmax_cross_entropy_loss(
            h, y, w.T, reduction="mean", implementation="xla"
        )
    if arm == "jax_cce":
        import jax_cce

        return lambda h, w, y: jax_cce.linear_cross_entropy(h, w, y)
    raise ValueError(f"unknown arm {arm!r}")


class RssPeak:
    """Samples this process's resident memory (bytes) every millisecond while active."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak, self._stop = self.now(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_arm(args) -> dict:
    """In a child process: compile, memory plan, timed runs, peak memory; saves the outputs."""
    import jax
    import jax.numpy as jnp

    h, w, y = inputs(args.n, args.d, args.v, jnp.dtype(args.dtype))
    jax.block_until_ready((h, w, y))
    step = jax.jit(jax.value_and_grad(loss_fn(args.arm, args.smoothing), argnums=(0, 1)))
    compiled = step.lower(h, w, y).compile()
    plan = compiled.memory_analysis()
    temp = getattr(plan, "temp_size_in_bytes", None) if plan is not None else None
    device = jax.devices()[0]
    walls, cpus = [], []
    with RssPeak() as rss:
        before = rss.now()
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), cpu_seconds()
            loss, (dh, dw) = jax.block_until_ready(compiled(h, w, y))
            walls.append(time.perf_counter() - t0)
            cpus.append(cpu_seconds() - c0)
    peak = rss.peak - before if device.platform == "cpu" else device.memory_stats()["peak_bytes_in_use"]
    np.savez(args.out, loss=np.float32(loss), dh=np.asarray(dh, np.float32), dw=np.asarray(dw, np.float32))
    mid = len(walls) // 2
    return {
        "arm": args.arm,
        "wall_s": sorted(walls)[mid],
        "cpu_s": sorted(cpus)[mid],
        "temp_bytes": temp,
        "peak_bytes": peak,
        "device": f"{device.platform}: {device.device_kind}",
    }


def oracle(args, chunk: int = 256):
    """float64 (loss, dhidden [N, D], dweight [V, D]) of the mean smoothed loss of the arms' inputs.

    The unsmoothed part is computed in token chunks (cached in ``--oracle-cache`` per shape and
    dtype: it is the costly part); label smoothing a adds, exactly, ``a * mean_n(z_y - mean_v z)``
    to the loss and ``a / N * (onehot - 1 / V)`` to dlogits.
    """
    import jax.numpy as jnp

    h, w, y = inputs(args.n, args.d, args.v, jnp.dtype(args.dtype))
    h, w, y = (
        np.asarray(h.astype(jnp.float32), np.float64),
        np.asarray(w.astype(jnp.float32), np.float64),
        np.asarray(y),
    )
    n, v, a = args.n, args.v, args.smoothing
    cache = args.oracle_cache and os.path.join(args.oracle_cache, f"oracle_{n}_{args.d}_{v}_{args.dtype}.npz")
    if cache and os.path.exists(cache):
        base = np.load(cache)
        loss, dh, dw = float(base["loss"]), base["dh"], base["dw"]
    else:
        loss, dh, dw = 0.0, np.empty_like(h), np.zeros_like(w)
        for s in range(0, n, chunk):
            hc, yc = h[s : s + chunk], y[s : s + chunk]
            z = hc @ w.T
            m = z.max(1, keepdims=True)
            p = np.exp(z - m)
            se = p.sum(1, keepdims=True)
            rows = np.arange(len(yc))
            loss += ((m + np.log(se))[:, 0] - z[rows, yc]).sum() / n
            p /= se
            p[rows, yc] -= 1
            p /= n
            dh[s : s + chunk] = p @ w
            dw += p.T @ hc
        if cache:
            np.savez(cache, loss=loss, dh=dh, dw=dw)
    w_mean = w.mean(0)
    loss += a * np.mean(np.einsum("nd,nd->n", h, w[y]) - h @ w_mean)
    dh = dh + a / n * (w[y] - w_mean)
    h_by_class = np.zeros_like(w)
    np.add.at(h_by_class, y, h)
    dw = dw + a / n * (h_by_class - h.sum(0) / v)
    return loss, dh, dw


def rel_err(x, exact) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64) - exact)) / np.max(np.abs(exact)))


def available(arm: str) -> bool:
    import importlib.util

    return arm not in PEERS or importlib.util.find_spec(arm) is not None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--v", type=int, default=65536)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument(
        "--arms",
        default=",".join(LS_ARMS + PEERS),
        help="comma list of " + ",".join(LS_ARMS + PEERS) + ",one_pass_bn<K>",
    )
    p.add_argument(
        "--oracle-cache",
        default=None,
        help="folder to keep the float64 oracle's unsmoothed gradients in, reused by later runs",
    )
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm:
        sys.argv[1:] = []  # tokamax parses absl flags from the command line
        print(json.dumps(run_arm(args)))
        return
    if not 0 <= args.smoothing < 1 or min(args.n, args.d, args.v, args.repeats) < 1:
        print("error: need --smoothing in [0, 1) and positive --n --d --v --repeats", file=sys.stderr)
        sys.exit(2)
    arms, skipped = [], []
    for arm in args.arms.split(","):
        if arm not in LS_ARMS + PEERS and not (arm.startswith("one_pass_bn") and arm[11:].isdigit()):
            print(f"error: unknown arm {arm!r}", file=sys.stderr)
            sys.exit(2)
        if arm in PEERS and args.smoothing:
            skipped.append(f"{arm} (no label smoothing)")
        elif not available(arm):
            skipped.append(f"{arm} (not installed)")
        else:
            arms.append(arm)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:
            out = os.path.join(tmp, f"{arm}.npz")
            cmd = [sys.executable, __file__, "--arm", arm, "--out", out] + [
                f"--{k}={getattr(args, k)}" for k in ("n", "d", "v", "dtype", "smoothing", "repeats")
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{arm}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
                skipped.append(f"{arm} (failed)")
                continue
            rows.append(dict(json.loads(res.stdout.strip().splitlines()[-1]), out=out))
            print(f"# {arm}: done", file=sys.stderr, flush=True)
        if not rows:
            print("error: no arm ran", file=sys.stderr)
            sys.exit(1)
        c0 = cpu_seconds()
        exact = oracle(args)
        print(f"# float64 oracle: {cpu_seconds() - c0:.0f} CPU s", file=sys.stderr, flush=True)
        for r in rows:
            got = np.load(r.pop("out"))
            r["err"] = [rel_err(got[k], e) for k, e in zip(("loss", "dh", "dw"), exact)]
    print_table(args, rows, skipped)


def print_table(args, rows, skipped):
    """Markdown table of the rows, with ratios to optax and two_pass where those ran."""
    import jax

    print(
        f"device: {rows[0]['device']}   jax {jax.__version__}   N={args.n} D={args.d} V={args.v} {args.dtype} "
        f"label_smoothing={args.smoothing}   loss + grad(hidden, weight), median of {args.repeats}"
    )
    if skipped:
        print("not run: " + ", ".join(skipped))
    base = {b: next((r for r in rows if r["arm"] == b), None) for b in ("optax", "two_pass")}

    def ratio(r, key, b):
        return f"{r[key] / base[b][key]:.2f}" if base[b] and r[key] and base[b][key] else "-"

    print(
        "| arm | wall s | CPU s | CPU x optax | CPU x two_pass | XLA temp MiB | temp x optax | "
        "peak MiB | err loss | err dh | err dW |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        temp = "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        print(
            f"| {r['arm']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {ratio(r, 'cpu_s', 'optax')} | "
            f"{ratio(r, 'cpu_s', 'two_pass')} | {temp} | {ratio(r, 'temp_bytes', 'optax')} | "
            f"{r['peak_bytes'] / 2**20:.1f} | " + " | ".join(f"{e:.1e}" for e in r["err"]) + " |"
        )


if __name__ == "__main__":
    main()
