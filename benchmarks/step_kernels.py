"""Where a training step's GPU time goes, kernel by kernel (NVIDIA).

Three modes:

  --torch-profiler CSV  build the model and trainer as benchmarks/train_throughput.py does (one
                  document per row), run the warm-up steps, then record one step's kernels with
                  torch's profiler: CUPTI sees MLX's kernels too, those inside CUDA graphs one by
                  one. Writes each kernel's name, duration, start and stream. ``--steps N``
                  records N steps, ``--pipelined`` runs them as the training loop does, ``--host``
                  adds the host's ranges (graph build, mx.async_eval, wait, slow CUDA calls), and
                  ``--library-loop`` records the project's training loop (``train.train``, a numpy
                  batch per step) instead of steps on one resident batch. Then:

      python3 benchmarks/step_kernels.py --torch-profiler step.csv
      python3 benchmarks/step_kernels.py --summarize step.csv

  step (default)  the same step between cudaProfilerStart / cudaProfilerStop, for Nsight Compute:

      ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \\
          --csv --page raw python3 benchmarks/step_kernels.py --seq-len 4096 --rows 8 > step.csv

  --summarize CSV  group the recorded kernels (GEMM, CEMA, attention, TimestepNorm, cross entropy,
                  the rest by name) and print a markdown table of milliseconds per group, largest
                  first, with the top kernels of each; ``--json`` writes the same as JSON. With the
                  torch profiler's start times it also prints the timeline: the span of the step's
                  kernels, how much of it had a kernel running, and the largest idle gaps.

Kernels of one CUDA graph can run concurrently, so the per-kernel sum exceeds the span (eighth
session: 181.9 ms of kernels in a 148.5 ms span), and a kernel's duration grows when it shares the
GPU. The torch profiler mode ran on the H200 in the eighth session (BENCHMARKS.md). Nsight Compute
never produced a table here: `==ERROR== Failed to profile "copy_v"` at the step's first kernel, with
and without `--replay-mode application`; and Nsight Systems on that machine lacks the importer that
turns its capture into a report.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import glob
import io
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# Kernel name pattern -> group; first match wins (names as the CUDA backend of MLX 0.32 emits them).
GROUPS = [
    ("CEMA scan", r"cema_"),
    ("TimestepNorm", r"tnorm_|timestep_norm"),
    ("cross entropy (fused)", r"mgk_ce_|ce_fwd|ce_bwd"),
    ("chunk attention kernels", r"mgk_attn|chunk_attn"),
    ("attention (SDPA / flash / cuDNN)", r"sdpa|flash|attention|fmha|cudnn"),
    ("GEMM", r"gemm|sm90_xmma|cutlass|matmul|nvjet|xmma"),
    ("reductions", r"reduce|all_reduce|row_reduce|col_reduce|segmented"),
    ("softmax / logsumexp", r"softmax|logsumexp"),
    ("scan (cumsum)", r"scan"),
    ("copies / casts", r"copy|convert|cast"),
    ("fused elementwise (compiled)", r"fused|compiled"),
    ("elementwise", r"unary|binary|ternary|arange|gather|scatter|select"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, low):
            return group
    return "other"


def read_ncu_csv(path: str, host: bool = False):
    """(kernel name, ns, start ns or None) per recorded launch from `ncu --csv --page raw --metrics
    gpu__time_duration.sum`, or from --torch-profiler's CSV (which adds a start_ns column);
    ``host``: its host rows instead (stream "host": marked ranges and slow CUDA API calls)."""
    text = Path(path).read_text(errors="replace")
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit(f"{path}: no Nsight Compute CSV table in it (did ncu record any kernel?)")
    rows = list(csv.reader(io.StringIO(text[start:])))
    header = rows[0]
    try:
        name_col, time_col = header.index("Kernel Name"), header.index("gpu__time_duration.sum")
    except ValueError:
        raise SystemExit(f"{path}: expected columns 'Kernel Name' and 'gpu__time_duration.sum'")
    start_col = header.index("start_ns") if "start_ns" in header else None
    stream_col = header.index("stream") if "stream" in header else None
    if host and stream_col is None:
        return []                                # Nsight Compute's table: kernels only
    out = []
    for row in rows[1:]:
        if len(row) <= max(name_col, time_col, start_col or 0):
            continue
        if stream_col is not None and len(row) > stream_col and (row[stream_col] == "host") != host:
            continue
        value = row[time_col].replace(",", "")
        try:
            out.append((row[name_col], float(value), None if start_col is None else float(row[start_col])))
        except ValueError:                       # the units row under the header
            continue
    return out


def busy_summary(launches):
    """From (name, ns, start ns) launches: the span from the first start to the last end, the time
    at least one kernel ran, and the largest idle gaps (ms, and where they begin)."""
    spans = sorted((start, start + ns) for _, ns, start in launches)
    busy, gaps = 0.0, []
    run_start, run_end = spans[0]
    for start, end in spans[1:]:
        if start > run_end:
            busy += run_end - run_start
            gaps.append((start - run_end, run_end))
            run_start, run_end = start, end
        else:
            run_end = max(run_end, end)
    busy += run_end - run_start
    span = run_end - spans[0][0]
    gaps.sort(reverse=True)
    return {"span_ms": span / 1e6, "busy_ms": busy / 1e6, "idle_ms": (span - busy) / 1e6,
            "largest_gaps": [{"ms": g / 1e6, "at_ms": (at - spans[0][0]) / 1e6, "at_ns": at, "ns": g}
                             for g, at in gaps[:5]]}


def host_during(host_rows, start_ns: float, end_ns: float):
    """The host ranges that overlap [start_ns, end_ns): (name, ms inside the window, start ms)."""
    out = []
    for name, ns, start in host_rows:
        overlap = min(end_ns, start + ns) - max(start_ns, start)
        if overlap > 0:
            out.append((name, overlap / 1e6, start / 1e6))
    return out


def summarize(path: str, json_out: str | None):
    launches = read_ncu_csv(path)
    unit = 1e-6                                   # ns -> ms
    groups = defaultdict(lambda: {"ms": 0.0, "launches": 0, "kernels": defaultdict(float)})
    for name, ns, _ in launches:
        g = groups[group_of(name)]
        g["ms"] += ns * unit
        g["launches"] += 1
        g["kernels"][name.split("(")[0][:90]] += ns * unit
    total = sum(g["ms"] for g in groups.values())
    print(f"{len(launches)} kernel launches, {total:.1f} ms of GPU time ({path})")
    timeline = busy_summary(launches) if all(start is not None for _, _, start in launches) else None
    if timeline:
        gaps = ", ".join(f"{g['ms']:.1f} ms at {g['at_ms']:.1f}" for g in timeline["largest_gaps"][:3])
        print(f"timeline: {timeline['span_ms']:.1f} ms from first start to last end, a kernel running in "
              f"{timeline['busy_ms']:.1f} of them, idle {timeline['idle_ms']:.1f} (largest gaps: {gaps})")
        host_rows = read_ncu_csv(path, host=True)
        for g in timeline["largest_gaps"] if host_rows else []:
            during = host_during(host_rows, g["at_ns"], g["at_ns"] + g["ns"])
            g["host"] = [{"name": n, "ms": ms, "start_ms": st} for n, ms, st in during]
            print(f"  gap of {g['ms']:.1f} ms at {g['at_ms']:.1f}: host in "
                  + ("; ".join(f"{n[:50]} {ms:.1f} ms" for n, ms, _ in during) or "nothing recorded"))
    print()
    print("| group | ms | share | launches | largest kernels (ms) |")
    print("|---|---|---|---|---|")
    summary = []
    for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["ms"]):
        top = sorted(g["kernels"].items(), key=lambda kv: -kv[1])[:3]
        print(f"| {name} | {g['ms']:.1f} | {100 * g['ms'] / total:.0f}% | {g['launches']} | "
              + "; ".join(f"`{k[:60]}` {v:.1f}" for k, v in top) + " |")
        summary.append({"group": name, "ms": g["ms"], "launches": g["launches"],
                        "top": [{"kernel": k, "ms": v} for k, v in top]})
    if json_out:
        Path(json_out).write_text(json.dumps({"total_ms": total, "launches": len(launches), "groups": summary,
                                              "timeline": timeline}, indent=2) + "\n")


def json_object(text: str) -> dict:
    """argparse type of --overrides (here and in train_loop_throughput.py): a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def cuda_profiler():
    """(start, stop) callables of the CUDA runtime's profiler API, from whichever libcudart loads."""
    candidates = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    candidates += sorted(glob.glob("/usr/local/cuda/lib64/libcudart.so*"))
    for site in sys.path:  # site-packages included (wheels that bundle the runtime)
        candidates += sorted(glob.glob(f"{site}/**/libcudart.so*", recursive=True))
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
            return lib.cudaProfilerStart, lib.cudaProfilerStop
        except OSError:
            continue
    raise SystemExit("no libcudart found for cudaProfilerStart (looked in /usr/local/cuda and site-packages)")


