"""Fused linear smoothed cross-entropy on one GPU: time and peak memory, pallas vs xla vs dense.

For each head shape (Gemma-2-2B: N=8192 D=2304 V=256000; Llama-3: N=8192 D=4096 V=128256),
bf16, label smoothing 0 and 0.1, and each ``impl`` of ``linear_smoothed_cross_entropy``
(pallas, xla, reference), it times forward, backward (applying a saved VJP) and forward +
backward (``value_and_grad`` in hidden and weight; the head ``[V, D]``, or ``[D, V]`` with
``--layout dv``), and records the peak device memory of the
process (``peak_bytes_in_use``). Each (shape, smoothing, impl) runs in its own subprocess, so
peaks do not mix and a case that runs out of memory does not stop the others. The floor is
``6 N D V`` FLOPs over the bf16 matmul rate measured in the same run. A correctness check
(pallas vs the dense reference, loss and gradients, a V that is not a multiple of the kernel's
blocks, the head in both layouts) runs first.

Timing: inputs are random (never zeros); each function is compiled and run twice before
timing, then called repeatedly with ``block_until_ready`` (one sync per call: microseconds
against tens of milliseconds) and the median is reported.

    python benchmarks/bench_gpu.py --out benchmarks/RESULTS.md     # on the GPU
    python benchmarks/bench_gpu.py --shapes gemma2-2b --out benchmarks/RESULTS.md   # in parts: rows
        # of earlier runs on the same device are kept (benchmarks/RESULTS.md.gpu.json)
    python benchmarks/bench_gpu.py --small                          # smoke test (CPU: interpreted kernel)
    python benchmarks/bench_gpu.py --impls pallas --blocks 64,256,64    # tune the kernel's blocks
    python benchmarks/bench_gpu.py --impls pallas,pallas_atomic,pallas_xla   # the three backwards
    python benchmarks/bench_gpu.py --impls pallas,xla --layout dv   # the head as [D, V] (nnx.Linear)
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

SHAPES = {"gemma2-2b": (8192, 2304, 256000), "llama3-8b": (8192, 4096, 128256)}
SMALL_SHAPES = {"small-a": (64, 64, 500), "small-b": (48, 32, 1000)}
IMPLS = ("pallas", "xla", "reference")
# also "pallas_atomic" / "pallas_xla": the pallas forward with the one-kernel atomic backward /
# with the xla backward (ls_jax/dispatch.py)
MARK_START, MARK_END = "<!-- bench_gpu:start -->", "<!-- bench_gpu:end -->"


def _median_ms(fn, *args, min_reps=5, budget_s=2.0):
    """Median wall time (ms) of ``fn(*args)`` after two warm-up calls, synced every call."""
    import time

    import jax

    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    while len(times) < min_reps or (sum(times) < budget_s * 1e3 and len(times) < 50):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _peak_bytes():
    import jax

    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _inputs(n, d, v, seed=0, layout="vd"):
    """hidden [n, d], the head [v, d] (or the same head as [d, v] for layout "dv"), labels [n]."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k[0], (n, d), jnp.bfloat16)
    w = jax.random.normal(k[1], (v, d), jnp.bfloat16) * jnp.bfloat16(d**-0.5)
    y = jax.random.randint(k[2], (n,), 0, v)
    return jax.block_until_ready((h, w if layout == "vd" else w.T, y))


def _loss_fn(impl, a, y, blocks, layout="vd"):
    from ls_jax import BlockSizes
    from ls_jax.losses import linear_smoothed_cross_entropy

    sizes = None if not impl.startswith("pallas") or blocks is None else BlockSizes(*blocks)
    return lambda h, w: linear_smoothed_cross_entropy(h, w, y, label_smoothing=a, impl=impl, blocks=sizes,
                                                      weight_layout=layout)


