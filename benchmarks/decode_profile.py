#!/usr/bin/env python3
"""Where one decoding step's time goes: whole model vs one layer vs the output projection.

    python benchmarks/decode_profile.py --preset mega200M --dtype bfloat16
"""
import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_megalodon.config import preset  # noqa: E402
from mlx_megalodon.mega import Model  # noqa: E402
from mlx_megalodon.utils import cast_model  # noqa: E402


def per_call(fn, n=200):
    for _ in range(10):
        mx.eval(fn())
    tic = time.perf_counter()
    for _ in range(n):
        out = fn()
        mx.async_eval(out)
    mx.eval(out)
    return (time.perf_counter() - tic) / n * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="mega200M")
    p.add_argument("--dtype", default="bfloat16")
    a = p.parse_args()
    args = preset(a.preset)
    model = Model(args)
    cast_model(model, getattr(mx, a.dtype))
    model.eval()
    mx.eval(model.parameters())
    cache = model.make_cache()
    state = {"y": mx.array([[1]])}

    def step():
        state["y"] = mx.argmax(model(state["y"], cache=cache)[:, -1], axis=-1)[:, None]
        return state["y"]
    print(f"full decode step: {per_call(step):.3f} ms")
    x = mx.random.normal((1, 1, args.model_dim)).astype(getattr(mx, a.dtype))
    print(f"output projection: {per_call(lambda: model.embed.as_linear(x) if args.share_emb else model.output.output(x)):.3f} ms")
    layer = model.layers[0]
    print(f"one layer, eager, no cache (L=1): {per_call(lambda: layer(x)):.3f} ms")
    print(f"one matmul D x D: {per_call(lambda: layer.mega.wh1(x)):.3f} ms")
    print(f"one add: {per_call(lambda: x + 1):.3f} ms")


if __name__ == "__main__":
    main()
