"""Cross entropy: fused kernels (mlx_megalodon/cross_entropy_kernels.py) vs the ops path.

    python benchmarks/cross_entropy_kernel.py [--out DIR] [--lanes 8,16,32]

GPU only (CUDA or Metal). mega200M's training loss: 32,768 tokens x a 32,000-entry vocabulary,
bfloat16 logits (2.1 GB), as in a 4K x 8 or 32K x 1 step. Both paths run under mx.compile; forward =
the per-token losses, fwd+bwd = mx.vjp of their mean in the logits (what the training step's loss
does). Reported: median ms per call and the bandwidth counting only the bytes the kernels must move
(forward: read the logits; fwd+bwd: read them twice, write the gradient), against the H200's ~4.3
TB/s copy ceiling; the kernel for each --lanes value (lanes per row). An agreement check (kernel vs
ops, loss and gradient) runs first. Well under a minute on an H200. Table on stdout, JSON in --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_megalodon import cross_entropy_kernels as XK  # noqa: E402
from mlx_megalodon import kernels as K  # noqa: E402
from benchmarks.timestep_norm_kernel import timeit  # noqa: E402  (median over rotating inputs)

COPY_CEILING_GBPS = 4300.0


def make_fns(path: str, compile_: bool):
    """(forward, fwd+bwd) of (logits, targets) for one path."""
    def loss(logits, targets):
        if path == "kernel":
            return XK.cross_entropy_kernel(logits, targets, validate=False)
        return XK.cross_entropy_ops(logits, targets)

    def fwd_bwd(logits, targets):
        return mx.vjp(lambda x: loss(x, targets).mean(), [logits], [mx.array(1.0)])

    wrap = mx.compile if compile_ else (lambda f: f)
    return wrap(loss), wrap(fwd_bwd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=32768, help="tokens")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--lanes", default=str(XK.GPU_LANES), help="comma list of lanes per row (powers of two <= 32)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    lane_values = [int(v) for v in a.lanes.split(",")]
    if any(v not in (1, 2, 4, 8, 16, 32) for v in lane_values):
        p.error(f"--lanes: powers of two up to 32, got {a.lanes}")
    if not XK._launcher.available():
        print("needs a GPU backend (CUDA or Metal)", file=sys.stderr)
        return 1
    dtype = getattr(mx, a.dtype)
    R, V = a.rows, a.vocab
    rng = np.random.default_rng(0)
    inputs = [(mx.array(rng.normal(size=(R, V)).astype(np.float32) * 3).astype(dtype),
               mx.array(rng.integers(0, V, R).astype(np.int32))) for _ in range(2)]
    mx.eval(inputs)
    elem = R * V * np.dtype(np.float32 if dtype == mx.float32 else np.float16).itemsize
    moved = {"fwd": elem, "fwd+bwd": 3 * elem}

    (k_fwd, k_bwd), (o_fwd, o_bwd) = make_fns("kernel", False), make_fns("ops", False)
    l_k, l_o = k_fwd(*inputs[0]), o_fwd(*inputs[0])
    g_k, g_o = k_bwd(*inputs[0])[1][0], o_bwd(*inputs[0])[1][0]
    diff = lambda a, b: float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())  # noqa: E731
    agreement = {"loss_max_abs": diff(l_k, l_o), "grad_max_abs": diff(g_k, g_o)}
    print(f"{R} x {V} {a.dtype} logits on {K.gpu_backend()}; kernel vs ops: max |loss diff| "
          f"{agreement['loss_max_abs']:.2g}, max |grad diff| {agreement['grad_max_abs']:.2g}")

    rows = []
    for what, index in (("fwd", 0), ("fwd+bwd", 1)):
        ops_s = timeit(make_fns("ops", not a.no_compile)[index], inputs)
        for lanes in lane_values:
            XK.GPU_LANES = lanes
            s = timeit(make_fns("kernel", not a.no_compile)[index], inputs)
            rows.append(dict(what=what, lanes=lanes, ops_ms=ops_s * 1e3, kernel_ms=s * 1e3, speedup=ops_s / s,
                             kernel_gbps=moved[what] / s / 1e9))
    print("| pass | lanes | ops ms | kernel ms | speedup | kernel GB/s | % of copy roof |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['lanes']} | {r['ops_ms']:.3f} | {r['kernel_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{r['kernel_gbps']:.0f} | {100 * r['kernel_gbps'] / COPY_CEILING_GBPS:.1f}% |")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cross_entropy_kernel.json").write_text(json.dumps(
            dict(rows=R, vocab=V, dtype=a.dtype, backend=K.gpu_backend(), agreement=agreement, results=rows),
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
