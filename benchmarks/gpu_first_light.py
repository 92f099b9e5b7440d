"""First light on a GPU: correctness and timings of every ls_jax path beside Apple's CCE and Liger.

One command for a short GPU lease (run from a plain checkout, nothing installed but the image's
jax / torch / triton; peer wheels carried in ``.whl/`` are installed into a temporary folder):

    python benchmarks/gpu_first_light.py --out-dir $OUT          # on the GPU (about 6 minutes)
    python benchmarks/gpu_first_light.py --smoke --out-dir /tmp/fl  # CPU: tiny shapes, interpret mode

Steps, each case in its own subprocess (peak memory per case; a crash or timeout is reported and
the rest goes on), in this order:

(a) correctness of xla (both precisions), pallas, pallas_two_kernel, pallas_atomic (and pallas with the
    head as [D, V]) against the dense reference of the upcast inputs at a ragged V (N=1024,
    D=2304, V=32064; bf16 and fp32; a = 0.1, 10% masked tokens, softcap 30): relative L2 errors of
    the loss, dhidden and dweight, and for bf16 their ratio to the error of the bf16 rounding of
    the reference ("x bf16").
(b) fwd, bwd and fwd+bwd time and peak memory at the Llama-3 head (N=8192, D=4096, V=128256,
    bf16, a = 0 and 0.1) for xla (precision "input", the GPU default), xla ("float32"), pallas,
    pallas_two_kernel, pallas_atomic, the dense reference; the one-pass tile budget swept; the quack
    shape (N=4096); the 6NDV floor from a bf16 matmul timed in the same run.
(c) Apple's cut-cross-entropy (its default gradient filter, and none; no label smoothing) and
    Liger's fused linear cross-entropy (a = 0 and 0.1) on the same shapes, in PyTorch.
(d) benchmarks/RESULTS.md's GPU section written from what ran (``--results``), and everything
    kept under ``--out-dir``: first_light.json, children.log (every child's stderr).
(e) a probe for the models' attention: jax.nn.dot_product_attention, cuDNN vs XLA, at T=4096.

Kernel warps / stages can be overridden without an edit: LS_JAX_NUM_WARPS, LS_JAX_NUM_STAGES
(kernels/tiles.py). Timing: random inputs (never zeros), two warm-up calls, then the median of
repeated calls each synchronised (tens of ms against microseconds of overhead).
"""

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # a plain checkout: ls_jax (and ls_jax.kernels) importable without an install
    sys.path.insert(0, ROOT)
MARK_START, MARK_END = "<!-- gpu_first_light:start -->", "<!-- gpu_first_light:end -->"
LLAMA, QUACK = (8192, 4096, 128256), (4096, 4096, 128256)
CHECK = (1024, 2304, 32064)
SMOKE = {"check": (40, 64, 1000), "llama": (64, 64, 500), "quack": (48, 32, 1000), "attention": (1, 256, 4, 2, 32)}
ATTENTION = (1, 4096, 32, 8, 128)  # batch, T, query heads, KV heads, head dim (a Llama-3-8B layer)
IGNORE = -100


# ---------------------------------------------------------------- children (one case a process)


