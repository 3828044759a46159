"""A Llama-style Transformer of matched size: the baseline the Megalodon paper compares against.

Pre-norm decoder blocks (RMSNorm, rotary embeddings, SwiGLU feed-forward, no biases), full causal
attention through each framework's fused scaled-dot-product attention, untied input and output
embeddings like mega200M. This module is framework-free (configuration, parameter count, random
weights as numpy arrays); ``llama_mlx`` and ``llama_torch`` build the models on the same weight names,
so one weight file feeds both.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np


@dataclass(frozen=True)
class LlamaArgs:
    num_layers: int
    model_dim: int
    num_heads: int
    ffn_hidden_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)


def weight_shapes(args: LlamaArgs) -> Dict[str, tuple]:
    """Every parameter of the model with its shape; linear weights are [out, in] as in both frameworks."""
    D, F, V = args.model_dim, args.ffn_hidden_dim, args.vocab_size
    shapes = {"embed.weight": (V, D)}
    for i in range(args.num_layers):
        p = f"layers.{i}"
        shapes.update({
            f"{p}.attention_norm.weight": (D,),
            f"{p}.wq.weight": (D, D), f"{p}.wk.weight": (D, D), f"{p}.wv.weight": (D, D),
            f"{p}.wo.weight": (D, D),
            f"{p}.ffn_norm.weight": (D,),
            f"{p}.w1.weight": (F, D), f"{p}.w3.weight": (F, D), f"{p}.w2.weight": (D, F),
        })
    shapes["norm.weight"] = (D,)
    shapes["output.weight"] = (V, D)
    return shapes


def parameter_count(args: LlamaArgs) -> int:
    return int(sum(np.prod(s) for s in weight_shapes(args).values()))


def matched_llama_args(mega_args, mega_parameters: int, head_dim: int = 64, multiple_of: int = 64) -> LlamaArgs:
    """Same depth, width, vocabulary and RoPE base as the Megalodon config; the SwiGLU hidden size
    (a multiple of ``multiple_of``) is the one that brings the total closest to ``mega_parameters``."""
    D = mega_args.model_dim
    if D % head_dim:
        raise ValueError(f"model_dim {D} is not a multiple of --llama-head-dim {head_dim}")
    base = LlamaArgs(num_layers=mega_args.num_layers, model_dim=D, num_heads=D // head_dim, ffn_hidden_dim=0,
                     vocab_size=mega_args.vocab_size, rope_theta=mega_args.rope_theta)
    per_unit = 3 * D * mega_args.num_layers           # parameters per unit of ffn_hidden_dim
    ideal = (mega_parameters - parameter_count(base)) / per_unit
    best = max(multiple_of, int(round(ideal / multiple_of)) * multiple_of)
    return LlamaArgs(**{**base.to_dict(), "ffn_hidden_dim": best})


def random_weights(args: LlamaArgs, seed: int = 0) -> Dict[str, np.ndarray]:
    """float32 weights: linears N(0, 1/sqrt(fan_in)) (output projections scaled down with depth so the
    residual stream stays O(1)), embeddings N(0, 1), norm scales 1 + N(0, 0.1) so they matter."""
    rng = np.random.default_rng(seed)
    out = {}
    depth_scale = 1.0 / np.sqrt(2.0 * args.num_layers)
    for key, shape in weight_shapes(args).items():
        if key.endswith("norm.weight"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif key == "embed.weight":
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
            if key.endswith(".wo.weight") or key.endswith(".w2.weight"):
                w *= depth_scale
        out[key] = w.astype(np.float32)
    return out


def save_weights(path, weights: Dict[str, np.ndarray]) -> None:
    np.savez(path, **weights)


def load_weights(path) -> Dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}