def child_case(n, d, v, a, impl, blocks, layout="vd"):
    """Times and peak memory of one case, as a dict."""
    import jax
    import jax.numpy as jnp

    h, w, y = _inputs(n, d, v, layout=layout)
    loss = _loss_fn(impl, a, y, blocks, layout)
    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    out = {"fwd_bwd_ms": _median_ms(both, h, w)}  # first, so the process peak is fwd+bwd's
    out["peak_bytes"] = _peak_bytes()
    out["input_bytes"] = h.nbytes + w.nbytes + y.nbytes
    fwd = jax.jit(loss)
    out["fwd_ms"] = _median_ms(fwd, h, w)
    _, vjp_fn = jax.jit(lambda h, w: jax.vjp(loss, h, w))(h, w)
    bwd = jax.jit(lambda f: f(jnp.ones((), jnp.float32)))
    out["bwd_ms"] = _median_ms(bwd, vjp_fn)
    out["grad_bytes"] = h.nbytes + w.nbytes
    return out


def child_matmul(m):
    """The device's name and its measured bf16 matmul rate (FLOP/s): m x m x m, bf16 output."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(1), 2)
    a = jax.random.normal(k[0], (m, m), jnp.bfloat16)
    b = jax.random.normal(k[1], (m, m), jnp.bfloat16)
    ms = _median_ms(jax.jit(jnp.dot), a, b)
    dev = jax.local_devices()[0]
    return {"rate": 2 * m**3 / (ms * 1e-3), "ms": ms,
            "device": f"{dev.device_kind} ({dev.platform}, jax {jax.__version__})"}


def child_check(n, d, v, blocks):
    """Relative errors of pallas vs the dense reference (loss, dhidden, dweight), smoothing 0.1,
    the head as [V, D] and as [D, V] (keys prefixed "dv ")."""
    import jax
    import jax.numpy as jnp

    h, w, y = _inputs(n, d, v, seed=5)
    rel = lambda x, r: float(jnp.linalg.norm((x - r).astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32)))
    run = lambda impl, layout, w: jax.jit(jax.value_and_grad(_loss_fn(impl, 0.1, y, blocks, layout),
                                                             argnums=(0, 1)))(h, w)
    lr, (hr, wr) = run("reference", "vd", w)
    out = {}
    for layout, weight in (("vd", w), ("dv", w.T)):
        lp, (hp, wp) = run("pallas", layout, weight)
        prefix = "" if layout == "vd" else "dv "
        out.update({prefix + "loss": rel(lp, lr), prefix + "dhidden": rel(hp, hr),
                    prefix + "dweight": rel(wp if layout == "vd" else wp.T, wr)})
    return out


def run_child(spec, timeout):
    """Run one measurement in a fresh process; its dict, or {"error": ...}."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}


def _fmt(x, scale=1.0, digits=1):
    return "-" if x is None else f"{x * scale:.{digits}f}"


