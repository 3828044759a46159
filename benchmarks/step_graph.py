#!/usr/bin/env python3
"""How many operations one training step's graph holds, by type: per-tensor AdamW against FlatAdamW.

    python benchmarks/step_graph.py --layers 12 --model-dim 64

Builds the Trainer's single-micro-batch step (uncompiled, so every operation stays a node), for a
model with the preset's layer count and parameter structure but narrow widths so that it runs on
any machine. It counts the nodes of the step's graph with ``mx.export_to_dot``. Views (reshape,
slice, transpose, broadcast, ...) launch no kernel on a GPU. Every other node is a kernel, or a
piece of one once ``mx.compile`` fuses elementwise chains.

The count depends on the parameter structure, not on the widths. MLX's CUDA backend spends host
time on every kernel it encodes (BENCHMARKS.md, eighth session), so this is the host-side work
that the flat optimizer removes. It is not a timing.

On MLX's CPU backend the graph has the pure-ops CEMA and TimestepNorm. A GPU graph has their
kernels instead, so its absolute counts are lower; the optimizer's share is the same.
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_megalodon.config import ModelArgs, preset  # noqa: E402
from benchmarks.peers_workers import random_batch  # noqa: E402
from mlx_megalodon.train import Trainer, TrainConfig, build_optimizer, new_model  # noqa: E402

VIEWS = {"Reshape", "Slice", "Squeeze", "ExpandDims", "Transpose", "Broadcast", "Copy", "StopGradient",
         "Depends", "AsStrided"}


def count_step(args: ModelArgs, seq_len: int, rows: int, dtype: str, flat: bool) -> Counter:
    mx.random.seed(0)
    model = new_model(args, 0)
    cfg = TrainConfig(seq_len=seq_len, batch_size=rows, compute_dtype=dtype, compile=False,
                      document_resets=False, flat_optimizer=flat)
    trainer = Trainer(model, build_optimizer(cfg), cfg)
    batch = random_batch(args.vocab_size, rows, seq_len)
    loss, _, norm = trainer.step([batch])      # the first step initializes the optimizer's state
    mx.eval(loss, norm, trainer.state)
    loss, _, norm = trainer._fused(*trainer._arrays(batch))   # lazy: the whole step as a graph
    dot = io.StringIO()
    mx.export_to_dot(dot, loss, norm, *[v for _, v in tree_flatten(trainer.state)])
    return Counter(re.findall(r'label ="([A-Za-z_]+)', dot.getvalue()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mega200M", help="layer count and structure (widths: the options below)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--model-dim", type=int, default=64, help="narrow widths: model_dim; the rest follow it")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--json", default=None, help="also write the counts here")
    a = p.parse_args(argv)
    for name in ("layers", "model_dim", "seq_len", "rows"):
        value = getattr(a, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.model_dim % 8:
        p.error("--model-dim must be a multiple of 8")
    d = a.model_dim
    base = preset(a.preset).to_dict()
    args = ModelArgs.from_dict({**base, "num_layers": a.layers or base["num_layers"], "model_dim": d,
                                "z_dim": d // 2, "value_dim": d, "ffn_hidden_dim": 2 * d, "vocab_size": 256,
                                "chunk_size": a.seq_len, "norm_num_groups": 8, "cema_ndim": 4,
                                "num_heads": 1})
    results = {}
    for name, flat in (("per-tensor AdamW", False), ("FlatAdamW", True)):
        counts = count_step(args, a.seq_len, a.rows, a.dtype, flat)
        results[name] = {"nodes": sum(counts.values()),
                         "non_view_nodes": sum(v for k, v in counts.items() if k not in VIEWS),
                         "by_type": dict(counts.most_common())}
    params = len(tree_flatten(new_model(args, 0).trainable_parameters()))
    print(f"{args.num_layers} layers, {params} parameter tensors, {a.rows} x {a.seq_len} tokens, {a.dtype}, "
          f"MLX {mx.__version__} ({mx.default_device()})\n")
    print("| optimizer | graph nodes | non-view nodes |")
    print("|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['nodes']:,} | {r['non_view_nodes']:,} |")
    base_counts, flat_counts = (Counter(r["by_type"]) for r in results.values())
    changed = sorted(set(base_counts) | set(flat_counts), key=lambda k: flat_counts[k] - base_counts[k])
    print("\nlargest changes: " + ", ".join(f"{k} {base_counts[k]} -> {flat_counts[k]}" for k in changed[:8]))
    if a.json:
        Path(a.json).write_text(json.dumps({"layers": args.num_layers, "parameter_tensors": params,
                                            "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
