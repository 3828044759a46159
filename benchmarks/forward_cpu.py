#!/usr/bin/env python3
"""Forward tokens/s of mega200M-shaped layers: MLX vs torch_ref on the same random weights.

    python benchmarks/forward_cpu.py --layers 2 --length 4096
"""
import argparse
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from factory import random_upstream_state_dict  # noqa: E402
from mlx_megalodon.checkpoint import upstream_to_mlx  # noqa: E402
from mlx_megalodon.config import preset  # noqa: E402
from mlx_megalodon.mega import Model  # noqa: E402
from torch_ref import Mega  # noqa: E402


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mega200M")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    args = preset(a.preset, num_layers=a.layers)
    sd = random_upstream_state_dict(args)
    ref = Mega(args)
    ref.load_state_dict(sd)
    ref.eval()
    model = Model(args)
    model.load_weights(list(model.sanitize({k: mx.array(v.numpy()) for k, v in upstream_to_mlx(args, sd).items()}).items()))
    model.eval()
    toks = np.random.default_rng(0).integers(0, args.vocab_size, size=(1, a.length))
    mt, tt = mx.array(toks), torch.from_numpy(toks)

    def run_mlx():
        mx.eval(model(mt))

    def run_torch():
        with torch.no_grad():
            ref(tt)
    t_mlx, t_torch = timed(run_mlx, a.repeats), timed(run_torch, a.repeats)
    err = np.abs(np.array(model(mt)) - ref(tt).detach().numpy()).max()
    print(f"{a.preset} x {a.layers} layers, L={a.length}, fp32, {platform.machine()} "
          f"({torch.get_num_threads()} torch threads), mlx {mx.__version__}, torch {torch.__version__}")
    print(f"| MLX ({mx.default_device()}) | {a.length / t_mlx:,.0f} tok/s | {t_mlx:.2f} s |")
    print(f"| torch_ref (cpu) | {a.length / t_torch:,.0f} tok/s | {t_torch:.2f} s |")
    print(f"max |logit difference| {err:.2e}")


if __name__ == "__main__":
    main()
