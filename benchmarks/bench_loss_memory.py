"""Loss + gradient (hidden, weight) time and peak memory: blocked vs dense, side by side.

Compares ``linear_smoothed_cross_entropy(impl="xla")`` (and ``impl="pallas"`` on a GPU)
with the dense reference and with optax's dense smoothed loss, at one shape, in one run,
and prints a table of absolute figures and ratios to the dense reference, naming the device.

Memory per case: XLA's own buffer plan for the compiled step (temporaries, i.e. beyond the
inputs and outputs), and on CPU the measured peak growth of resident memory while the
compiled step runs (outputs included; sampled every ms; on GPU, peak_bytes_in_use). Every case runs in its own
subprocess so peaks do not mix.

    python benchmarks/bench_loss_memory.py                      # N=8192 D=1024 V=65536 fp32
    python benchmarks/bench_loss_memory.py --n 512 --v 4096     # quick
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def build_step(case: str, smoothing: float):
    """jit-ed (hidden, weight, labels) -> (loss, dhidden, dweight) for one case."""
    import jax
    import jax.numpy as jnp
    import optax

    from ls_jax import linear_smoothed_cross_entropy

    if case == "optax":
        def loss(h, w, y):
            logits = jnp.einsum("nd,vd->nv", h, w, preferred_element_type=jnp.float32)
            target = optax.smooth_labels(jax.nn.one_hot(y, w.shape[0]), smoothing)
            return optax.softmax_cross_entropy(logits, target).mean()
    else:
        def loss(h, w, y):
            return linear_smoothed_cross_entropy(h, w, y, label_smoothing=smoothing, impl=case)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


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


def run_case(args) -> dict:
    """Runs in a child process: compile, measure memory plan, time, measure peak."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype)
    k = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k[0], (args.n, args.d), dtype)
    w = (jax.random.normal(k[1], (args.v, args.d)) * args.d**-0.5).astype(dtype)
    y = jax.random.randint(k[2], (args.n,), 0, args.v)
    jax.block_until_ready((h, w, y))
    step = build_step(args.case, args.smoothing)
    compiled = step.lower(h, w, y).compile()
    plan = compiled.memory_analysis()
    temp = getattr(plan, "temp_size_in_bytes", None) if plan is not None else None
    device = jax.devices()[0]
    jax.block_until_ready(compiled(h, w, y))  # warm-up
    times = []
    with RssPeak() as rss:
        before = rss.now()
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(h, w, y))
            times.append(time.perf_counter() - t0)
            del out
    if device.platform == "cpu":
        peak = rss.peak - before
    else:
        peak = device.memory_stats()["peak_bytes_in_use"]
    return {"case": args.case, "time_s": sorted(times)[len(times) // 2], "temp_bytes": temp,
            "peak_bytes": peak, "device": f"{device.platform}: {device.device_kind}"}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--v", type=int, default=65536)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=None, help="comma list of xla,pallas,reference,optax")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    import jax

    gpu = jax.default_backend() == "gpu"
    cases = (args.cases or ("xla,pallas,reference,optax" if gpu else "xla,reference,optax")).split(",")
    rows = []
    for case in cases:
        cmd = [sys.executable, __file__, "--case", case] + [
            f"--{k}={getattr(args, k)}" for k in ("n", "d", "v", "dtype", "smoothing", "repeats")
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{case}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["case"] == "reference"), rows[0])
    gib = 2.0**30
    print(f"device: {rows[0]['device']}   N={args.n} D={args.d} V={args.v} {args.dtype} "
          f"label_smoothing={args.smoothing}   loss + grad(hidden, weight), median of {args.repeats}")
    print(f"dense [N, V] float32 logits alone: {args.n * args.v * 4 / gib:.2f} GiB")
    print(f"{'impl':<10} {'time s':>8} {'x ref':>6} {'XLA temp GiB':>13} {'x ref':>6} {'peak GiB':>9} {'x ref':>6}")
    for r in rows:
        temp = r["temp_bytes"]
        print(f"{r['case']:<10} {r['time_s']:8.3f} {r['time_s'] / base['time_s']:6.2f} "
              f"{temp / gib if temp is not None else float('nan'):13.3f} "
              f"{temp / base['temp_bytes'] if temp and base['temp_bytes'] else float('nan'):6.3f} "
              f"{r['peak_bytes'] / gib:9.3f} {r['peak_bytes'] / base['peak_bytes']:6.3f}")


if __name__ == "__main__":
    main()
