"""CEMA scan: fused custom kernel vs the FFT ops path (and torch_ref's CEMA on CUDA, if present).

    python benchmarks/kernels.py [--quick] [--out DIR] [--budget SECONDS]
    python benchmarks/kernels.py --only attention [--out DIR] [--budget SECONDS]   (chunk attention)

Batch 1, N = 16, float32 x. For each (D, L): median time per call of the forward (and, for some
sizes, forward+backward through mx.grad); the achieved bandwidth counting only the bytes a scan
must move (read x, write y: 8 bytes per element) against a measured device-to-device copy; and,
since the scan is bound by FP32 arithmetic, the share of the FP32 issue rate its instructions need,
against the rate an FMA probe sustains on the same GPU (the measured ceiling) and against the
clock-rate peak, with the SM clock sampled meanwhile. With --sweep, a sweep of the work split
(threads in flight, state dims per thread) first picks the settings used for the table. Results: a
table on stdout and JSON in --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402

from mlx_megalodon import kernels as K  # noqa: E402
from mlx_megalodon.complex_exponential_moving_average import CEMACoefficients, cema_fft  # noqa: E402

N = 16
T0 = time.time()
# H200 device-to-device copy, read + write, measured with PyTorch on these machines (KINDS.md):
# the roofline for a pass that must read x and write y. MLX's own `x * 1.0` reaches less.
COPY_CEILING_GBPS = 4300.0
# The forward is bound by FP32 arithmetic, not bytes. Its roofline: the FP32 instructions the
# algorithm needs (an FMA counts one; metal/cema_scan.body's header: 4 per step and state dim in
# cema_fwd_local, 6 in cema_fwd_final) at the FP32 issue rate, two ways:
#   measured  the rate the FMA probe below sustains on this device (`fp32_roofline_pct`), like the
#             copy ceiling for bytes: what the chip delivers under a full FP32 load;
#   peak      132 SMs x 128 lanes x 1.98 GHz, nvidia-smi's max SM clock on the H200
#             (`fp32_peak_pct`), which a long FP32-bound kernel may not hold.
FWD_FP32_OPS_PER_STEP_AND_DIM = 4 + 6
H200_FP32_INSTR_PER_S = 132 * 128 * 1.98e9

# FMA probe: every thread runs FMA_CHAINS independent FMA chains (enough to cover the FMA latency),
# FMA_UNROLL deep per loop trip so the loop's own counter and branch stay about 1% of the issue.
FMA_CHAINS, FMA_UNROLL = 8, 32
FMA_PROBE_BODY = """
float a[FMA_CHAINS];
MGK_UNROLL_ALL
for (int k = 0; k < FMA_CHAINS; ++k) {
  a[k] = 1.0f + 1e-3f * (float)((tid + (unsigned int)k) & 7u);
}
const float m = mul[0];
const float s = add[0];
const int trips = params[0];
for (int r = 0; r < trips; ++r) {
  MGK_UNROLL_ALL
  for (int u = 0; u < FMA_UNROLL; ++u) {
    MGK_UNROLL_ALL
    for (int k = 0; k < FMA_CHAINS; ++k) {
      a[k] = MGK_FMA(a[k], m, s);
    }
  }
}
float total = 0.0f;
for (int k = 0; k < FMA_CHAINS; ++k) {
  total += a[k];
}
out[tid] = total;
"""


def coeffs(D: int) -> CEMACoefficients:
    mx.random.seed(0)
    p = mx.sigmoid(mx.random.normal((D, N)))
    log_mag = mx.log1p(-p * mx.sigmoid(mx.random.normal((D, N))))
    phase = mx.random.uniform(0, 2 * math.pi, (D, N))
    g = mx.random.normal((2, D, N)) / math.sqrt(N)
    c = CEMACoefficients(p, log_mag, phase, g[0], g[1], mx.random.normal((D,)) * 0.25)
    mx.eval(*c)
    return c


def timeit(fn, inputs, min_time=0.2, max_reps=50):
    """Median seconds per call; calls rotate over `inputs` (distinct buffers, so L2 does not hold
    them). Several calls go into one mx.eval when a call is short, to hide the host overhead."""
    out = fn(inputs[0])
    mx.eval(out)                                      # warm-up: JIT compile, allocations
    t = time.perf_counter()
    mx.eval(fn(inputs[1 % len(inputs)]))
    one = time.perf_counter() - t
    group = max(1, min(len(inputs), int(0.02 / max(one, 1e-6))))
    reps = max(3, min(max_reps, int(min_time / max(one * group, 1e-6))))
    times = []
    for r in range(reps):
        t = time.perf_counter()
        mx.eval([fn(inputs[(r * group + i) % len(inputs)]) for i in range(group)])
        times.append((time.perf_counter() - t) / group)
    return statistics.median(times)


def copy_bandwidth():
    a = mx.random.normal((1 << 28,))                 # 1 GiB
    mx.eval(a)
    t = timeit(lambda v: v * 1.0, [a])
    return 2 * a.nbytes / t


def fp32_fma_rate(threads: int = 132 * 2048 * 4, trips: int = 2000):
    """FMA instructions per second that the FMA probe sustains on the GPU (same prelude and launch
    width as the scan kernels), and the SM clocks nvidia-smi saw meanwhile."""
    backend = K.gpu_backend()
    prelude = K._sections(K._read(f"prelude_{backend}.h"))
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    header = prelude[""] + f"\n#define FMA_CHAINS {FMA_CHAINS}\n#define FMA_UNROLL {FMA_UNROLL}\n"
    probe = make(name="mgk_fma_probe", input_names=["mul", "add", "params"], output_names=["out"],
                 source=prelude["entry"] + FMA_PROBE_BODY, header=header)
    args = [mx.array([0.999], dtype=mx.float32), mx.array([1e-3], dtype=mx.float32),
            mx.array([trips], dtype=mx.int32)]
    mx.eval(args)
    run = lambda _: probe(inputs=args, grid=(threads, 1, 1), threadgroup=(256, 1, 1),
                          output_shapes=[(threads,)], output_dtypes=[mx.float32])[0]
    with ClockSampler() as clocks:
        t = timeit(run, [None], min_time=1.0)
    return threads * trips * FMA_UNROLL * FMA_CHAINS / t, clocks.summary()


class ClockSampler:
    """Polls nvidia-smi's SM clock (MHz) in a thread while the block runs; summary() is
    {min, median, max} of the samples, or {} where nvidia-smi is missing (a Mac)."""

    def __init__(self, period_s: float = 0.1):
        self.period_s, self.samples = period_s, []

    def _poll(self):
        import subprocess
        while not self._stop.wait(self.period_s):
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=5)
                self.samples.append(float(r.stdout.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return

    def __enter__(self):
        import threading
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        if not self.samples:
            return {}
        return dict(min=min(self.samples), median=statistics.median(self.samples), max=max(self.samples),
                    samples=len(self.samples))


def inputs_for(D, L, count):
    xs = [mx.random.normal((1, L, D)) for _ in range(count)]
    mx.eval(xs)
    return xs


def kernel_fwd(c):
    return lambda x: K.cema_kernel_scan(x, c)[0]


def fft_fwd(c):
    return lambda x: cema_fft(x, c)[0]


def grad_fn(scan, c):
    def loss(x, cs):
        y, (hr, hi) = scan(x, CEMACoefficients(*cs), None, True)
        return (y * y).sum() + hr.sum() + hi.sum()
    g = mx.grad(loss, argnums=(0, 1))
    return lambda x: g(x, list(c))


def torch_ref_fn(D, L):
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        from torch_ref.complex_exponential_moving_average import MultiHeadComplexEMA as TorchCEMA
        m = TorchCEMA(D, N).cuda()
        xs = [torch.randn(1, D, L, device="cuda") for _ in range(2)]

        def run():
            with torch.no_grad():
                m(xs[0], None, compute_last_state=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            reps = 0
            while reps < 3 or (time.perf_counter() - t0 < 0.2 and reps < 30):
                with torch.no_grad():
                    m(xs[reps % 2], None, compute_last_state=False)
                reps += 1
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / reps
        return run
    except Exception as e:  # optional comparison
        print("torch_ref unavailable:", repr(e)[:200])
        return None


def decode_rows(results):
    """One step (L = 1) with the state in and out: per-token cost of decoding, kernel vs the ops
    recurrence that cema_scan uses without kernels."""
    from mlx_megalodon.complex_exponential_moving_average import cema_recurrence
    for D in (1024, 4096):
        c = coeffs(D)
        xs = inputs_for(D, 1, 4)
        st = (mx.random.normal((1, D, N)), mx.random.normal((1, D, N)))
        mx.eval(st)
        row = dict(D=D, L=1, kind="decode")
        row["kernel_ms"] = timeit(lambda x: K.cema_kernel_scan(x, c, st, True), xs) * 1e3
        row["recurrence_ms"] = timeit(lambda x: cema_recurrence(x, c, st, True), xs) * 1e3
        results["decode"].append(row)
        print(row, flush=True)


def table_sizes(args):
    sizes = [(1024, L) for L in (4096, 16384, 65536, 262144, 1048576)] + \
            [(4096, L) for L in (4096, 16384, 65536, 262144)]
    if args.quick:
        sizes = [(1024, 4096), (1024, 65536), (4096, 16384)]
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    return sizes


def run_phase(phase, args, results, ceiling, fma_rate=None):
    fwd_target, bwd_target = K.TARGET_THREADS, K.TARGET_THREADS
    if "best_fwd" in results:
        fwd_target, bwd_target = results["best_fwd"]["target"], results["best_bwd"]["target"]
    sizes = table_sizes(args)
    if phase == "kernel":
        decode_rows(results)
    for D, L in sizes:
        if time.time() - T0 > args.budget:
            print("budget reached; stopping")
            break
        row = dict(D=D, L=L, N=N, B=1)
        bytes_moved = 8 * L * D
        c = coeffs(D)
        xs = inputs_for(D, L, 2 if L * D >= (1 << 26) else 4)
        try:
            if phase == "kernel":
                K.TARGET_THREADS = fwd_target
                with ClockSampler() as clocks:
                    row["kernel_ms"] = timeit(kernel_fwd(c), xs, min_time=1.0 if L * D >= (1 << 28) else 0.2) * 1e3
                if clocks.samples:
                    row["sm_clock_mhz"] = clocks.summary()
                row["kernel_GBps"] = bytes_moved / row["kernel_ms"] / 1e6
                row["roofline_pct"] = 100 * row["kernel_GBps"] / COPY_CEILING_GBPS
                row["pct_of_mlx_copy"] = 100 * row["kernel_GBps"] * 1e9 / ceiling
                instr_per_s = L * D * N * FWD_FP32_OPS_PER_STEP_AND_DIM / (row["kernel_ms"] / 1e3)
                row["fp32_peak_pct"] = 100 * instr_per_s / H200_FP32_INSTR_PER_S
                if fma_rate:
                    row["fp32_roofline_pct"] = 100 * instr_per_s / fma_rate
                if L * D <= (1 << 28):
                    K.TARGET_THREADS = bwd_target
                    row["kernel_fwd_bwd_ms"] = timeit(grad_fn(K.cema_kernel_scan, c), xs, max_reps=10) * 1e3
                    K.TARGET_THREADS = fwd_target
            elif phase == "fft":
                mx.reset_peak_memory()
                row["fft_ms"] = timeit(fft_fwd(c), xs, max_reps=10) * 1e3
                row["fft_peak_GB"] = mx.get_peak_memory() / 1e9
                yf = cema_fft(xs[0], c)[0]
                yk = K.cema_kernel_scan(xs[0], c)[0]
                row["rel_err_kernel_vs_fft"] = float(mx.linalg.norm(yk - yf) / mx.linalg.norm(yf))
                del yf, yk
                if L * D <= (1 << 28):
                    row["fft_fwd_bwd_ms"] = timeit(grad_fn(cema_fft, c), xs, max_reps=10) * 1e3
            elif phase == "torch":
                tr = torch_ref_fn(D, L) if L * D <= (1 << 28) else None
                if tr is None:
                    continue
                row["torch_ref_ms"] = tr() * 1e3
        except Exception as e:
            row[f"{phase}_error"] = repr(e)[:300]
            print(f"{phase} D={D} L={L} failed: {row[f'{phase}_error']}", flush=True)
            results["rows"].append(row)
            break                                        # a failed allocation can poison the process
        results["rows"].append(row)
        del xs
        mx.clear_cache()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes only")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--budget", type=float, default=240.0, help="per phase: stop starting new rows after this")
    ap.add_argument("--sweep", action="store_true", help="first sweep the work split and use the best")
    ap.add_argument("--sweep-targets", default="66K,132K,264K,528K",
                    help="threads per launch tried by --sweep (K = 1024), e.g. a finer grid to find whole waves")
    ap.add_argument("--sizes", help="D:L,D:L,... instead of the default table")
    ap.add_argument("--phase", choices=("all", "kernel", "fft", "torch"), default="all",
                    help="all: each phase in its own process (an out-of-memory in the FFT path can "
                         "leave the CUDA context unusable)")
    ap.add_argument("--cpu-emulation", action="store_true", help="smoke-test this script without a GPU")
    ap.add_argument("--only", choices=("cema", "attention"), default="cema",
                    help="attention: chunk attention kernels vs SDPA instead (benchmarks/attention_kernels.py)")
    args = ap.parse_args()
    if args.only == "attention":
        import attention_kernels as attention_bench  # benchmarks/attention_kernels.py
        return attention_bench.main(["--out", args.out, "--budget", str(args.budget)]
                                    + (["--cpu-emulation"] if args.cpu_emulation else []))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "all":
        import subprocess
        merged = None
        # The FFT path runs out of memory at long L; after a failed allocation the CUDA context
        # may be unusable, so each FFT row gets a process of its own.
        fft_runs = [("fft", f"{D}:{L}") for D, L in table_sizes(args)]
        for phase, sizes in [("kernel", args.sizes)] + fft_runs + [("torch", args.sizes)]:
            cmd = [sys.executable, __file__, "--phase", phase, "--out", str(out), "--budget", str(args.budget)]
            cmd += [a for a, on in (("--quick", args.quick), ("--sweep", args.sweep and phase == "kernel"),
                                    ("--cpu-emulation", args.cpu_emulation)) if on]
            cmd += ["--sizes", sizes] if sizes else []
            cmd += ["--sweep-targets", args.sweep_targets] if args.sweep and phase == "kernel" else []
            print("$", " ".join(cmd[1:]), flush=True)
            f = out / f"kernels_bench_{phase}.json"
            f.unlink(missing_ok=True)
            subprocess.run(cmd)
            if not f.exists():
                continue
            part = json.loads(f.read_text())
            if merged is None:
                merged = part
                continue
            by_size = {(r["D"], r["L"]): r for r in merged["rows"]}
            for r in part["rows"]:
                by_size.setdefault((r["D"], r["L"]), dict(D=r["D"], L=r["L"], N=N, B=1)).update(r)
            merged["rows"] = sorted(by_size.values(), key=lambda r: (r["D"], r["L"]))
        if merged is None:
            return
        (out / "kernels_bench.json").write_text(json.dumps(merged, indent=1))
        print_table(merged)
        return

    results = {"device": str(mx.default_device()), "backend": K.gpu_backend(), "rows": [], "sweep": [],
               "decode": [], "phase": args.phase,
               "settings": dict(TARGET_THREADS=K.TARGET_THREADS, FWD_MAX_NPT=K.FWD_MAX_NPT,
                                BWD_MAX_NPT=K.BWD_MAX_NPT, MIN_CHUNK=K.MIN_CHUNK)}
    if args.cpu_emulation:
        K.set_launcher(K.CpuLauncher())
    if not K.cema_kernel_available(4096) and args.phase != "torch":
        print("no GPU backend / kernels disabled: nothing to benchmark")
        return
    try:
        import subprocess
        results["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True).stdout.strip()
    except Exception:
        pass
    ceiling = copy_bandwidth()
    results["copy_GBps"] = ceiling / 1e9
    print(f"[{args.phase}] device {results['device']} ({results.get('gpu', '?')}); "
          f"MLX copy {ceiling / 1e9:.0f} GB/s (read+write)", flush=True)
    fma_rate = probe_clocks = None
    if args.phase == "kernel" and not args.cpu_emulation:
        try:
            fma_rate, probe_clocks = fp32_fma_rate()
        except Exception as e:  # the probe has only run on CUDA: elsewhere report without it
            results["fp32_probe_error"] = repr(e)[:300]
            print(f"[kernel] FMA probe failed ({results['fp32_probe_error']}); no measured FP32 ceiling", flush=True)
    if fma_rate:
        results["fp32_fma_per_s"], results["fp32_probe_sm_clock_mhz"] = fma_rate, probe_clocks
        print(f"[kernel] FMA probe: {fma_rate:.3e} FP32 instructions/s ({2 * fma_rate / 1e12:.1f} TFLOP/s), "
              f"{100 * fma_rate / H200_FP32_INSTR_PER_S:.1f}% of 132 x 128 x 1.98 GHz; SM clock {probe_clocks}",
              flush=True)
    save = lambda: (out / f"kernels_bench_{args.phase}.json").write_text(json.dumps(results, indent=1))
    if args.sweep and args.phase == "kernel":
        sweep(args, results)
        save()
    run_phase(args.phase, args, results, ceiling, fma_rate)
    save()
    if args.phase == "fft" and not args.cpu_emulation and table_sizes(args)[0] == (1024, 65536):
        # Is the kernel-vs-FFT difference the FFT path's TF32 matmuls? Same row with TF32 off.
        import subprocess
        code = ("import sys; sys.path.insert(0, %r); import mlx.core as mx; import kernels as B; "
                "from mlx_megalodon import kernels as K; c = B.coeffs(1024); x = mx.random.normal((1, 65536, 1024)); "
                "yf = B.cema_fft(x, c)[0]; yk = K.cema_kernel_scan(x, c)[0]; "
                "print('TF32 off: rel err kernel vs fft', float(mx.linalg.norm(yk - yf) / mx.linalg.norm(yf)))"
                % str(Path(__file__).resolve().parent))
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MLX_ENABLE_TF32": "0"},
                           capture_output=True, text=True)
        results["tf32_off_check"] = (r.stdout + r.stderr).strip()[-300:]
        print(results["tf32_off_check"])
        save()


def sweep(args, results):
    best = {}
    sweep_sizes = [(1024, 65536)] if args.quick else [(1024, 262144), (4096, 65536)]
    if args.sizes:
        sweep_sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")][:1]
    for D, L in sweep_sizes:
        c = coeffs(D)
        xs = inputs_for(D, L, 2)
        choices_fwd, choices_bwd = ((16,), (16,)) if args.cpu_emulation else ((4, 8, 16), (2, 4, 8))
        targets = [int(float(v[:-1]) * 1024) if v.upper().endswith("K") else int(v)
                   for v in args.sweep_targets.split(",") if v.strip()]
        for kind, attr, choices in (("fwd", "FWD_MAX_NPT", choices_fwd), ("bwd", "BWD_MAX_NPT", choices_bwd)):
            for npt in choices:
                for target in targets:
                    setattr(K, attr, npt)
                    K.TARGET_THREADS = target
                    fn = kernel_fwd(c) if kind == "fwd" else grad_fn(K.cema_kernel_scan, c)
                    t = timeit(fn, xs, min_time=0.1, max_reps=10)
                    results["sweep"].append(dict(kind=kind, D=D, L=L, max_npt=npt, target=target, ms=t * 1e3))
                    print(f"sweep {kind} D={D} L={L} max_npt={npt} target={target}: {t * 1e3:.3f} ms")
                    best[(kind, npt, target)] = best.get((kind, npt, target), 0.0) + t
    for kind, attr in (("fwd", "FWD_MAX_NPT"), ("bwd", "BWD_MAX_NPT")):
        (_, npt, target) = min((key for key in best if key[0] == kind), key=best.get)
        setattr(K, attr, npt)
        results[f"best_{kind}"] = dict(max_npt=npt, target=target)
    print("chosen:", results["best_fwd"], results["best_bwd"])


def print_table(results):
    ceiling = results.get("copy_GBps", float("nan"))
    print("\n| D | L | kernel ms | GB/s | % of 4.3 TB/s | % of measured FP32 roofline | % of FP32 peak at 1.98 GHz | "
          "FFT ms | speed-up | torch_ref ms | kernel fwd+bwd ms | FFT fwd+bwd ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda r, k, fmt="{:.3f}": fmt.format(r[k]) if k in r else "-"
    for r in results["rows"]:
        sp = f"{r['fft_ms'] / r['kernel_ms']:.1f}x" if "fft_ms" in r and "kernel_ms" in r else "-"
        print(f"| {r['D']} | {r['L']} | {f(r, 'kernel_ms')} | {f(r, 'kernel_GBps', '{:.0f}')} | "
              f"{f(r, 'roofline_pct', '{:.0f}')} | {f(r, 'fp32_roofline_pct', '{:.1f}')} | {f(r, 'fp32_peak_pct', '{:.1f}')} | {f(r, 'fft_ms')} | {sp} | {f(r, 'torch_ref_ms')} | "
              f"{f(r, 'kernel_fwd_bwd_ms')} | {f(r, 'fft_fwd_bwd_ms')} |")
    for r in results.get("decode", []):
        print(f"decode D={r['D']} L=1: kernel {r['kernel_ms']:.3f} ms, ops recurrence {r['recurrence_ms']:.3f} ms")
    print(f"roofline {COPY_CEILING_GBPS:.0f} GB/s (H200 copy, PyTorch); MLX `x * 1.0` copy here {ceiling:.0f} GB/s; "
          f"total {time.time() - T0:.0f} s")


if __name__ == "__main__":
    main()