# Host rows kept in the CSV (stream "host"): every range this script marks, and CUDA runtime /
# driver calls of at least this many microseconds (a synchronous copy or wait shows up as one).
HOST_CATEGORIES = ("cuda_runtime", "cuda_driver", "user_annotation")
HOST_MIN_US = 50.0


def write_kernel_csv(events, csv_out: str):
    """The GPU kernels (and copies) of a Chrome trace's events, in start order, as the CSV layout
    --summarize reads (ID, Kernel Name, gpu__time_duration.sum in ns) plus each one's start (ns
    after the first kernel's) and stream, from which overlap and idle time can be read. Host ranges
    (marked ranges, and CUDA API calls of HOST_MIN_US or more, when the trace has them) follow as
    rows of stream "host" on the same clock."""
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: e.get("ts", 0))
    if not kernels:
        raise SystemExit("torch's profiler recorded no GPU kernel (CUPTI did not see MLX's launches)")
    host = sorted((e for e in events if e.get("cat") in HOST_CATEGORIES
                   and (e.get("cat") == "user_annotation" or e.get("dur", 0) >= HOST_MIN_US)),
                  key=lambda e: e.get("ts", 0))
    t0 = kernels[0]["ts"]
    span_ms = (max(e["ts"] + e["dur"] for e in kernels) - t0) / 1e3
    with open(csv_out, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["ID", "Kernel Name", "gpu__time_duration.sum", "start_ns", "stream"])
        for i, e in enumerate(kernels):
            w.writerow([i, e["name"], f"{e['dur'] * 1e3:.0f}", f"{(e['ts'] - t0) * 1e3:.0f}",
                        e.get("args", {}).get("stream", "")])
        for i, e in enumerate(host, start=len(kernels)):
            w.writerow([i, e["name"], f"{e['dur'] * 1e3:.0f}", f"{(e['ts'] - t0) * 1e3:.0f}", "host"])
    print(f"{len(kernels)} kernels over {span_ms:.1f} ms from first start to last end"
          + (f", {len(host)} host ranges" if host else "") + f" -> {csv_out}", file=sys.stderr)


