"""Where a training step's GPU time goes, kernel by kernel (NVIDIA, through Nsight Compute).

Two modes:

  step (default)  build the model and trainer as benchmarks/train_throughput.py does, run the warm-up
                  steps, then one step between cudaProfilerStart / cudaProfilerStop, so that
                  Nsight Compute records that step's kernels only:

      ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \\
          --csv --page raw python3 benchmarks/step_kernels.py --seq-len 4096 --rows 8 > step.csv

  --summarize CSV  group the recorded kernels (GEMM, CEMA, attention, TimestepNorm, cross entropy,
                  the rest by name) and print a markdown table of milliseconds per group, largest
                  first, with the top kernels of each; ``--json`` writes the same as JSON.

Nsight Compute runs the kernels one at a time, so the sum is the step's GPU busy time without
overlap or launch gaps; compare it with the step time train_throughput.py measures.

Status: the summary is tested (tests/test_benchmark_scripts.py); the profiled step has not produced
a table yet. Its one run on the H200 (fifth session, the command above) stopped at the step's first
kernel with `==ERROR== Failed to profile "copy_v"`. The seventh session tried
`--replay-mode application` (one pass per metric, nothing saved and restored around a kernel): the
same error, and the run then hung until its 200 s limit. Not yet tried: `--graph-profiling graph`
(MLX's CUDA backend launches kernels through CUDA graphs). `benchmarks/train_profile.py` times the
step's pieces without a profiler and has run on the H200.
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


def read_ncu_csv(path: str):
    """(kernel name, ns) per recorded launch from `ncu --csv --page raw --metrics gpu__time_duration.sum`."""
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
    out = []
    for row in rows[1:]:
        if len(row) <= max(name_col, time_col):
            continue
        value = row[time_col].replace(",", "")
        try:
            out.append((row[name_col], float(value)))
        except ValueError:                       # the units row under the header
            continue
    return out


def summarize(path: str, json_out: str | None):
    launches = read_ncu_csv(path)
    unit = 1e-6                                   # ns -> ms
    groups = defaultdict(lambda: {"ms": 0.0, "launches": 0, "kernels": defaultdict(float)})
    for name, ns in launches:
        g = groups[group_of(name)]
        g["ms"] += ns * unit
        g["launches"] += 1
        g["kernels"][name.split("(")[0][:90]] += ns * unit
    total = sum(g["ms"] for g in groups.values())
    print(f"{len(launches)} kernel launches, {total:.1f} ms of GPU time ({path})\n")
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
        Path(json_out).write_text(json.dumps({"total_ms": total, "launches": len(launches), "groups": summary},
                                             indent=2) + "\n")


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


def profile_step(a):
    import mlx.core as mx
    import numpy as np
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from mlx_megalodon.config import preset
    from mlx_megalodon.data import Batch
    from mlx_megalodon.mega import Model
    from mlx_megalodon.train import Trainer, TrainConfig, build_optimizer

    start, stop = cuda_profiler()
    mx.random.seed(0)
    model = Model(preset(a.preset))
    cfg = TrainConfig(seq_len=a.seq_len, batch_size=a.rows, compute_dtype=a.dtype, compile=True)
    trainer = Trainer(model, build_optimizer(cfg), cfg)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, model.args.vocab_size, size=(a.rows, a.seq_len + 1)).astype(np.int32)
    batch = Batch(toks[:, :-1], toks[:, 1:], np.ones((a.rows, a.seq_len), np.float32),
                  np.zeros((a.rows, a.seq_len), np.int32))
    for i in range(a.warmup + 1):
        if i == a.warmup:
            mx.synchronize()
            start()
        loss, _, _ = trainer.step([batch])
        mx.eval(loss, trainer.state)
        mx.synchronize()
    stop()
    print(f"profiled one step: {a.rows} x {a.seq_len} tokens, loss {loss.item():.3f}", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--summarize", metavar="CSV", help="summarize an ncu --csv --page raw file instead")
    p.add_argument("--json", help="with --summarize: also write the groups as JSON here")
    p.add_argument("--preset", default="mega200M")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args(argv)
    if a.seq_len < 1 or a.rows < 1 or a.warmup < 1:
        p.error("--seq-len, --rows and --warmup must be at least 1")
    if a.summarize:
        summarize(a.summarize, a.json)
    else:
        profile_step(a)


if __name__ == "__main__":
    main()
