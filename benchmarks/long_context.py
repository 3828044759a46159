#!/usr/bin/env python3
"""Prefill and decode speed and peak memory against context length, with random weights.

    python benchmarks/long_context.py --preset mega200M --contexts 4K,32K,128K,1M --dtype bfloat16
    python benchmarks/long_context.py --tiny --contexts 4K,32K,128K,1M

Each context is read with chunk-wise prefill (``--prefill-step-size`` tokens per call) into a fresh
cache, then ``--decode-tokens`` tokens are decoded one at a time. Peak memory is MLX's peak over
that whole run. Results go to a JSON file and, with --plot, a PNG.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_megalodon.config import ModelArgs, parameter_count, preset  # noqa: E402
from mlx_megalodon.generate import parse_context_length  # noqa: E402
from mlx_megalodon.mega import Model  # noqa: E402
from mlx_megalodon.utils import cast_model  # noqa: E402

TINY = dict(num_layers=4, model_dim=128, z_dim=64, value_dim=256, num_heads=1, ffn_hidden_dim=256,
            cema_ndim=16, chunk_size=256, norm_num_groups=8, vocab_size=32000)


def device_name() -> str:
    if mx.cuda.is_available() if hasattr(mx, "cuda") else False:
        import subprocess
        try:
            return "MLX CUDA: " + subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                                 capture_output=True, text=True).stdout.strip()
        except OSError:
            return "MLX CUDA"
    if mx.metal.is_available():
        return "MLX Metal: " + platform.processor()
    return f"MLX CPU: {platform.processor() or platform.machine()}"


def run_context(model, context: int, step: int, decode_tokens: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    V = model.args.vocab_size
    cache = model.make_cache()
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    done = 0
    logits = None
    while done < context:
        n = min(step, context - done)
        piece = mx.array(rng.integers(0, V, size=(1, n)), dtype=mx.int32)
        logits = model(piece, cache=cache, last_only=True)[:, -1]
        mx.eval(logits, [c.state for c in cache])
        done += n
    prefill_s = time.perf_counter() - tic
    y = mx.argmax(logits, axis=-1)[:, None]
    mx.eval(y)
    tic = time.perf_counter()
    for _ in range(decode_tokens):
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[:, None]
        mx.async_eval(y)
    mx.eval(y)
    decode_s = time.perf_counter() - tic
    return {"context": context, "prefill_tokens_per_s": context / prefill_s, "prefill_s": prefill_s,
            "decode_tokens_per_s": decode_tokens / decode_s, "peak_memory_gb": mx.get_peak_memory() / 1e9}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default=None, help="e.g. mega200M")
    g.add_argument("--tiny", action="store_true", help="a 4-layer, 128-dim model for CPUs")
    p.add_argument("--contexts", default="4K,32K,128K,1M")
    p.add_argument("--prefill-step-size", type=int, default=None, help="default: 4 chunks")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="JSON results file")
    p.add_argument("--plot", default=None, help="PNG of memory and tokens/s against context")
    a = p.parse_args(argv)
    args = preset(a.preset) if a.preset else ModelArgs.from_dict(TINY)
    mx.random.seed(0)
    model = Model(args)
    cast_model(model, getattr(mx, a.dtype))
    mx.eval(model.parameters())
    model.eval()
    step = a.prefill_step_size or 4 * args.chunk_size
    contexts = [parse_context_length(c) for c in a.contexts.split(",")]
    meta = {"device": device_name(), "mlx": mx.__version__, "model": a.preset or "tiny",
            "parameters": parameter_count(args), "dtype": a.dtype, "prefill_step_size": step,
            "decode_tokens": a.decode_tokens, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(meta))
    run_context(model, min(contexts[0], step), step, 4)  # warm-up (kernel compilation, allocations)
    rows = []
    for c in contexts:
        r = run_context(model, c, step, a.decode_tokens)
        rows.append(r)
        print(f"context {c:>9,d}: prefill {r['prefill_tokens_per_s']:>12,.0f} tok/s ({r['prefill_s']:.2f} s)  "
              f"decode {r['decode_tokens_per_s']:>8,.1f} tok/s  peak {r['peak_memory_gb']:.3f} GB", flush=True)
    base = rows[0]
    print(f"peak memory ratio {rows[-1]['context']:,}/{base['context']:,}: "
          f"{rows[-1]['peak_memory_gb'] / base['peak_memory_gb']:.3f}; decode ratio: "
          f"{rows[-1]['decode_tokens_per_s'] / base['decode_tokens_per_s']:.3f}")
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    if a.plot:
        plot(rows, meta, a.plot)


def plot(rows, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ctx = [r["context"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(axes, ["peak_memory_gb", "prefill_tokens_per_s", "decode_tokens_per_s"],
                              ["peak memory (GB)", "prefill tokens/s", "decode tokens/s"]):
        ax.plot(ctx, [r[key] for r in rows], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{meta['model']} ({meta['parameters'] / 1e6:.1f}M params, {meta['dtype']}) on {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
