#!/usr/bin/env python3
"""Where a training step's time goes: forward+backward of each piece of one Megalodon layer, timed
alone at the same shapes as the full step, next to the full step itself.

    python benchmarks/train_profile.py --preset mega200M --seq-lens 4096,32768 --tokens-per-step 32768

Each piece runs as ``mx.compile(mx.value_and_grad(...))`` over its own parameters and input, in the
Trainer's dtypes (bf16 compute, float32 CEMA / norm parameters). Pieces of the attention block:
TimestepNorm, CEMA, the projections and gates around them (everything in ``_gates`` but TimestepNorm
and CEMA), chunk attention, the output projection; then the normalized FFN, a whole layer, the
embedding + output head + cross entropy, and the optimizer update. "x layers" multiplies per-layer
pieces by the layer count, so the column sums to an estimate of the step without the update.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_megalodon.config import ModelArgs, preset  # noqa: E402
from mlx_megalodon.cross_entropy_kernels import cross_entropy_kernel, cross_entropy_ops  # noqa: E402
from mlx_megalodon.mega import Model  # noqa: E402
from mlx_megalodon.moving_average_gated_attention import chunk_attention  # noqa: E402
from mlx_megalodon.train import DTYPES, _fused_loss_head, cast_params  # noqa: E402
from benchmarks.long_context import device_name  # noqa: E402


def timed(fn, *args, repeats=5, warmup=2):
    for _ in range(warmup):
        mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - tic)
    return float(np.median(times)) * 1e3


def grad_of(module, f, inputs):
    """compiled value_and_grad of sum(f(*inputs)) over module's parameters and every floating input
    (as in a real step, where each piece also passes its input's gradient back)."""
    def loss(params, *inputs):
        module.update(params)
        out = f(*inputs)
        return sum(o.astype(mx.float32).sum() for o in (out if isinstance(out, tuple) else (out,)))
    argnums = (0,) + tuple(1 + i for i, a in enumerate(inputs) if mx.issubdtype(a.dtype, mx.floating))
    return mx.compile(mx.value_and_grad(loss, argnums=argnums))


def profile(args, seq_len, rows, dtype_name):
    dtype = DTYPES[dtype_name]
    mx.random.seed(0)
    model = Model(args)
    model.update(cast_params(model.parameters(), dtype))
    block = model.layers[0]
    mega = block.mega
    x = (mx.random.normal((rows, seq_len, args.model_dim)) * 0.5).astype(dtype)
    out = {}

    def piece(name, module, f, *inputs):
        saved = module.parameters()
        fn = grad_of(module, f, inputs)
        out[name] = timed(fn, module.trainable_parameters(), *inputs)
        module.update(saved)   # tracing left placeholders in the module
        print(f"  {name:<28s} {out[name]:8.2f} ms", flush=True)

    xn, _ = mega.timenorm(x)
    (q, k, v), r, mx_, _, _ = mega._gates(x, None, None, False)
    mx.eval(xn, q, k, v, r, mx_)
    piece("timestep_norm", mega.timenorm, lambda a: mega.timenorm(a)[0], x)
    piece("cema", mega.cema, lambda a: mega.cema(a)[0], xn)
    piece("gates_total (norm+cema+proj)", mega, lambda a: mega._gates(a, None, None, False)[0], x)
    piece("chunk_attention", mega, lambda a, b, c: chunk_attention(a, b, c, mega.chunk_size, mega._periods)[0],
          q, k, v)
    attn = chunk_attention(q, k, v, mega.chunk_size, mega._periods)[0]
    piece("output_proj", mega, lambda a, c, d: mega._output(x, a, c, d), attn, r, mx_)
    y = mega(x)
    mx.eval(y)
    piece("nffn", block.nffn, lambda a: block.nffn(a, x), y)
    piece("layer", block, lambda a: block(a), x)

    tokens = mx.array(np.random.default_rng(0).integers(0, args.vocab_size, (rows, seq_len)).astype(np.int32))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.output = model.embed, model.output

        def __call__(self, toks, h):
            h = h + self.embed(toks).astype(h.dtype)
            if use_ce_kernel:   # as train.loss_fn: compute-dtype logits into the fused kernels
                features, _ = self.output.final_norm(h, None, None)
                logits = features @ self.output.head_weight(self.embed).T
                return cross_entropy_kernel(logits, toks, validate=False).mean()
            return cross_entropy_ops(self.output(h, self.embed), toks).mean()

    head = Head()
    use_ce_kernel = _fused_loss_head(model, tokens) is not None   # the training loss's own decision
    out["loss_path"] = "fused cross-entropy kernel" if use_ce_kernel else "ops"
    piece("embed+head+loss", head, lambda t, h: head(t, h), tokens, x)
    n = args.num_layers
    est = n * out["layer"] + out["embed+head+loss"]
    out["estimate_step_ms"] = est
    print(f"  {'= layers x ' + str(n) + ' + head':<28s} {est:8.2f} ms", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mega200M")
    p.add_argument("--tiny", action="store_true", help="the 2-layer, 128-dim config of peers.py --tiny (CPUs)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq-lens", default="4096,32768")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    overrides = {} if a.layers is None else {"num_layers": a.layers}
    if a.tiny:
        from benchmarks.peers import TINY
        args = ModelArgs.from_dict({**TINY, **overrides})
    else:
        args = preset(a.preset, **overrides)
    meta = {"device": device_name(), "mlx": mx.__version__, "model": "tiny" if a.tiny else a.preset, "dtype": a.dtype,
            "command": "python " + " ".join(sys.argv)}
    print(json.dumps(meta), flush=True)
    results = []
    for L in (int(s) for s in a.seq_lens.split(",")):
        rows = max(1, a.tokens_per_step // L)
        print(f"seq {L} x {rows} rows (fwd+bwd ms):", flush=True)
        r = profile(args, L, rows, a.dtype)
        results.append({"seq_len": L, "rows": rows, **r})
        if a.out:
            Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    if len(results) > 1:
        print_ratios(results)


def print_ratios(results):
    """Each piece's time at every length against the first length's (same tokens per step): which
    pieces make a long-sequence step slower or faster than the short one."""
    first = results[0]
    pieces = [k for k, v in first.items() if isinstance(v, float)]
    names = [f"{r['rows']} x {r['seq_len']}" for r in results]
    print("\n| piece (fwd+bwd ms) | " + " | ".join(names) + " | " +
          " | ".join(f"{n} - {names[0]}" for n in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(results) - 1))
    for k in pieces:
        cells = [f"{r[k]:.2f}" if k in r else "-" for r in results]
        diffs = [f"{r[k] - first[k]:+.2f}" if k in r else "-" for r in results[1:]]
        print(f"| {k} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")


if __name__ == "__main__":
    main()
