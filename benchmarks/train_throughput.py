#!/usr/bin/env python3
"""Training-step throughput and peak memory for a preset-shaped model with random weights.

    python benchmarks/train_throughput.py --preset mega200M --seq-lens 4096,32768 --tokens-per-step 32768

Each step is one AdamW update (forward + backward) through the project's own Trainer (bf16
compute, float32 CEMA/norms/master weights), over batches of ``tokens_per_step / seq_len`` rows, so
every sequence length does the same work per step. Reports tokens/s (median of timed steps after
warm-up) and MLX's peak memory.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_megalodon.config import parameter_count, preset  # noqa: E402
from mlx_megalodon.data import Batch  # noqa: E402
from mlx_megalodon.mega import Model  # noqa: E402
from mlx_megalodon.train import Trainer, TrainConfig, build_optimizer  # noqa: E402
from benchmarks.long_context import device_name  # noqa: E402


def measure(args, seq_len, rows, steps, warmup, grad_checkpoint, compile_step, dtype):
    mx.random.seed(0)
    model = Model(args)
    cfg = TrainConfig(seq_len=seq_len, batch_size=rows, compute_dtype=dtype, grad_checkpoint=grad_checkpoint,
                      compile=compile_step, document_resets=False)
    trainer = Trainer(model, build_optimizer(cfg), cfg)
    rng = np.random.default_rng(0)
    toks = rng.integers(0, args.vocab_size, size=(rows, seq_len + 1)).astype(np.int32)
    batch = Batch(toks[:, :-1], toks[:, 1:], np.ones((rows, seq_len), np.float32),
                  np.zeros((rows, seq_len), np.int32))
    times = []
    mx.reset_peak_memory()
    for i in range(warmup + steps):
        tic = time.perf_counter()
        loss, ntoks, norm = trainer.step([batch])
        mx.eval(loss, trainer.state)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    t = float(np.median(times))
    return {"seq_len": seq_len, "rows": rows, "tokens_per_step": rows * seq_len, "step_s": t,
            "tokens_per_s": rows * seq_len / t, "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "loss": float(loss.item()), "grad_checkpoint": grad_checkpoint}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mega200M")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (smaller runs)")
    p.add_argument("--seq-lens", default="4096,32768")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    overrides = {} if a.layers is None else {"num_layers": a.layers}
    args = preset(a.preset, **overrides)
    meta = {"device": device_name(), "mlx": mx.__version__, "model": a.preset, "parameters": parameter_count(args),
            "dtype": a.dtype, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    rows_out = []
    for L in (int(x) for x in a.seq_lens.split(",")):
        rows = max(1, a.tokens_per_step // L)
        r = measure(args, L, rows, a.steps, a.warmup, a.grad_checkpoint, not a.no_compile, a.dtype)
        rows_out.append(r)
        print(f"seq {L:>7,d} x {rows:>3d} rows: {r['tokens_per_s']:>10,.0f} tok/s  step {r['step_s']:.3f} s  "
              f"peak {r['peak_memory_gb']:.2f} GB  loss {r['loss']:.3f}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "results": rows_out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
