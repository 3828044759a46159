"""A linear layer whose bias gradient is summed over the tokens in two stages.

Autodiff turns a (D,) parameter broadcast over B x L tokens into one column reduction over all
B * L rows. MLX's CUDA backend (0.32) runs such a reduction with one thread block per 32 columns
whenever the rows number at most 32x the columns, so at 8 x 4,096 tokens a 1,024- or 2,048-wide
gradient gets 32-64 blocks and takes 0.4-0.7 ms: the H200's kernel trace of one mega200M training
step showed about 27 ms of such reductions (benchmarks/step_kernels.py --torch-profiler). Summing
in two stages (row groups first, then the groups) gives the first stage thousands of blocks.

``column_sum`` is that two-stage sum; ``Linear`` (a drop-in nn.Linear: same parameters, same
forward) routes its bias gradient through it with ``mx.custom_function``. The norms keep MLX's
fused backward: recomputing their normalized input to do the same cost more than it saved.
"""
from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# Rows per first-stage group: enough work per block, and at most a few thousand partial rows.
_GROUP_ROWS = 512


def column_sum(t: mx.array) -> mx.array:
    """Sum of ``t`` over every axis but the last (the gradient of a broadcast (N,) parameter)."""
    n = t.shape[-1]
    rows = t.size // n if n else 0
    t = t.reshape(rows, n)
    if rows >= 2 * _GROUP_ROWS:
        groups = rows // _GROUP_ROWS
        head = groups * _GROUP_ROWS
        partial = t[:head].reshape(groups, _GROUP_ROWS, n).sum(axis=1)
        if head < rows:
            partial = mx.concatenate([partial, t[head:].sum(axis=0, keepdims=True)], axis=0)
        t = partial
    return t.sum(axis=0)


@mx.custom_function
def affine(x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """``x @ weight.T + bias``, as nn.Linear computes it, with the bias gradient from column_sum."""
    return mx.addmm(bias, x, weight.T)


@affine.vjp
def _affine_vjp(primals, cotangent, output):
    x, weight, bias = primals
    rows_x = x.reshape(-1, x.shape[-1])
    rows_g = cotangent.reshape(-1, cotangent.shape[-1])
    return ((cotangent @ weight).astype(x.dtype), (rows_g.T @ rows_x).astype(weight.dtype),
            column_sum(cotangent).astype(bias.dtype))


class Linear(nn.Linear):
    """nn.Linear whose bias gradient is a two-stage column sum (see the module docstring)."""

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return affine(x, self.weight, self.bias)
        return super().__call__(x)