def table(device, rate, check, rows):
    """Markdown: device, date, matmul rate, correctness, then one row per case."""
    gb = 1e-9
    lines = [f"Device: {device}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"measured bf16 matmul rate {_fmt(rate, 1e-12, 3)} TFLOP/s.", ""]
    if check:
        lines += [f"Correctness (pallas vs dense reference, relative L2 error, smoothing 0.1): {check}", ""]
    lines += ["| shape | a | impl | fwd ms | bwd ms | fwd+bwd ms | x floor | vs a=0 | peak GB | peak - inputs GB | dh+dW GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["shape"], r["a"], r["impl"]): r for r in rows}
    for r in rows:
        n, d, v = r["nd v"]
        floor_ms = 6 * n * d * v / rate * 1e3 if rate else None
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['a']} | {r['impl']} | {r['error']} |||||||||")
            continue
        zero = by_key.get((r["shape"], 0.0, r["impl"]), {})
        vs0 = r["fwd_bwd_ms"] / zero["fwd_bwd_ms"] if zero.get("fwd_bwd_ms") else None
        extra = None if r["peak_bytes"] is None else r["peak_bytes"] - (r["input_bytes"] or 0)
        lines.append(
            f"| {r['shape']} N={n} D={d} V={v} | {r['a']} | {r['impl']} | {_fmt(r['fwd_ms'])} | {_fmt(r['bwd_ms'])} "
            f"| {_fmt(r['fwd_bwd_ms'])} | {_fmt(floor_ms and r['fwd_bwd_ms'] / floor_ms, digits=2)} "
            f"| {_fmt(vs0, digits=3)} | {_fmt(r['peak_bytes'], gb, 2)} | {_fmt(extra, gb, 2)} "
            f"| {_fmt(r['grad_bytes'], gb, 2)} |")
    if rate:
        lines += ["", "Floor: 6 N D V FLOPs at the measured rate: "
                  + ", ".join(f"{k} {6 * n * d * v / rate * 1e3:.1f} ms" for k, (n, d, v) in
                              sorted({r["shape"]: r["nd v"] for r in rows}.items()))]
    return "\n".join(lines)


def write_results(path, text):
    """Replace this script's section of ``path`` (or append it), leaving the rest alone."""
    old = open(path).read() if os.path.exists(path) else ""
    section = f"{MARK_START}\n## GPU: fused linear cross-entropy (benchmarks/bench_gpu.py)\n\n{text}\n{MARK_END}\n"
    if MARK_START in old and MARK_END in old:
        new = old[: old.index(MARK_START)] + section + old[old.index(MARK_END) + len(MARK_END) + 1:]
    else:
        new = old + ("\n" if old else "") + section
    with open(path, "w") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test; on CPU pallas is interpreted)")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--shapes", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--smoothing", default="0,0.1")
    ap.add_argument("--blocks", default=None, help="pallas block_n,block_v,block_d (default: the kernel's)")
    ap.add_argument("--layout", default="vd", choices=("vd", "dv"), help="the head as [V, D] or [D, V]")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per case")
    ap.add_argument("--out", default=None, help="markdown file to write the table into (e.g. benchmarks/RESULTS.md)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.child)
        kind = spec.pop("kind")
        result = {"case": child_case, "matmul": child_matmul, "check": child_check}[kind](**spec)
        print("RESULT " + json.dumps(result), flush=True)
        return

    shapes = SMALL_SHAPES if args.small else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    blocks = None if args.blocks is None else [int(x) for x in args.blocks.split(",")]
    # The parent never touches the device (it would preallocate GPU memory): children do.
    mm = run_child({"kind": "matmul", "m": 256 if args.small else 8192}, args.timeout)
    rate, device = mm.get("rate"), mm.get("device", f"unknown ({mm.get('error')})")
    check = None
    if "pallas" in args.impls:
        check = run_child({"kind": "check", "n": 40 if args.small else 1024, "d": 64 if args.small else 2304,
                           "v": 1000 if args.small else 32064, "blocks": blocks}, args.timeout)
    print(f"{device}: bf16 matmul {_fmt(rate, 1e-12)} TFLOP/s; pallas vs reference: {check}", flush=True)
    rows = []
    for name, (n, d, v) in shapes.items():
        for a in (float(x) for x in args.smoothing.split(",")):
            for impl in args.impls.split(","):
                r = run_child({"kind": "case", "n": n, "d": d, "v": v, "a": a, "impl": impl, "blocks": blocks,
                               "layout": args.layout}, args.timeout)
                label = impl if args.layout == "vd" else f"{impl} [D, V]"
                rows.append({"shape": name, "nd v": (n, d, v), "a": a, "impl": label, **r})
                print(json.dumps(rows[-1]), flush=True)
    print(table(device, rate, check, rows))
    if args.out:
        rows = merged_rows(args.out, device, rows)
        write_results(args.out, table(device, rate, check, rows))


def merged_rows(out, device, rows):
    """This run's rows plus earlier runs' rows on the same device (kept in ``<out>.gpu.json``),
    so the table can be filled by several shorter runs; a new row replaces an old one."""
    path = out + ".gpu.json"
    old = json.load(open(path)) if os.path.exists(path) else {}
    keep = [r for r in old.get("rows", []) if old.get("device") == device]
    keys = {(r["shape"], r["a"], r["impl"]) for r in rows}
    rows = [r for r in keep if (r["shape"], r["a"], r["impl"]) not in keys] + rows
    with open(path, "w") as f:
        json.dump({"device": device, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
