"""Chunk attention: the fused kernels (mlx_megalodon/attention_kernels.py) vs MLX SDPA on chunks.

    python benchmarks/attention_kernels.py [--out DIR] [--budget SECONDS] [--cpu-emulation]
                                           [--only-decode] [--verbose-sweep]
    python benchmarks/kernels.py --only attention --out DIR --budget 150      (the same)

mega200M attention shapes (1 head, q/k head dim 256, v head dim 2048, chunk 2048) at L = 4K (B = 8)
and L = 32K (B = 1), 32K tokens each, bf16 then fp32: median ms of the forward (RoPE included,
through moving_average_gated_attention.chunk_attention, MEGALODON_ATTN_KERNEL=1 vs 0) and of
forward+backward (mx.grad in q, k, v), with the achieved matmul FLOP/s against the H200 ceilings
(~790 TFLOP/s bf16 tensor-core, ~60 TFLOP/s fp32 non-tensor). Then the compiled decode step (one
query against a chunk-long K/V buffer, pos an array) for 1 and 4 heads, chunk 2048 and 4096,
kernel vs masked SDPA, sweeping the kernel's knobs (keys per split, value columns per lane,
combine lanes; --verbose-sweep prints each), timed one step per evaluation and 16 independent
steps per evaluation (per step; host overhead spread out), with the bandwidth of the K/V bytes a
step must read. --only-decode runs the decode rows alone (under a minute on the H200).
Rows are started only while under --budget seconds; a table on stdout and JSON in --out.

FLOPs counted: forward 2 P (dz + dv), forward+backward 3x that (dV, dP, dQ, dK; the recompute of
the scores is not counted), P = the visible (query, key) pairs, C (C + 1) / 2 per full chunk.
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

from mlx_megalodon import attention_kernels as A  # noqa: E402
from mlx_megalodon import kernels as K  # noqa: E402
from mlx_megalodon.moving_average_gated_attention import chunk_attention  # noqa: E402
from mlx_megalodon.rotary_positional_embedding import rope_periods  # noqa: E402

CEILING_TFLOPS = {"bfloat16": 790.0, "float16": 790.0, "float32": 60.0}
COPY_CEILING_GBPS = 4300.0
T0 = time.time()


def timeit(fn, args, min_time=0.2, max_reps=30):
    """Median seconds per call (after a warm-up call that compiles and allocates)."""
    mx.eval(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def visible_pairs(L: int, C: int) -> int:
    full, last = divmod(L, C)
    return full * C * (C + 1) // 2 + last * (last + 1) // 2


def with_kernel(flag: str, fn):
    def run(*a):
        old = os.environ.get("MEGALODON_ATTN_KERNEL")
        os.environ["MEGALODON_ATTN_KERNEL"] = flag
        try:
            return fn(*a)
        finally:
            if old is None:
                os.environ.pop("MEGALODON_ATTN_KERNEL", None)
            else:
                os.environ["MEGALODON_ATTN_KERNEL"] = old
    return run


def chunk_rows(args, results, shapes):
    dz, dv, C = shapes["dz"], shapes["dv"], shapes["chunk"]
    periods = rope_periods(dz, 10000.0)
    for dtype in (mx.bfloat16, mx.float32):
        for B, L in shapes["BL"]:
            for mode in ("fwd", "fwd_bwd"):
                if time.time() - T0 > args.budget:
                    print("budget reached; stopping chunk rows", flush=True)
                    return
                mx.random.seed(0)
                q, k = (mx.random.normal((B, 1, L, dz)) * (4 / dz ** 0.5) for _ in range(2))
                v = mx.random.normal((B, 1, L, dv))
                q, k, v = (a.astype(dtype) for a in (q, k, v))
                mx.eval(q, k, v)
                fwd = lambda q, k, v: chunk_attention(q, k, v, C, periods)[0]
                if mode == "fwd":
                    fn = fwd
                else:
                    fn = mx.grad(lambda q, k, v: fwd(q, k, v).astype(mx.float32).sum(), argnums=(0, 1, 2))
                flops = 2 * visible_pairs(L, C) * B * (dz + dv) * (3 if mode == "fwd_bwd" else 1)
                row = dict(kind=mode, dtype=str(dtype).split(".")[-1], B=B, L=L, H=1, dz=dz, dv=dv, chunk=C,
                           gflop=flops / 1e9)
                ceiling = CEILING_TFLOPS[row["dtype"]]
                try:
                    for name, flag in (("kernel", "1"), ("sdpa", "0")):
                        t = timeit(with_kernel(flag, fn), (q, k, v))
                        row[f"{name}_ms"] = t * 1e3
                        row[f"{name}_TFLOPs"] = flops / t / 1e12
                        row[f"{name}_pct_ceiling"] = 100 * row[f"{name}_TFLOPs"] / ceiling
                    if mode == "fwd":
                        a = with_kernel("1", fwd)(q, k, v).astype(mx.float32)
                        b = with_kernel("0", fwd)(q, k, v).astype(mx.float32)
                        row["rel_err_kernel_vs_sdpa"] = float(mx.linalg.norm(a - b) / mx.linalg.norm(b))
                    row["speedup_kernel"] = row["sdpa_ms"] / row["kernel_ms"]
                except Exception as e:  # record and go on (e.g. out of memory in one path)
                    row["error"] = repr(e)[:300]
                results["chunk"].append(row)
                print(fmt(row), flush=True)
                del q, k, v
                mx.clear_cache()


def decode_configs(shapes):
    """The decode tuning knobs swept: (keys per split, value columns per lane, combine lanes)."""
    return [(kps, cpl, sl) for kps in shapes["kps"] for cpl in shapes["cpl"] for sl in shapes["sl"]]


def timeit_batched(fn, arg_sets, reps=5):
    """Median seconds per call when len(arg_sets) independent calls (different queries) go into one
    evaluation: the per-evaluation host overhead (Python, graph build, synchronize) is spread over
    the batch, so this is closer to the GPU time of a step inside a larger decoding graph."""
    mx.eval([fn(*a) for a in arg_sets])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval([fn(*a) for a in arg_sets])
        times.append((time.perf_counter() - t) / len(arg_sets))
    return statistics.median(times)


def decode_rows(args, results, shapes):
    dz, dv = shapes["dz"], shapes["dv"]
    compile_ = (lambda f: f) if args.cpu_emulation else mx.compile   # the CPU emulation evaluates inside
    batch = shapes["batch"]
    for dtype in (mx.bfloat16, mx.float32):
        for H, C in shapes["decode"]:
            mx.random.seed(1)
            qs = [(mx.random.normal((1, H, 1, dz)) * (4 / dz ** 0.5)).astype(dtype) for _ in range(batch)]
            q = qs[0]
            keys = (mx.random.normal((1, H, C, dz)) * (4 / dz ** 0.5)).astype(dtype)
            values = mx.random.normal((1, H, C, dv)).astype(dtype)
            mx.eval(qs, keys, values)
            sdpa = compile_(lambda q, kk, vv, p: mx.fast.scaled_dot_product_attention(
                q, kk, vv, scale=1.0, mask=mx.arange(kk.shape[2]) <= p))
            for pos in (C // 2, C - 1):
                if time.time() - T0 > args.budget:
                    print("budget reached; stopping decode rows", flush=True)
                    return
                p = mx.array(pos, dtype=mx.int32)
                bytes_read = (pos + 1) * H * (dz + dv) * (2 if dtype != mx.float32 else 4)
                row = dict(kind="decode", dtype=str(dtype).split(".")[-1], H=H, chunk=C, pos=pos, dz=dz, dv=dv)
                row["sdpa_ms"] = timeit(sdpa, (q, keys, values, p)) * 1e3
                row["sdpa_batched_ms"] = timeit_batched(sdpa, [(qi, keys, values, p) for qi in qs]) * 1e3
                want = sdpa(q, keys, values, p).astype(mx.float32)
                sweep = {}
                for kps, cpl, sl in decode_configs(shapes):
                    step = compile_(lambda q, kk, vv, p, kps=kps, cpl=cpl, sl=sl: A.decode_attention_kernel(
                        q, kk, vv, p, kps, columns_per_lane=cpl, combine_lanes=sl))
                    name = f"kps{kps}_cpl{cpl}_sl{sl}"
                    sweep[name] = dict(kps=kps, cpl=cpl, sl=sl,
                                       ms=timeit(step, (q, keys, values, p)) * 1e3,
                                       batched_ms=timeit_batched(step, [(qi, keys, values, p) for qi in qs]) * 1e3)
                # Best by the batched time (less host noise); its one-step time is reported too.
                best = min(sweep, key=lambda n: sweep[n]["batched_ms"])
                b = sweep[best]
                row["sweep"] = sweep
                row["best"] = best
                row["kernel_ms"] = b["ms"]
                row["kernel_batched_ms"] = b["batched_ms"]
                row["kernel_best_one_step_ms"] = min(s["ms"] for s in sweep.values())
                default = f"kps{A.DECODE_KEYS_PER_SPLIT}_cpl{A.DECODE_COLUMNS_PER_LANE}_sl{A.DECODE_COMBINE_LANES}"
                if default in sweep:
                    row["default_batched_ms"] = sweep[default]["batched_ms"]
                got = A.decode_attention_kernel(q, keys, values, p, b["kps"], columns_per_lane=b["cpl"],
                                                combine_lanes=b["sl"]).astype(mx.float32)
                row["rel_err_kernel_vs_sdpa"] = float(mx.linalg.norm(got - want) / mx.linalg.norm(want))
                row["kernel_GBps"] = bytes_read / row["kernel_batched_ms"] / 1e6
                row["kernel_pct_copy"] = 100 * row["kernel_GBps"] / COPY_CEILING_GBPS
                row["sdpa_GBps"] = bytes_read / row["sdpa_batched_ms"] / 1e6
                row["speedup_kernel"] = row["sdpa_ms"] / row["kernel_ms"]
                row["speedup_kernel_batched"] = row["sdpa_batched_ms"] / row["kernel_batched_ms"]
                results["decode"].append(row)
                print(fmt({k: v for k, v in row.items() if k != "sweep"}), flush=True)
                if args.verbose_sweep:
                    for n, s in sorted(sweep.items(), key=lambda kv: kv[1]["batched_ms"]):
                        print(f"    {n}: {s['batched_ms']:.4f} ms batched, {s['ms']:.4f} ms one step", flush=True)


def fmt(row):
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def print_tables(results):
    f = lambda r, k, s="{:.3f}": s.format(r[k]) if k in r else "-"
    print("\n| kind | dtype | B x L | kernel ms | kernel TFLOP/s (% ceil) | SDPA ms | SDPA TFLOP/s (% ceil) | SDPA/kernel |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["chunk"]:
        print(f"| {r['kind']} | {r['dtype']} | {r['B']} x {r['L']} | {f(r, 'kernel_ms')} | "
              f"{f(r, 'kernel_TFLOPs', '{:.1f}')} ({f(r, 'kernel_pct_ceiling', '{:.1f}')}%) | {f(r, 'sdpa_ms')} | "
              f"{f(r, 'sdpa_TFLOPs', '{:.1f}')} ({f(r, 'sdpa_pct_ceiling', '{:.1f}')}%) | {f(r, 'speedup_kernel', '{:.2f}')}x |")
    print("\n| decode | dtype | H | chunk | pos | best kps/cpl/sl | kernel ms one step | SDPA ms one step | "
          "kernel ms batched | default ms batched | SDPA ms batched | kernel GB/s batched (% of 4.3 TB/s) | "
          "SDPA/kernel one step | SDPA/kernel batched |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results["decode"]:
        print(f"| step | {r['dtype']} | {r['H']} | {r['chunk']} | {r['pos']} | {r.get('best')} | {f(r, 'kernel_ms')} | "
              f"{f(r, 'sdpa_ms')} | {f(r, 'kernel_batched_ms', '{:.4f}')} | {f(r, 'default_batched_ms', '{:.4f}')} | "
              f"{f(r, 'sdpa_batched_ms', '{:.4f}')} | "
              f"{f(r, 'kernel_GBps', '{:.0f}')} ({f(r, 'kernel_pct_copy', '{:.0f}')}%) | "
              f"{f(r, 'speedup_kernel', '{:.2f}')}x | {f(r, 'speedup_kernel_batched', '{:.2f}')}x |")
    print(f"total {time.time() - T0:.0f} s")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=150.0, help="start no new row after this many seconds")
    ap.add_argument("--cpu-emulation", action="store_true", help="smoke-test this script without a GPU (tiny shapes)")
    ap.add_argument("--only-decode", action="store_true", help="the decode step's sweep only (no chunk rows)")
    ap.add_argument("--verbose-sweep", action="store_true", help="print every decode configuration's times")
    args = ap.parse_args(argv)
    os.environ["MEGALODON_KERNELS"] = "1"
    if args.cpu_emulation:
        A.set_launcher(A.CpuLauncher())
        shapes = dict(dz=8, dv=16, chunk=16, BL=[(2, 32), (1, 64)], decode=[(1, 16), (2, 32)], kps=(4, 8),
                      cpl=(2, 16), sl=(1,), batch=2)
    else:
        if K.gpu_backend() is None:
            print("no GPU backend: nothing to benchmark (try --cpu-emulation)")
            return
        shapes = dict(dz=256, dv=2048, chunk=2048, BL=[(8, 4096), (1, 32768)],
                      decode=[(1, 2048), (4, 2048), (4, 4096)], kps=(8, 16, 32), cpl=(4, 8, 16), sl=(4, 8, 16),
                      batch=16)
    results = {"device": str(mx.default_device()), "backend": K.gpu_backend(), "shapes": shapes,
               "chunk": [], "decode": [], "policy": {k: A.preferred(k) for k in ("chunk", "decode")}}
    try:
        import subprocess
        results["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
    except Exception:
        pass
    print(f"device {results['device']} ({results.get('gpu', '?')}), budget {args.budget:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save = lambda: (out / "attention_bench.json").write_text(json.dumps(results, indent=1))
    decode_rows(args, results, shapes)     # cheap, and the likeliest win: first
    save()
    if not args.only_decode:
        chunk_rows(args, results, shapes)
        save()
    print_tables(results)


if __name__ == "__main__":
    main()