def torch_kernel_recorder(csv_out: str, host: bool = False):
    """(start, stop) that record every GPU kernel of this process through torch's profiler (CUPTI);
    ``host``: also the CPU side (the ranges marked with torch.profiler.record_function and the CUDA
    API calls), on the same clock.

    CUPTI sees the kernels of every library in the process, MLX's included, and reports the
    kernels inside CUDA graphs one by one; stop() writes them as the same CSV layout that
    --summarize reads from Nsight Compute (ID, Kernel Name, gpu__time_duration.sum in ns).
    """
    import tempfile
    import torch
    torch.zeros(1, device="cuda")                # a CUDA context for the profiler to attach to
    activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if host else [])
    prof = torch.profiler.profile(activities=activities)

    def stop():
        prof.stop()
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text()).get("traceEvents", [])
        write_kernel_csv(events, csv_out)

    return prof.start, stop


def profile_step(a):
    import mlx.core as mx
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.peers_workers import mlx_trainer_steps, random_batch
    from mlx_megalodon.config import preset
    from mlx_megalodon.mega import Model
    from mlx_megalodon.train import Trainer, TrainConfig, build_optimizer, use_large_cuda_graphs

    use_large_cuda_graphs()   # as the training CLI does, before the first GPU evaluation
    start, stop = torch_kernel_recorder(a.torch_profiler, a.host) if a.torch_profiler else cuda_profiler()
    mark = None
    if a.host:                                   # main() made sure --torch-profiler is given too
        import torch
        mark = torch.profiler.record_function
    if a.library_loop:
        return profile_library_loop(a, start, stop, mark)
    mx.random.seed(0)
    model = Model(preset(a.preset, **a.overrides))
    # one document per row, as train_throughput.py and peers.py measure (document_resets would
    # take the packed-documents attention path, a slower step)
    cfg = TrainConfig(seq_len=a.seq_len, batch_size=a.rows, compute_dtype=a.dtype, compile=True,
                      document_resets=False)
    trainer = Trainer(model, build_optimizer(cfg), cfg)
    batch = random_batch(model.args.vocab_size, a.rows, a.seq_len)
    # warm-up (compilation), then the recorded steps, run as train_throughput.py runs them
    mlx_trainer_steps(trainer, batch, a.warmup, a.pipelined)
    mx.synchronize()
    start()
    times, calls, losses, evals = mlx_trainer_steps(trainer, batch, a.steps, a.pipelined, mark=mark)
    mx.synchronize()
    stop()
    loop = "pipelined" if a.pipelined else "synchronous"
    print(f"profiled {a.steps} {loop} step(s): {a.rows} x {a.seq_len} tokens, loss {losses[-1].item():.3f}; "
          f"step s {[round(t, 4) for t in times]}, graph build s {[round(t, 4) for t in calls]}, "
          f"async_eval s {[round(t, 4) for t in evals]}", file=sys.stderr)


