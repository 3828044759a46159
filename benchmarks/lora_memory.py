#!/usr/bin/env python3
"""Peak memory of one LoRA training step (forward, backward, Adam update) at growing sequence
lengths, for a small randomly initialized Megalodon model.

Megalodon attends only inside chunks (chunk-wise attention) and runs CEMA / TimestepNorm as
linear-time scans, so activation memory should grow linearly with the sequence length: the
"MB per 1K tokens" column should stay flat.

    python benchmarks/lora_memory.py                       # 1K .. 16K, with and without --grad-checkpoint
    python benchmarks/lora_memory.py --lengths 1024 2048 --no-checkpoint-column

Each measurement: mx.clear_cache(); mx.reset_peak_memory(); one step; mx.get_peak_memory().
"Weights" is the active memory before the step (model + adapters + optimizer state after a
warm-up step at the shortest length); "activations" is peak minus that.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402

from mlx_megalodon.config import ModelArgs  # noqa: E402
from mlx_megalodon.lora import enable_grad_checkpoint, masked_loss, prepare_model  # noqa: E402
from mlx_megalodon.mega import Model  # noqa: E402

SMALL = dict(num_layers=4, model_dim=256, z_dim=64, value_dim=512, num_heads=1, ffn_hidden_dim=512,
             cema_ndim=16, chunk_size=1024, norm_num_groups=16, vocab_size=8192)


def build(args: ModelArgs, rank: int) -> Model:
    mx.random.seed(0)
    model = Model(args)
    mx.eval(model.parameters())
    prepare_model(model, "lora", -1, {"rank": rank})
    mx.eval(model.parameters())
    model.train()
    return model


def step_fn(model, optimizer):
    loss_and_grad = nn.value_and_grad(model, masked_loss)

    def step(x, y, m):
        (loss, _), grads = loss_and_grad(model, x, y, m)
        optimizer.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), optimizer.state)
        return loss.item()
    return step


def measure(model, step, length: int, batch: int, vocab: int):
    rng = np.random.default_rng(length)
    toks = mx.array(rng.integers(0, vocab, size=(batch, length + 1)), dtype=mx.int32)
    x, y, m = toks[:, :-1], toks[:, 1:], mx.ones((batch, length))
    mx.eval(x, y, m)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tic = time.perf_counter()
    loss = step(x, y, m)
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    assert np.isfinite(loss), loss
    return base, peak, seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=SMALL["chunk_size"])
    p.add_argument("--no-checkpoint-column", action="store_true", help="skip the --grad-checkpoint runs")
    a = p.parse_args(argv)
    args = ModelArgs.from_dict({**SMALL, "chunk_size": a.chunk_size})
    print(f"device: {mx.default_device()}  mlx {mx.__version__}")
    print(f"model: {args.num_layers} layers, model_dim {args.model_dim}, z_dim {args.z_dim}, value_dim "
          f"{args.value_dim}, ffn {args.ffn_hidden_dim}, chunk {args.chunk_size}, vocab {args.vocab_size}; "
          f"LoRA rank {a.rank} on every layer's wz/wv/wr/wh1/wh2/fc1/fc2; batch {a.batch_size}")
    modes = [False] if a.no_checkpoint_column else [False, True]
    rows = {}
    for ckpt in modes:
        model = build(args, a.rank)
        enable_grad_checkpoint(model, ckpt)
        step = step_fn(model, optim.Adam(learning_rate=1e-4))
        measure(model, step, min(a.lengths), a.batch_size, args.vocab_size)      # warm-up: Adam state
        for L in a.lengths:
            rows[(ckpt, L)] = measure(model, step, L, a.batch_size, args.vocab_size)
            base, peak, sec = rows[(ckpt, L)]
            print(f"  grad_checkpoint={ckpt!s:5s} L={L:6d}: peak {peak / 2**30:.3f} GiB, {sec:.1f} s", flush=True)
        del model, step
        mx.clear_cache()

    print()
    head = "| tokens | peak GiB | activations GiB | MB per 1K tokens | step s |"
    if len(modes) == 2:
        head += " peak GiB, --grad-checkpoint | MB per 1K tokens | step s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for L in a.lengths:
        cells = []
        for ckpt in modes:
            base, peak, sec = rows[(ckpt, L)]
            act = peak - base
            per_k = act / 2**20 / (L * a.batch_size / 1024)
            cells.append((peak, act, per_k, sec))
        line = f"| {L:,} | {cells[0][0] / 2**30:.3f} | {cells[0][1] / 2**30:.3f} | {cells[0][2]:.1f} | {cells[0][3]:.1f} |"
        if len(cells) == 2:
            line += f" {cells[1][0] / 2**30:.3f} | {cells[1][2]:.1f} | {cells[1][3]:.1f} |"
        print(line)


if __name__ == "__main__":
    main()
