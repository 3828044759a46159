"""AdamW over flat float32 buffers: one update for all parameters instead of one per tensor.

A mega200M training step has about 200 parameter tensors. Per tensor, the step casts the master
weight to the compute dtype and the gradient back, squares and sums the gradient for the global
norm, and runs AdamW. On the H200 that is about 1,200 of the step's 4,000 kernels, and MLX's CUDA
backend spends host time on every kernel it encodes, nearly as long as the GPU's work
(BENCHMARKS.md, eighth session). Here the master weights, moments and gradients live in a few
flat buffers, one per group of parameters that share a compute dtype and a weight-decay rule. Each
step casts, clips and updates per group, not per tensor.

- The model's parameters are views into the flat master buffer; slices cost no kernel. Each one
  starts at a multiple of ALIGN elements (zeros in between, which the update keeps at zero).
- ``split_op`` hands the model its parameters and, as its vjp, concatenates their gradients.
- The maths is ``AdamW``'s (mlx_megalodon.train): PyTorch-style bias correction and decoupled
  decay on the parameters ``decay_filter`` selects. Only the global norm's summation order
  differs.
- Checkpoints keep AdamW's per-parameter layout (``checkpoint_state``), so a run can resume with
  either optimizer.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from .config import is_full_precision_key


# Every parameter starts at a multiple of this many elements (256 bytes in float32): kernels that
# read a weight with vector loads, and cuBLAS, may rely on an aligned start.
ALIGN = 64


# Each group's vector is a multiple of this long, so that its sum of squares can be taken in
# 4,096-element pieces (train.global_norm): one float32 sum over 10^8 elements drops most terms on
# MLX's CPU backend.
GROUP_ALIGN = 4096


def padded(size: int, align: int = ALIGN) -> int:
    return -(-size // align) * align


@lru_cache(maxsize=None)
def split_op(shapes: Tuple[Tuple[int, ...], ...]):
    """flat -> one array per shape, each a slice starting at a multiple of ALIGN; the vjp
    concatenates the cotangents, zeros in the padding between them and at the end."""
    sizes = [math.prod(s) for s in shapes]

    @mx.custom_function
    def split(flat):
        out, start = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(flat[start:start + size].reshape(shape))
            start += padded(size)
        return tuple(out)

    @split.vjp
    def split_vjp(primals, cotangents, outputs):
        return _concatenate_padded([c.reshape(-1) for c in cotangents])

    return split


def decoupled_decay(p: mx.array, learning_rate: mx.array, weight_decay: float) -> mx.array:
    """AdamW's weight decay, applied to the weights before the Adam step (both AdamW classes)."""
    return p * (1.0 - learning_rate.astype(p.dtype) * weight_decay)


def _concatenate_padded(vectors: List[mx.array]) -> mx.array:
    """The vectors end to end, each starting at a multiple of ALIGN, the whole a multiple of
    GROUP_ALIGN long; zeros in between."""
    pieces, length = [], 0
    for i, v in enumerate(vectors):
        pieces.append(v)
        length += v.size
        end = padded(length, GROUP_ALIGN if i == len(vectors) - 1 else ALIGN)
        if end > length:
            pieces.append(mx.zeros((end - length,), v.dtype))
            length = end
    return mx.concatenate(pieces)


