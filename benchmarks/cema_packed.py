"""Packed rows (document resets) through the CEMA scan: the kernel's RESET = 1 variant against the
same kernel without resets (RESET = 0, what unpacked rows run) and against cema_segmented (the
pure-ops path packed rows took before). Forward and forward + backward, median milliseconds.

    python benchmarks/cema_packed.py [--quick] [--out results.json]

Needs a GPU backend (CUDA or Metal). Documents: geometric lengths with mean --mean-doc tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from kernels import coeffs, inputs_for, timeit  # noqa: E402  (benchmarks/kernels.py)
from mlx_megalodon import kernels as K  # noqa: E402
from mlx_megalodon.complex_exponential_moving_average import CEMACoefficients, cema_segmented  # noqa: E402


def doc_starts(B: int, L: int, mean: int, seed: int = 0) -> mx.array:
    """B x L int32 document starts; document lengths geometric with mean `mean`."""
    rng = np.random.default_rng(seed)
    t = np.arange(L)
    rows = []
    for _ in range(B):
        is_start = np.zeros(L, bool)
        firsts = np.cumsum(rng.geometric(1.0 / mean, size=L // mean * 4 + 8))
        is_start[0] = True
        is_start[firsts[firsts < L]] = True
        rows.append(np.maximum.accumulate(np.where(is_start, t, 0)))
    a = mx.array(np.stack(rows).astype(np.int32))
    mx.eval(a)
    return a


def measure(B: int, L: int, D: int, mean_doc: int) -> dict:
    c = coeffs(D)
    xs = [x.reshape(B, L, D) for x in inputs_for(D, L * B, 3)]
    starts = doc_starts(B, L, mean_doc)
    variants = {
        "kernel_no_reset": lambda x, cs: K.cema_kernel_scan(x, CEMACoefficients(*cs))[0],
        "kernel_reset": lambda x, cs: K.cema_kernel_scan(x, CEMACoefficients(*cs), doc_starts=starts)[0],
        "cema_segmented": lambda x, cs: cema_segmented(x, CEMACoefficients(*cs), starts),
    }
    row = {"B": B, "L": L, "D": D, "mean_doc": mean_doc}
    for name, fn in variants.items():
        row[f"{name}_fwd_ms"] = timeit(lambda x, fn=fn: fn(x, list(c)), xs) * 1e3
        g = mx.grad(lambda x, cs, fn=fn: (fn(x, cs) ** 2).sum(), argnums=(0, 1))
        row[f"{name}_fwd_bwd_ms"] = timeit(lambda x, g=g: g(x, list(c)), xs, max_reps=10) * 1e3
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mean-doc", type=int, default=500)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if K.gpu_backend() is None:
        sys.exit("needs a GPU backend (CUDA or Metal)")
    shapes = [(4, 4096, 1024)] if args.quick else [(4, 4096, 1024), (1, 32768, 1024), (8, 2048, 2048)]
    rows = []
    for B, L, D in shapes:
        row = measure(B, L, D, args.mean_doc)
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"backend": K.gpu_backend(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