def _median_ms(fn, *args, budget_s=1.0, min_reps=5, max_reps=30, sync=None):
    """Median wall ms of ``fn(*args)`` after two warm-up calls; ``sync(out)`` waits for the device."""
    if sync is None:
        import jax

        sync = jax.block_until_ready
    for _ in range(2):
        sync(fn(*args))
    times = []
    while len(times) < min_reps or (sum(times) < budget_s * 1e3 and len(times) < max_reps):
        t0 = time.perf_counter()
        sync(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _jax_inputs(n, d, v, dtype="bfloat16", seed=0, masked=0.0, layout="vd"):
    """hidden [n, d] (std 1), the head [v, d] (or [d, v]) scaled by d^-1/2, labels [n] with a
    fraction ``masked`` ignored."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (v, d), jnp.float32) * d**-0.5).astype(dtype)
    y = jax.random.randint(k[2], (n,), 0, v)
    y = jnp.where(jax.random.uniform(k[3], (n,)) < masked, IGNORE, y)
    return jax.block_until_ready((h, w if layout == "vd" else w.T, y))


def _blocks(precision=None, tile_bytes=None):
    from ls_jax import BlockSizes

    return BlockSizes(precision=precision, tile_bytes=tile_bytes)


def child_device():
    """The device and the versions of what runs on it."""
    import jax

    out = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    import jaxlib

    out["jaxlib"] = jaxlib.__version__
    for mod, dist in (
        ("torch", "torch"),
        ("triton", "triton"),
        ("cut_cross_entropy", "cut-cross-entropy"),
        ("liger_kernel", "liger-kernel"),
    ):
        try:
            __import__(mod)
            out[mod] = importlib.metadata.version(dist)
        except Exception as e:  # reported, not fatal: a missing peer skips its arm
            out[mod] = f"missing ({type(e).__name__})"
    return out


def child_matmul(m):
    """The measured bf16 matmul rate (FLOP/s) of an m x m x m product."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(1), 2)
    a = jax.random.normal(k[0], (m, m), jnp.bfloat16)
    b = jax.random.normal(k[1], (m, m), jnp.bfloat16)
    rates = {
        "jax bf16": _median_ms(jax.jit(jnp.dot), a, b),
        "jax f32 out": _median_ms(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)), a, b),
    }
    try:
        import torch

        ta, tb = (torch.randn(m, m, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        rates["torch bf16"] = _median_ms(torch.matmul, ta, tb, sync=lambda _: torch.cuda.synchronize())
    except Exception as e:  # no CUDA torch (CPU smoke): the JAX rates alone
        rates["torch"] = f"{type(e).__name__}"
    out = {k: 2 * m**3 / (ms * 1e-3) for k, ms in rates.items() if isinstance(ms, float)}
    return {"rate": max(out.values()), "rates": out}


def child_check(n, d, v, dtype):
    """Relative L2 errors against the dense reference of the upcast inputs (float32, HIGHEST)."""
    import jax
    import jax.numpy as jnp

    from ls_jax.losses import linear_smoothed_cross_entropy, smoothed_cross_entropy

    h, w, y = _jax_inputs(n, d, v, dtype, seed=5, masked=0.1)

    def run(impl, layout, h, w, precision=None):
        f = lambda h, w: linear_smoothed_cross_entropy(
            h, w, y, label_smoothing=0.1, logit_softcap=30.0, impl=impl, blocks=_blocks(precision), weight_layout=layout
        )
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)

    def dense(h, w):  # the oracle: float32 logits at HIGHEST precision, the loss on materialised logits
        z = jnp.dot(h, w.T, precision=jax.lax.Precision.HIGHEST)
        return smoothed_cross_entropy(z, y, label_smoothing=0.1, logit_softcap=30.0, reduction="mean")

    ref_loss, (ref_h, ref_w) = jax.jit(jax.value_and_grad(dense, argnums=(0, 1)))(
        h.astype(jnp.float32), w.astype(jnp.float32)
    )
    rel = lambda x, r: float(jnp.linalg.norm(x.astype(jnp.float32) - r) / jnp.linalg.norm(r))
    floor = {"dhidden": rel(ref_h.astype(dtype), ref_h), "dweight": rel(ref_w.astype(dtype), ref_w)}
    out = {}
    arms = [
        ("xla", "vd", "input"),
        ("xla", "vd", "float32"),
        ("pallas", "vd", None),
        ("pallas", "dv", None),
        ("pallas_two_kernel", "vd", None),
        ("pallas_atomic", "vd", None),
    ]
    for impl, layout, precision in arms:
        name = impl + (f" [{precision}]" if precision else "") + (" [D, V]" if layout == "dv" else "")
        try:
            loss, (gh, gw) = run(impl, layout, h, w if layout == "vd" else w.T, precision)
            gw = gw if layout == "vd" else gw.T
            row = {
                "loss": rel(loss, ref_loss),
                "dhidden": rel(gh, ref_h),
                "dweight": rel(gw, ref_w),
                "finite": bool(jnp.isfinite(loss) & jnp.isfinite(gh).all() & jnp.isfinite(gw).all()),
            }
            if dtype == "bfloat16":
                row.update({f"x bf16 {k}": row[k] / floor[k] for k in floor})
        except Exception as e:  # one failing path is a finding, the others still run
            row = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        out[name] = row
    return out


def child_case(n, d, v, a, impl, precision=None, tile_bytes=None):
    """fwd, bwd (a saved VJP applied), fwd+bwd (value_and_grad in hidden and head) ms, peak bytes."""
    import jax
    import jax.numpy as jnp

    from ls_jax.losses import linear_smoothed_cross_entropy

    h, w, y = _jax_inputs(n, d, v)
    loss = lambda h, w: linear_smoothed_cross_entropy(
        h, w, y, label_smoothing=a, impl=impl, blocks=_blocks(precision, tile_bytes)
    )
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(h, w).compile()
    mem = step.memory_analysis()
    out = {
        "fwd_bwd_ms": _median_ms(step, h, w),
        "temp_bytes": mem.temp_size_in_bytes,
        "output_bytes": mem.output_size_in_bytes,
    }
    stats = jax.local_devices()[0].memory_stats() or {}
    out["peak_bytes"] = stats.get("peak_bytes_in_use")  # fwd+bwd first: the process peak is its
    out["input_bytes"] = h.nbytes + w.nbytes + y.nbytes
    out["fwd_ms"] = _median_ms(jax.jit(loss), h, w)
    _, vjp = jax.jit(lambda h, w: jax.vjp(loss, h, w))(h, w)
    out["bwd_ms"] = _median_ms(jax.jit(lambda f: f(jnp.ones((), jnp.float32))), vjp)
    return out


def child_peer(n, d, v, a, peer, filter_eps="high"):
    """The same measurements for a PyTorch peer: "cce" (cut-cross-entropy, a = 0 only) or "liger"."""
    import torch

    torch.manual_seed(0)
    dev = "cuda"
    h = torch.randn(n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device=dev, dtype=torch.float32) * d**-0.5).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, v, (n,), device=dev)
    if peer == "cce":
        from cut_cross_entropy import linear_cross_entropy

        loss = lambda: linear_cross_entropy(h, w, y, filter_eps=filter_eps)
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        f = LigerFusedLinearCrossEntropyLoss(label_smoothing=a)
        loss = lambda: f(w, h, y)
    sync = lambda _: torch.cuda.synchronize()

    def both():
        h.grad = w.grad = None
        loss().backward()

    out = {"input_bytes": (h.numel() + w.numel()) * 2 + y.numel() * 8}
    torch.cuda.reset_peak_memory_stats()
    out["fwd_bwd_ms"] = _median_ms(both, sync=sync)
    out["peak_bytes"] = torch.cuda.max_memory_allocated()
    out["fwd_ms"] = _median_ms(loss, sync=sync)
    times = []
    for _ in range(7):  # the backward alone: a fresh forward each time, its time left out
        h.grad = w.grad = None
        l = loss()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        l.backward()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    out["bwd_ms"] = sorted(times[2:])[len(times[2:]) // 2]
    return out


def child_attention(b, t, hq, hkv, hd, smoke=False):
    """jax.nn.dot_product_attention fwd+bwd (causal, GQA, bf16) by cuDNN and by XLA: ms, compiled
    temporaries, and which options cuDNN takes (padding lengths, a sliding window)."""
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(k[0], (b, t, hq, hd), jnp.bfloat16)
    kk = jax.random.normal(k[1], (b, t, hkv, hd), jnp.bfloat16)
    vv = jax.random.normal(k[2], (b, t, hkv, hd), jnp.bfloat16)
    lengths = jnp.full((b,), t - 7, jnp.int32)
    variants = {
        "causal": {},
        "causal+lengths": dict(query_seq_lengths=lengths, key_value_seq_lengths=lengths),
        "causal+window": dict(local_window_size=(t // 4, 0)),
    }
    out = {}
    for implementation in ("xla",) if smoke else ("cudnn", "xla"):
        for name, kw in variants.items():
            f = lambda q, k, v: (
                jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation, **kw)
                .astype(jnp.float32)
                .sum()
            )
            step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
            try:
                compiled = step.lower(q, kk, vv).compile()
                out[f"{implementation} {name}"] = {
                    "fwd_bwd_ms": _median_ms(step, q, kk, vv),
                    "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
                }
            except Exception as e:
                out[f"{implementation} {name}"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


CHILDREN = {
    "device": child_device,
    "matmul": child_matmul,
    "check": child_check,
    "case": child_case,
    "peer": child_peer,
    "attention": child_attention,
}


# ---------------------------------------------------------------- the parent (never touches the device)


class Runner:
    """Runs children one at a time within an overall budget; appends their stderr to one log."""

    def __init__(self, out_dir, budget_s, env):
        self.log, self.deadline, self.env = os.path.join(out_dir, "children.log"), time.time() + budget_s, env

    def __call__(self, spec, timeout):
        left = self.deadline - time.time()
        if left < 10:
            return {"error": "skipped: out of the run's time budget"}
        cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(timeout, left), env=self.env)
            stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout, stderr, code = (
                "",
                (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""),
                None,
            )
        with open(self.log, "a") as f:
            f.write(f"\n===== {json.dumps(spec)} ({time.time() - t0:.1f} s, exit {code})\n{stderr}")
        for line in reversed(stdout.splitlines()):
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        if code is None:
            return {"error": f"timeout after {min(timeout, left):.0f} s"}
        tail = [l for l in stderr.strip().splitlines() if l.strip()][-1:] or ["no output"]
        return {"error": f"exit {code}: {tail[0][:300]}"}


def install_peers(out_dir):
    """pip-installs the wheels in .whl/ (if any) into a folder under ``out_dir``'s temp sibling;
    returns that folder or None."""
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if not wheels:
        return None
    target = tempfile.mkdtemp(prefix="ls_jax_peers_")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--target",
            target,
            *wheels,
        ],
        capture_output=True,
        text=True,
    )
    print(
        f"peer wheels: {', '.join(os.path.basename(w) for w in wheels)} -> exit {proc.returncode} "
        f"{proc.stderr.strip()[-300:]}",
        flush=True,
    )
    return target if proc.returncode == 0 else None