class FlatLayout:
    """Which group and place each parameter has in the flat buffers.

    Group names say what they share: ``cast`` (the compute dtype) or ``full`` (kept in float32:
    CEMA, norms, the Q/K affine, or every parameter when computing in float32), with ``_decay``
    when weight decay applies."""

    def __init__(self, parameters: dict, compute_dtype: mx.Dtype, decays: Callable[[str, mx.array], bool]):
        self.compute_dtype = compute_dtype
        self.paths: Dict[str, List[str]] = {}
        self.cast: Dict[str, bool] = {}
        self.decay: Dict[str, bool] = {}
        shapes: Dict[str, list] = {}
        for path, p in tree_flatten(parameters):
            cast = compute_dtype != mx.float32 and not is_full_precision_key(path)
            decay = bool(decays(path, p))
            group = ("cast" if cast else "full") + ("_decay" if decay else "")
            self.paths.setdefault(group, []).append(path)
            shapes.setdefault(group, []).append(tuple(p.shape))
            self.cast[group], self.decay[group] = cast, decay
        self.shapes: Dict[str, Tuple[Tuple[int, ...], ...]] = {g: tuple(s) for g, s in shapes.items()}

    def flatten(self, leaves: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """One float32 vector per group from {parameter path: array shaped like the parameter}
        (zeros in the alignment padding)."""
        return {g: _concatenate_padded([leaves[path].astype(mx.float32).reshape(-1) for path in paths])
                for g, paths in self.paths.items()}

    def unflatten(self, flats: Dict[str, mx.array], compute: bool = False) -> dict:
        """The parameter tree as views of ``flats``; ``compute``: cast groups in the compute dtype
        (one cast per group), differentiable back to the flat buffers."""
        leaves = []
        for g, paths in self.paths.items():
            flat = flats[g].astype(self.compute_dtype) if compute and self.cast[g] else flats[g]
            leaves.extend(zip(paths, split_op(self.shapes[g])(flat)))
        return tree_unflatten(leaves)


class FlatAdamW(optim.Adam):
    """AdamW (as ``mlx_megalodon.train.AdamW``) whose state, once ``bind`` is called, is flat:
    ``state["flat"] = {"p": ..., "m": ..., "v": ...}``, each a dict of one vector per group."""

    def __init__(self, learning_rate, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 decay_filter: Optional[Callable[[str, mx.array], bool]] = None, bias_correction: bool = True):
        super().__init__(learning_rate, list(betas), eps, bias_correction)
        if decay_filter is None:   # AdamW's default (imported here: train.py imports this module)
            from .train import default_decay_filter as decay_filter
        self.weight_decay = weight_decay
        self.decay_filter = decay_filter
        self.layout: Optional[FlatLayout] = None

    def init(self, parameters: dict):
        """Nothing until ``bind`` creates the flat state: a loaded checkpoint's per-parameter
        moments stay in ``state`` for it to take."""
        self._initialized = True

    def _decays(self, path: str, p: mx.array) -> bool:
        return bool(self.weight_decay) and self.decay_filter(path, p)

    def bind(self, parameters: dict, compute_dtype: mx.Dtype) -> dict:
        """Move the master weights and moments into flat buffers; returns the parameter tree as views
        of the flat master weights (for ``model.update``)."""
        if self.layout is not None:
            raise RuntimeError("FlatAdamW.bind: already bound")
        layout = FlatLayout(parameters, compute_dtype, self._decays)
        saved = dict(tree_flatten({k: v for k, v in self.state.items() if k not in ("step", "learning_rate")}))
        flat = {"p": layout.flatten(dict(tree_flatten(parameters)))}
        for name in ("m", "v"):   # a loaded checkpoint's moments, or zeros (no per-tensor zeros first)
            loaded = {path: saved.get(f"{path}.{name}") for paths in layout.paths.values() for path in paths}
            flat[name] = layout.flatten(loaded) if all(v is not None for v in loaded.values()) else \
                {g: mx.zeros_like(v) for g, v in flat["p"].items()}
        self.layout = layout
        self._state = {"step": self.state["step"], "learning_rate": self.state["learning_rate"], "flat": flat}
        self._initialized = True
        return layout.unflatten(flat["p"])

    def compute_parameters(self, flat_p: Dict[str, mx.array]) -> dict:
        return self.layout.unflatten(flat_p, compute=True)

    def update_flat(self, flat_grads: Dict[str, mx.array]) -> dict:
        """One AdamW step on every group; returns the new parameter tree (views)."""
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1
        flat = self.state["flat"]
        new = {"p": {}, "m": {}, "v": {}}
        for g, grad in flat_grads.items():
            p = flat["p"][g]
            if self.layout.decay[g]:
                p = decoupled_decay(p, self.learning_rate, self.weight_decay)
            state = {"m": flat["m"][g], "v": flat["v"][g]}
            new["p"][g] = self.apply_single(grad, p, state)
            new["m"][g], new["v"][g] = state["m"], state["v"]
        self.state["flat"] = new
        return self.layout.unflatten(new["p"])

    def update(self, model, gradients: dict):
        """``model.update`` with the weights after one step on the flat ``gradients`` (after ``bind``)."""
        if self.layout is None:
            raise RuntimeError("FlatAdamW.update: call bind() first (the Trainer does)")
        model.update(self.update_flat(gradients))

    def checkpoint_state(self) -> dict:
        """The state in AdamW's per-parameter layout (what checkpoints hold)."""
        if self.layout is None:
            return self.state
        flat = self.state["flat"]
        leaves = [("step", self.state["step"]), ("learning_rate", self.state["learning_rate"])]
        for name in ("m", "v"):
            views = dict(tree_flatten(self.layout.unflatten(flat[name])))
            leaves.extend((f"{path}.{name}", a) for path, a in views.items())
        return tree_unflatten(leaves)
