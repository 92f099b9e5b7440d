"""Registers, spills and shared memory of the kernels on sm_90, without a GPU.

Lowers ``impl="pallas"``'s forward and backward kernels for CUDA (as in tests/test_pallas.py),
keeps each kernel's Triton IR, and compiles it for sm_90 with the ``triton`` package of another
Python (a separate virtual environment: ``python -m venv /tmp/tv && /tmp/tv/bin/pip install
triton``), reading ``ptxas -v``. A different Triton than the one inside jaxlib/XLA compiles
here, so the figures are indicative; an H100 allows 227 KB of shared memory per program.

    python benchmarks/resource_report.py /tmp/tv/bin/python [N D V] [--dtype float32]
"""

import argparse
import os
import re
import subprocess
import tempfile

COMPILE = r"""
import glob, os, subprocess, sys, triton
from triton.backends.compiler import GPUTarget
ptxas = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas*"))[0]
for path, warps, stages in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    k = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": int(warps), "num_stages": int(stages)})
    open(path + ".ptx", "w").write(k.asm["ptx"])
    res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path + ".ptx", "-o", path + ".cubin"], capture_output=True, text=True)
    used = " ".join(l.split("info    :")[-1].strip() for l in res.stderr.splitlines() if "registers" in l or "spill" in l)
    mma = "wgmma" if "wgmma" in k.asm["ptx"] else ("mma" if "mma.sync" in k.asm["ptx"] else "no tensor cores")
    print(f"{os.path.basename(path)[:-5]:34s} warps={warps} stages={stages} smem={k.metadata.shared // 1024} KB {mma}; {used}")
"""


def dump_triton_ir(n, d, v, dtype, backward, bias, softcap, need_sum, out_dir):
    """Write each kernel's Triton IR to ``out_dir``; [(path, num_warps, num_stages)]."""
    from functools import partial

    import jax
    from jax._src.pallas.triton import pallas_call_registration as registration

    from ls_jax import BlockSizes
    from ls_jax.kernels import fused
    from ls_jax.logit_stats import Backend, two_pass

    found, lower = [], registration.lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = lower(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        path = os.path.join(out_dir, re.search(r"tt.func public @(\w+)", text).group(1) + ".ttir")
        with open(path, "w") as f:
            f.write(text)
        found.append(path)
        return result

    import jax.numpy as jnp

    stats = two_pass(Backend(partial(fused.forward, interpret=False), fused.backward_fn(backward, interpret=False)))

    def loss(h, w, b):
        ids, tw = jnp.zeros((h.shape[0], 1), jnp.int32), jnp.ones((h.shape[0], 1))
        s = stats(h, w, b, ids, tw, softcap=softcap, need_sum=need_sum, blocks=BlockSizes())
        return (s.lse + s.logit_sum - s.target).sum()

    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((v, d), dtype),
        jax.ShapeDtypeStruct((v,), dtype) if bias else None,
    )
    registration.lowering.lower_jaxpr_to_triton_module = keep
    try:
        lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    params = re.findall(r"num_stages = (\d+) : i32, num_warps = (\d+) : i32", lowered.as_text())
    return [(p, w, s) for p, (s, w) in zip(found, params)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("triton_python", help="a Python with the triton package installed")
    ap.add_argument("shape", nargs="*", type=int, default=[8192, 2304, 256000], help="N D V")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    n, d, v = args.shape
    with tempfile.TemporaryDirectory() as tmp:
        for backward in ("two_kernel", "atomic"):
            for bias, softcap, need_sum in ((False, None, False), (True, 30.0, True)):
                sub = os.path.join(tmp, f"{backward}-{int(bias)}")
                os.makedirs(sub)
                kernels = dump_triton_ir(n, d, v, args.dtype, backward, bias, softcap, need_sum, sub)
                print(f"{args.dtype} N={n} D={d} V={v} backward={backward} bias/softcap/need_sum={bias}")
                subprocess.run([args.triton_python, "-c", COMPILE, *[x for k in kernels for x in k]], check=True)


if __name__ == "__main__":
    main()