def plan(smoke, tiles=(1024, 4096, 8192)):
    """The ordered list of (group, shape, label, spec, timeout): most important first. Groups (for
    ``--only``): check, llama, peers, quack, tiles, extra, attention."""
    llama, quack = (SMOKE["llama"], SMOKE["quack"]) if smoke else (LLAMA, QUACK)
    n, d, v = SMOKE["check"] if smoke else CHECK
    steps = [
        ("check", "check", dtype, {"kind": "check", "n": n, "d": d, "v": v, "dtype": dtype}, 240)
        for dtype in ("bfloat16", "float32")
    ]
    case = lambda shape, a, impl, **kw: {
        "kind": "case",
        "n": shape[0],
        "d": shape[1],
        "v": shape[2],
        "a": a,
        "impl": impl,
        **kw,
    }
    peer = lambda shape, a, name, **kw: {
        "kind": "peer",
        "n": shape[0],
        "d": shape[1],
        "v": shape[2],
        "a": a,
        "peer": name,
        **kw,
    }
    for impl, a in (("xla", 0.0), ("xla", 0.1), ("pallas", 0.0), ("pallas", 0.1), ("reference", 0.0)):
        steps.append(("llama", "llama", impl, case(llama, a, impl), 120))
    if not smoke:  # PyTorch peers need CUDA
        steps += [
            ("peers", "llama", "cce", peer(llama, 0.0, "cce"), 120),
            ("peers", "llama", "cce [no filter]", peer(llama, 0.0, "cce", filter_eps=None), 120),
            ("peers", "llama", "liger", peer(llama, 0.0, "liger"), 120),
            ("peers", "llama", "liger", peer(llama, 0.1, "liger"), 120),
        ]
    steps += [
        ("llama", "llama", "pallas_two_kernel", case(llama, 0.0, "pallas_two_kernel"), 120),
        ("llama", "llama", "xla [float32]", case(llama, 0.0, "xla", precision="float32"), 120),
    ]
    steps += [("quack", "quack", "xla", case(quack, a, "xla"), 90) for a in (0.0, 0.1)]
    if not smoke:
        steps += [
            ("peers", "quack", "cce", peer(quack, 0.0, "cce"), 90),
            ("peers", "quack", "liger", peer(quack, 0.0, "liger"), 90),
            ("peers", "quack", "liger", peer(quack, 0.1, "liger"), 90),
        ]
    for name, shape in (("llama", llama), ("quack", quack)):  # the one-pass chunk (tokens) via its byte budget
        steps += [
            ("tiles", name, f"xla [tile {bn}]", case(shape, 0.0, "xla", tile_bytes=4 * bn * shape[2]), 90)
            for bn in tiles
            if bn <= shape[0]
        ]
    steps += [
        ("extra", "llama", "pallas_atomic", case(llama, 0.0, "pallas_atomic"), 120),
        ("extra", "llama", "reference", case(llama, 0.1, "reference"), 120),
    ]
    b, t, hq, hkv, hd = SMOKE["attention"] if smoke else ATTENTION
    steps.append(
        (
            "attention",
            "attention",
            "dot_product_attention",
            {"kind": "attention", "b": b, "t": t, "hq": hq, "hkv": hkv, "hd": hd, "smoke": smoke},
            150,
        )
    )
    return steps


