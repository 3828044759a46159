"""CEMA kernels at the training step's shapes: sweep the work split where training spends its time.

    python3 benchmarks/cema_train_shapes.py [--out DIR] [--cpu-emulation]

`benchmarks/kernels.py --sweep` chose the split (threads in flight, state dims per thread, chunk
floor) at B = 1 and L = 65K-262K, where the scan is bound by arithmetic. A mega200M training step
runs it at 8 x 4,096 and 1 x 32,768 (D = 1,024, N = 16, bf16 x, no final state: the gamma-free
backward), where chunks are 128-512 steps long and launches, the combine and the partial-sum
reduction weigh more. This sweeps, per shape:
- forward alone: FWD_MAX_NPT x TARGET_THREADS x MIN_CHUNK;
- forward + backward (y only), with the forward at its defaults: BWD_MAX_NPT x TARGET_THREADS x
  MIN_CHUNK.
TARGET_THREADS and MIN_CHUNK are launch sizes (no recompilation); each MAX_NPT is one NVRTC/Metal
build. Prints the median ms per call and the best setting next to the current defaults; JSON in --out.
--cpu-emulation: a smoke run of this script on the CPU emulation (tiny shape, one setting each).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from benchmarks.kernels import N, coeffs, timeit  # noqa: E402
from mlx_megalodon import kernels as K  # noqa: E402
from mlx_megalodon.complex_exponential_moving_average import CEMACoefficients  # noqa: E402

SETTINGS = ("FWD_MAX_NPT", "BWD_MAX_NPT", "TARGET_THREADS", "MIN_CHUNK")


def forward(c):
    return lambda x: K.cema_kernel_scan(x, c)[0]


def forward_backward(c):
    def loss(x, cs):
        return (K.cema_kernel_scan(x, CEMACoefficients(*cs))[0] ** 2).sum()   # y only: GHT0 = 1
    grad = mx.grad(loss, argnums=(0, 1))
    return lambda x: grad(x, list(c))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="directory for cema_train_shapes.json")
    ap.add_argument("--cpu-emulation", action="store_true", help="smoke-test on the CPU emulation")
    args = ap.parse_args(argv)
    if args.cpu_emulation:
        K.set_launcher(K.CpuLauncher())
        shapes, dtype = [(1, 96, 8)], mx.float32
        grid = {"FWD_MAX_NPT": (16,), "BWD_MAX_NPT": (16,), "TARGET_THREADS": (64,), "MIN_CHUNK": (32,)}
    else:
        if K.gpu_backend() is None:
            sys.exit("needs a GPU backend (MLX with CUDA or Metal), or --cpu-emulation")
        shapes, dtype = [(8, 4096, 1024), (1, 32768, 1024)], mx.bfloat16
        # 16K-32K threads: at 8 x 4K with 4 dims per thread, one chunk per row (a single launch
        # each way, no local pass, no combine); the first run (seventh session) went down to 66K only.
        grid = {"FWD_MAX_NPT": (4, 8, 16), "BWD_MAX_NPT": (2, 4, 8),
                "TARGET_THREADS": (16 * 1024, 32 * 1024, 66 * 1024, 132 * 1024, 264 * 1024), "MIN_CHUNK": (32, 128)}
    defaults = {name: getattr(K, name) for name in SETTINGS}
    results = {"backend": K.gpu_backend() or "cpu-emulation", "defaults": defaults, "rows": []}
    t0 = time.time()
    for B, L, D in shapes:
        c = coeffs(D)
        xs = [mx.random.normal((B, L, D)).astype(dtype) for _ in range(2)]
        mx.eval(xs)
        for kind, npt_name, make in (("fwd", "FWD_MAX_NPT", forward), ("fwd+bwd", "BWD_MAX_NPT", forward_backward)):
            timed = []
            for npt, target, floor in itertools.product(grid[npt_name], grid["TARGET_THREADS"], grid["MIN_CHUNK"]):
                for name, value in defaults.items():
                    setattr(K, name, value)
                setattr(K, npt_name, npt)
                K.TARGET_THREADS, K.MIN_CHUNK = target, floor
                ms = timeit(make(c), xs, min_time=0.1, max_reps=10) * 1e3
                row = {"B": B, "L": L, "D": D, "pass": kind, npt_name: npt, "TARGET_THREADS": target,
                       "MIN_CHUNK": floor, "chunk": K.plan(B, L, D, K._split(N, npt, K._launcher().max_split))[0],
                       "ms": ms}
                results["rows"].append(row)
                timed.append(row)
                print(f"{B} x {L} x {D} {kind:8s} {npt_name}={npt:2d} target={target:7d} min_chunk={floor:4d} "
                      f"chunk={row['chunk']:5d}: {ms:7.3f} ms", flush=True)
            best = min(timed, key=lambda r: r["ms"])
            now = [r for r in timed if r[npt_name] == defaults[npt_name] and r["TARGET_THREADS"] == defaults["TARGET_THREADS"]
                   and r["MIN_CHUNK"] == defaults["MIN_CHUNK"]]
            line = (f"best {kind} at {B} x {L}: {best['ms']:.3f} ms ({npt_name}={best[npt_name]}, "
                    f"TARGET_THREADS={best['TARGET_THREADS']}, MIN_CHUNK={best['MIN_CHUNK']})")
            if now:
                line += f"; defaults {now[0]['ms']:.3f} ms"
            print(line, flush=True)
    for name, value in defaults.items():
        setattr(K, name, value)
    results["seconds"] = time.time() - t0
    print(f"total {results['seconds']:.1f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "cema_train_shapes.json").write_text(json.dumps(results, indent=1))
        print("wrote", out / "cema_train_shapes.json")


if __name__ == "__main__":
    main()