def profile_library_loop(a, start, stop, mark):
    """Record the training loop itself (``train.train``, as ``python -m mlx_megalodon.train`` runs it:
    a numpy batch drawn and converted every step) instead of the benchmarks' step on one resident
    batch: ``a.warmup + a.steps`` iterations, recording from when step ``a.warmup``'s loss is read."""
    import mlx.core as mx
    from benchmarks.train_loop_throughput import measure
    started = []

    def on_step(step, loss):   # train reads each loss one step late, so the next step is queued
        if step == a.warmup and not started:
            mx.synchronize()
            start()
            started.append(step)
    r = measure(a.preset, a.seq_len, a.rows, a.warmup + a.steps, batches=a.batches, dtype=a.dtype, mark=mark,
                on_step=on_step, **a.overrides)
    mx.synchronize()
    stop()
    print(f"profiled the training loop (train.train, {a.batches} batches) from step {a.warmup} to {r['iters']}: "
          f"{a.rows} x {a.seq_len} tokens, loss {r['last_loss']:.3f}, {r['tokens_per_s']:,.0f} tokens/s over its timed steps", file=sys.stderr)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summarize", metavar="CSV", help="summarize an ncu --csv --page raw file instead")
    p.add_argument("--json", help="with --summarize: also write the groups as JSON here")
    p.add_argument("--torch-profiler", metavar="CSV",
                   help="record the step's kernels with torch's profiler (CUPTI) into CSV, no Nsight needed")
    p.add_argument("--preset", default="mega200M")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=1, help="steps recorded (default 1)")
    p.add_argument("--pipelined", action="store_true",
                   help="run the steps as train_throughput.py --pipelined does (each queued before the "
                        "previous one is waited for), to see whether the host hides the gap between steps")
    p.add_argument("--host", action="store_true",
                   help="with --torch-profiler: also record the host side (graph build, mx.async_eval, the "
                        "wait, CUDA API calls of 50 us or more) on the kernels' clock; --summarize then "
                        "says what the host was doing in each of the largest idle gaps")
    p.add_argument("--library-loop", action="store_true",
                   help="record the project's training loop (train.train: a numpy batch per step, the loss "
                        "read a step late: always pipelined) instead of the benchmarks' steps on one resident "
                        "batch; with --host its batch draw, graph build and async_eval are marked")
    p.add_argument("--batches", default="numpy", choices=("numpy", "resident", "staged"),
                   help="with --library-loop: how batches reach the loop (train_loop_throughput.py --batches)")
    p.add_argument("--overrides", type=json_object, default={},
                   help="JSON of ModelArgs fields over the preset's (tests)")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args(argv)
    if a.host and not a.torch_profiler:
        p.error("--host needs --torch-profiler")
    if a.seq_len < 1 or a.rows < 1 or a.warmup < 1 or a.steps < 1:
        p.error("--seq-len, --rows, --warmup and --steps must be at least 1")
    if a.summarize:
        summarize(a.summarize, a.json)
    else:
        profile_step(a)


if __name__ == "__main__":
    main()
