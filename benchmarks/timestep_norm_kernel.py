"""TimestepNorm: fused kernels (mlx_megalodon/timestep_norm_kernels.py) vs the ops path.

    python benchmarks/timestep_norm_kernel.py [--out DIR] [--sweep] [--quick]

GPU only (CUDA or Metal). mega200M's norm (D 1024, G 32), bfloat16 x, prior state, at B x L =
8 x 4096 and 1 x 32768, without and with document resets (packed rows of geometric document
lengths, mean 1024). Both paths run under mx.compile; forward = y only, fwd+bwd = mx.vjp of y in
(x, weight, bias) with a random cotangent. Reported: median ms per call and the bandwidth counting
only the bytes the op must move (forward: read x, write y; fwd+bwd: those plus read x and gy, write
gx), against the H200's ~4.3 TB/s copy ceiling. A bf16 agreement check (kernel vs ops, y and gx)
runs first. --sweep: lanes per group x chunk length for the kernel's fwd+bwd at both shapes.
Runs in well under a minute on an H200. Results: a table on stdout, JSON in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_megalodon import kernels as K  # noqa: E402
from mlx_megalodon import timestep_norm_kernels as TK  # noqa: E402
from mlx_megalodon.timestep_norm import TimestepNormState, timestep_norm  # noqa: E402

D, G, EPS = 1024, 32, 1e-5
COPY_CEILING_GBPS = 4300.0
SHAPES = [(8, 4096), (1, 32768)]
T0 = time.time()


def timeit(fn, inputs, min_time=0.3, max_reps=40):
    """Median seconds per call, calls rotating over distinct inputs (so L2 holds none of them)."""
    mx.eval(fn(*inputs[0]))                                     # compile, allocate
    mx.eval(fn(*inputs[1 % len(inputs)]))
    t = time.perf_counter()
    mx.eval(fn(*inputs[0]))
    one = time.perf_counter() - t
    reps = max(5, min(max_reps, int(min_time / max(one, 1e-6))))
    times = []
    for r in range(reps):
        t = time.perf_counter()
        mx.eval(fn(*inputs[r % len(inputs)]))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def doc_starts(B, L, seed=0, mean_length=1024):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        starts, t = np.zeros(L, np.int32), 0
        while t < L:
            n = min(int(rng.geometric(1.0 / mean_length)), L - t)
            starts[t:t + n] = t
            t += n
        rows.append(starts)
    return mx.array(np.stack(rows))


def make_fns(B, packed: bool, path: str):
    """(forward, fwd+bwd) compiled functions of (x, weight, bias, ct, starts) for one path."""
    state = TimestepNormState(mx.zeros((B,), mx.int64), mx.zeros((B, G)), mx.ones((B, G)))

    def norm(x, weight, bias, starts):
        ds = starts if packed else None
        if path == "kernel":
            y, *_ = TK.timestep_norm_kernel(x, weight, bias, *state, G, EPS, ds)
        else:
            y, _ = timestep_norm(x, weight, bias, state, G, EPS, ds)   # MEGALODON_TNORM_KERNEL=0
        return y

    def fwd(x, weight, bias, ct, starts):
        return norm(x, weight, bias, starts)

    def fwd_bwd(x, weight, bias, ct, starts):
        _, grads = mx.vjp(lambda a, w, b: norm(a, w, b, starts), [x, weight, bias], [ct])
        return grads

    return mx.compile(fwd), mx.compile(fwd_bwd)


def make_inputs(B, L, packed, count=3):
    out = []
    for i in range(count):
        mx.random.seed(i)
        x = (mx.random.normal((B, L, D)) * 1.5 + 0.3).astype(mx.bfloat16)
        ct = mx.random.normal((B, L, D)).astype(mx.bfloat16)
        w, b = mx.random.normal((D,)) * 0.1, mx.random.normal((D,)) * 0.1
        starts = doc_starts(B, L, seed=i) if packed else mx.zeros((1,), mx.int32)
        out.append((x, w, b, ct, starts))
    mx.eval(out)
    return out


def rel(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm((a - b).reshape(-1)) / mx.linalg.norm(b.reshape(-1))).item()


def check(B, L, packed):
    inputs = make_inputs(B, L, packed, count=1)[0]
    kf, kb = make_fns(B, packed, "kernel")
    of, ob = make_fns(B, packed, "ops")
    yk, yo = kf(*inputs), of(*inputs)
    gk, go = kb(*inputs), ob(*inputs)
    return {"y": rel(yk, yo), "gx": rel(gk[0], go[0]), "gweight": rel(gk[1], go[1]), "gbias": rel(gk[2], go[2])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for timestep_norm_kernel.json")
    ap.add_argument("--sweep", action="store_true", help="also sweep lanes x chunk (kernel fwd+bwd)")
    ap.add_argument("--quick", action="store_true", help="8 x 4096 only")
    ap.add_argument("--sweep-lanes", default="2,4,8,16,32", help="lanes per group tried by --sweep")
    ap.add_argument("--sweep-chunks", default="auto,64,96,128,256",
                    help="chunk lengths tried by --sweep (auto: the plan's own choice)")
    args = ap.parse_args()
    backend = K.gpu_backend()
    if backend is None:
        sys.exit("needs a GPU backend (MLX with CUDA or Metal)")
    os.environ["MEGALODON_KERNELS"] = "1"
    os.environ["MEGALODON_TNORM_KERNEL"] = "0"     # timestep_norm() = the ops path; the kernel is called directly
    shapes = SHAPES[:1] if args.quick else SHAPES
    results = {"backend": backend, "D": D, "G": G, "dtype": "bfloat16", "checks": [], "rows": [], "sweep": []}

    for packed in (False, True):
        c = check(*shapes[0], packed)
        results["checks"].append({"B": shapes[0][0], "L": shapes[0][1], "packed": packed, **c})
        print(f"agreement kernel vs ops (bf16, {shapes[0][0]}x{shapes[0][1]}, packed={packed}): "
              + ", ".join(f"{k} {v:.2e}" for k, v in c.items()), flush=True)

    print(f"\n{'B x L':>10} {'resets':>6} {'mode':>8} {'ops ms':>8} {'kernel ms':>9} {'speedup':>7} "
          f"{'ops GB/s':>9} {'kern GB/s':>9} {'kern %roof':>10}")
    for B, L in shapes:
        elems = B * L * D
        for packed in (False, True):
            inputs = make_inputs(B, L, packed)
            fns = {p: make_fns(B, packed, p) for p in ("ops", "kernel")}
            for mode, idx, nbytes in (("fwd", 0, 2 * 2 * elems), ("fwd+bwd", 1, 5 * 2 * elems)):
                t = {p: timeit(fns[p][idx], inputs) for p in ("ops", "kernel")}
                row = {"B": B, "L": L, "packed": packed, "mode": mode, "bytes": nbytes,
                       "ops_ms": t["ops"] * 1e3, "kernel_ms": t["kernel"] * 1e3,
                       "speedup": t["ops"] / t["kernel"],
                       "ops_gbps": nbytes / t["ops"] / 1e9, "kernel_gbps": nbytes / t["kernel"] / 1e9}
                results["rows"].append(row)
                print(f"{B:>3} x {L:<5} {str(packed):>6} {mode:>8} {row['ops_ms']:8.3f} {row['kernel_ms']:9.3f} "
                      f"{row['speedup']:6.1f}x {row['ops_gbps']:9.0f} {row['kernel_gbps']:9.0f} "
                      f"{100 * row['kernel_gbps'] / COPY_CEILING_GBPS:9.1f}%", flush=True)
            del inputs, fns

    if args.sweep:
        print("\nsweep, kernel fwd+bwd (no resets): lanes per group x chunk length")
        default_lanes, default_npt = TK.GPU_LANES, TK.GPU_NPT
        for B, L in shapes:
            inputs = make_inputs(B, L, False, count=2)
            for lanes in [int(v) for v in args.sweep_lanes.split(",")]:
                for chunk in [None if v == "auto" else int(v) for v in args.sweep_chunks.split(",")]:
                    TK.GPU_LANES, TK.CHUNK_OVERRIDE, TK.GPU_NPT = lanes, chunk, max(1, D // G // lanes)
                    C, NC, _ = TK.plan(B, L, G, TK.lanes(D // G)[0])
                    t = timeit(make_fns(B, False, "kernel")[1], inputs, min_time=0.15)
                    gbps = 5 * 2 * B * L * D / t / 1e9
                    results["sweep"].append({"B": B, "L": L, "lanes": lanes, "chunk": C, "chunks": NC,
                                             "ms": t * 1e3, "gbps": gbps})
                    print(f"  {B} x {L:<5} lanes {lanes:2d} chunk {C:5d} ({NC:4d} chunks): {t * 1e3:7.3f} ms "
                          f"{gbps:7.0f} GB/s", flush=True)
            del inputs
        TK.GPU_LANES, TK.CHUNK_OVERRIDE, TK.GPU_NPT = default_lanes, None, default_npt

    results["seconds"] = time.time() - T0
    print(f"\ntotal {results['seconds']:.1f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "timestep_norm_kernel.json").write_text(json.dumps(results, indent=1))
        print("wrote", out / "timestep_norm_kernel.json")


if __name__ == "__main__":
    main()