def _arm_label(impl, precision=None, tile_bytes=None):
    return impl + (f" [{precision}]" if precision else "")


def _f(x, scale=1.0, digits=1):
    return "-" if x is None else f"{x * scale:.{digits}f}"


def report(run):
    """Markdown of a run (the dict saved as first_light.json)."""
    dev, rate = run["device"], run.get("matmul", {}).get("rate")
    lines = [
        f"{run['date']}; {dev.get('device')} ({dev.get('platform')}); jax {dev.get('jax')} (jaxlib "
        f"{dev.get('jaxlib')}), Python {dev.get('python')}, torch {dev.get('torch')}, triton "
        f"{dev.get('triton')}, cut-cross-entropy {dev.get('cut_cross_entropy')}, liger-kernel "
        f"{dev.get('liger_kernel')}. Command: `{run['command']}`; {run['wall_s']:.0f} s in all.",
        "",
        "Measured bf16 matmul rate (8192^3, the best of "
        + ", ".join(f"{k} {v * 1e-12:.0f}" for k, v in run.get("matmul", {}).get("rates", {}).items())
        + f" TFLOP/s): {_f(rate, 1e-12)} TFLOP/s; the floor is 6NDV FLOPs at that rate.",
        "",
    ]
    for dtype, res in run["check"].items():
        lines += [
            f"Correctness, {dtype}, N x D x V = {' x '.join(map(str, run['check_shape']))}, a = 0.1, 10% "
            "masked, softcap 30; relative L2 error against the dense reference of the upcast inputs"
            + (" (x bf16: over the error of the reference rounded to bf16)" if dtype == "bfloat16" else "")
            + ":",
            "",
            "| impl | loss | dhidden | dweight | x bf16 dh | x bf16 dW |",
            "|---|---|---|---|---|---|",
        ]
        if "error" in res:
            lines.append(f"| all | {res['error']} |||||")
        for name, r in res.items() if "error" not in res else ():
            if "error" in r:
                lines.append(f"| {name} | {r['error']} |||||")
                continue
            lines.append(
                f"| {name} | {r['loss']:.1e} | {r['dhidden']:.1e} | {r['dweight']:.1e} | "
                f"{_f(r.get('x bf16 dhidden'), digits=2)} | {_f(r.get('x bf16 dweight'), digits=2)} |"
            )
        lines.append("")
    lines += [
        "| shape | a | arm | fwd ms | bwd ms | fwd+bwd ms | x floor | vs a=0 | peak GB | peak - inputs GB | "
        "XLA temp GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = run["rows"]
    zero = {(r["shape"], r["arm"]): r for r in rows if r["a"] == 0.0 and "fwd_bwd_ms" in r}
    for r in rows:
        n, d, v = r["ndv"]
        shape = f"{r['shape']} {n}x{d}x{v}"
        if "error" in r:
            lines.append(f"| {shape} | {r['a']} | {r['arm']} | {r['error']} ||||||||")
            continue
        floor = 6 * n * d * v / rate * 1e3 if rate else None
        z = zero.get((r["shape"], r["arm"]))
        extra = None if r.get("peak_bytes") is None else r["peak_bytes"] - r["input_bytes"]
        lines.append(
            f"| {shape} | {r['a']} | {r['arm']} | {_f(r['fwd_ms'])} | {_f(r['bwd_ms'])} | "
            f"{_f(r['fwd_bwd_ms'])} | {_f(floor and r['fwd_bwd_ms'] / floor, digits=2)} | "
            f"{_f(z and r['fwd_bwd_ms'] / z['fwd_bwd_ms'], digits=3)} | {_f(r.get('peak_bytes'), 1e-9, 2)} | "
            f"{_f(extra, 1e-9, 2)} | {_f(r.get('temp_bytes'), 1e-9, 2)} |"
        )
    if rate:
        lines += [
            "",
            "Floors: "
            + ", ".join(
                f"{k} {6 * n * d * v / rate * 1e3:.1f} ms"
                for k, (n, d, v) in sorted({r["shape"]: r["ndv"] for r in rows}.items())
            ),
        ]
    att = run.get("attention", {})
    if "error" in att:
        lines += ["", f"Attention probe: {att['error']}"]
    elif att:
        lines += [
            "",
            f"Attention probe (jax.nn.dot_product_attention, causal, GQA, bf16, B x T x Hq x Hkv x hd = "
            f"{' x '.join(map(str, run['attention_shape']))}, fwd+bwd):",
            "",
            "| implementation, options | fwd+bwd ms | temporaries GB |",
            "|---|---|---|",
        ]
        for name, r in att.items():
            lines.append(
                f"| {name} | {r['error']} |  |"
                if "error" in r
                else f"| {name} | {_f(r['fwd_bwd_ms'], digits=2)} | {_f(r['temp_bytes'], 1e-9, 3)} |"
            )
    return "\n".join(lines)


def write_results(path, text):
    """Replace this script's section of ``path`` (or append it), leaving the rest alone."""
    old = open(path).read() if os.path.exists(path) else ""
    section = f"{MARK_START}\n## GPU: first light (benchmarks/gpu_first_light.py)\n\n{text}\n{MARK_END}\n"
    if MARK_START in old and MARK_END in old:
        new = old[: old.index(MARK_START)] + section + old[old.index(MARK_END) + len(MARK_END) + 1 :]
    else:
        new = old + ("\n" if old else "") + section
    with open(path, "w") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", help="folder for first_light.json, children.log, RESULTS.md")
    ap.add_argument(
        "--results",
        default=None,
        help="markdown file whose GPU section to rewrite (a copy of it is also written to --out-dir)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any backend; peers skipped")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run; later steps are skipped")
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated groups to run (check, llama, peers, quack, tiles, extra, attention); default: all",
    )
    ap.add_argument("--tiles", default="1024,4096,8192", help="one-pass chunks (tokens) of the tile sweep")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(CHILDREN[spec.pop("kind")](**spec)), flush=True)
        return
    if not args.out_dir:
        ap.error("--out-dir is required")

    t0 = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    peers = None if args.smoke else install_peers(args.out_dir)
    env = dict(
        os.environ,
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, (ROOT, peers, os.environ.get("PYTHONPATH")))),
    )
    runner = Runner(args.out_dir, args.budget, env)
    run = {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "command": " ".join(["python", "benchmarks/gpu_first_light.py"] + sys.argv[1:]),
        "device": runner({"kind": "device"}, 120),
        "check": {},
        "rows": [],
        "attention": {},
        "check_shape": SMOKE["check"] if args.smoke else CHECK,
        "attention_shape": SMOKE["attention"] if args.smoke else ATTENTION,
    }
    print(json.dumps(run["device"]), flush=True)
    if shutil.which("nvidia-smi"):
        print(
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm", "--format=csv"],
                capture_output=True,
                text=True,
            ).stdout,
            flush=True,
        )
    run["matmul"] = runner({"kind": "matmul", "m": 256 if args.smoke else 8192}, 120)
    print(f"matmul: {run['matmul']}", flush=True)
    only = None if args.only is None else set(args.only.split(","))
    tiles = tuple(int(x) for x in args.tiles.split(","))
    for group, shape, label, spec, timeout in plan(args.smoke, tiles):
        if only is not None and group not in only:
            continue
        result = runner(dict(spec), timeout)
        if group == "check":
            run["check"][label] = result
        elif group == "attention":
            run["attention"] = result
        else:
            run["rows"].append(
                {"shape": shape, "ndv": (spec["n"], spec["d"], spec["v"]), "a": spec["a"], "arm": label, **result}
            )
        print(f"[{time.time() - t0:5.0f} s] {group} {label} {json.dumps(spec)}: {json.dumps(result)}", flush=True)
    run["wall_s"] = time.time() - t0
    with open(os.path.join(args.out_dir, "first_light.json"), "w") as f:
        json.dump(run, f, indent=1)
    text = report(run)
    print(text)
    copy = os.path.join(args.out_dir, "RESULTS.md")
    write_results(args.results or copy, text)
    if args.results:
        shutil.copyfile(args.results, copy)


if __name__ == "__main__":
    main()
