"""Fused softmax cross entropy (metal/cross_entropy.body) and the switch that decides where it
replaces the ops path of the training loss.

The ops path, ``nn.losses.cross_entropy(logits.astype(mx.float32), targets)``, writes a float32 copy
of the B x L x vocab logits and reads it for the logsumexp, and its backward writes and reads
float32 softmax-sized arrays again (mega200M, 32K tokens of a 32K vocabulary: 4.2 GB each). The
kernels read the logits in their own dtype (bf16 in training) once forward and once backward,
accumulating in float32: ``ce_fwd`` writes each row's loss and logsumexp (float32), ``ce_bwd`` the
gradient (softmax - one-hot) x cotangent in the logits' dtype. See the body for the maths.

Dispatch: ``ce_kernel_wanted(shape, dtype)``. ``MEGALODON_KERNELS=0`` forces the ops path;
``MEGALODON_CE_KERNEL=1`` / ``0`` forces the kernel on / off; otherwise ``CE_KERNEL_DEFAULT``
decides: on for CUDA (measured on the H200), off on Metal (never run on a Mac).
Sources are assembled by mlx_megalodon/kernels.py (same preludes, same GPU launcher); the readable
metal/cross_entropy.{metal,cu} are written by ``python -m mlx_megalodon.kernels``.
"""
from __future__ import annotations

import ctypes
import tempfile
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from . import kernels as K

BODY = "cross_entropy.body"

# name -> (inputs, outputs, template parameters); argument types as in kernels.KERNELS ("T" is the
# logits' dtype).
KERNELS = {
    "ce_fwd": (
        (("logits", "T"), ("targets", "int"), ("params", "int")),
        (("loss", "float"), ("lse", "float")),
        ("T", "W"),
    ),
    "ce_bwd": (
        (("logits", "T"), ("targets", "int"), ("lse", "float"), ("g", "float"), ("params", "int")),
        (("grad", "T"),),
        ("T", "W"),
    ),
}
for _name, _sig in KERNELS.items():
    K.OTHER_KERNELS[_name] = (BODY, _sig)

# Where the kernel replaces the ops path, per GPU backend. CUDA: on. On the H200, 32K rows of a 32K
# bf16 vocabulary take 2.58 ms forward + backward against 6.46 ms for the ops path
# (benchmarks/cross_entropy_kernel.py), the mega200M training step's peak memory drops from 47.0 to
# 39.9 GB and its 4K step gets ~4 ms shorter (benchmarks/train_throughput.py --variants
# kernels,ce-kernel, BENCHMARKS.md). Metal: off until measured on a Mac.
# MEGALODON_CE_KERNEL=1 / 0 forces it either way.
CE_KERNEL_DEFAULT: Dict[str, bool] = {"cuda": True, "metal": False}
PREFER_KERNEL = False   # any other launcher (tests)

# Lanes per row on a GPU: one warp / simdgroup, so the lanes' max and sum merge by shuffles and a
# row's reads are 32 adjacent entries at a time.
GPU_LANES = 32
# The body's loops count vocabulary entries in int: leave room for the last block's overshoot.
MAX_VOCAB = 1 << 30


# ---------------------------------------------------------------------------------------------
# Generated, readable sources and the CPU harness

_GEN_CONFIGS = (("float", 32), ("bfloat16_t", 32), ("half", 32))


def _instances(kernel: str) -> List[Dict[str, object]]:
    return [dict(T=dt, W=w) for dt, w in _GEN_CONFIGS]


def generate_metal() -> str:
    return K.generate_metal_source(BODY, KERNELS, _instances)


def generate_cuda() -> str:
    return K.generate_cuda_source(BODY, KERNELS, _instances)


def generate_cpu() -> str:
    """The cross-entropy kernels for the CPU emulation (W = 1: one lane holds the whole row; T = float)."""
    return K.generate_cpu_source(KERNELS, dict(T="float", W=1))


class CpuLauncher:
    """Runs the cross-entropy kernel bodies on the CPU through g++ and ctypes, one lane per row, in
    float32 (tests of the kernels' arithmetic without a GPU; logits of another dtype arrive as their
    exact float32 values, the gradient is rounded to it on the way out). Outputs start as NaN, so an
    element no thread writes shows up."""
    lanes = 1

    def __init__(self, workdir: Optional[str] = None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="mgk_ce_cpu_")
        self._lib: Optional[ctypes.CDLL] = None

    def __call__(self, name, inputs, templates, threads, output_shapes, output_dtypes):
        assert dict(templates)["W"] == 1
        if self._lib is None:
            self._lib = K.compile_cpu_library(generate_cpu(), self.workdir, "mgk_ce")
        fn = getattr(self._lib, f"run_{name}")
        return K.call_cpu_kernel(fn, KERNELS[name][0], inputs, threads, output_shapes, output_dtypes)


_launcher = K.LauncherSlot("cross-entropy kernels")
set_launcher = _launcher.set


def lanes(launch=None) -> int:
    """Lanes per row on `launch` (default: the active launcher, or a GPU's)."""
    launch = launch if launch is not None else _launcher.override
    return getattr(launch, "lanes", GPU_LANES) if launch is not None else GPU_LANES


# ---------------------------------------------------------------------------------------------
# Policy

def ce_kernel_wanted(shape: Sequence[int], dtype: Optional[mx.Dtype] = None) -> bool:
    """Should the loss run the fused kernels for logits of ``shape`` (..., vocab) and ``dtype``?
    Only where a GPU backend (or a test launcher) is present, kernels are enabled
    (MEGALODON_KERNELS != 0) and the shape is supported; then MEGALODON_CE_KERNEL=1/0 forces the
    answer, else CE_KERNEL_DEFAULT for the backend (on for CUDA, off for Metal)."""
    if not K.kernels_enabled() or not _launcher.available():
        return False
    if len(shape) < 1 or min(shape) < 1 or shape[-1] > MAX_VOCAB:
        return False
    if dtype is not None and dtype not in (mx.float32, mx.bfloat16, mx.float16):
        return False
    return _launcher.policy("MEGALODON_CE_KERNEL", CE_KERNEL_DEFAULT, PREFER_KERNEL)


# ---------------------------------------------------------------------------------------------
# Forward / backward (2-D: R rows x V)

def _forward(logits, targets):
    launch = _launcher()
    R, V = logits.shape
    W = lanes(launch)
    loss, lse = launch("ce_fwd", [logits, targets, K._params(R, V)], [("T", logits.dtype), ("W", W)], R * W,
                       [(R,), (R,)], [mx.float32, mx.float32])
    return loss, lse


def _backward(logits, targets, lse, g):
    launch = _launcher()
    R, V = logits.shape
    W = lanes(launch)
    grad, = launch("ce_bwd", [logits, targets, lse, g.astype(mx.float32), K._params(R, V)],
                   [("T", logits.dtype), ("W", W)], R * W, [(R, V)], [logits.dtype])
    return grad


@mx.custom_function
def _ce_op(logits, targets):
    """(loss R, lse R): lse is for the backward only; its cotangent is ignored, as is the
    targets' (integers)."""
    return _forward(logits, targets)


@_ce_op.vjp
def _ce_op_vjp(primals, cotangents, outputs):
    logits, targets = primals
    return _backward(logits, targets, outputs[1], cotangents[0]), mx.zeros_like(targets)


# ---------------------------------------------------------------------------------------------
# Public entry points

def cross_entropy_ops(logits: mx.array, targets: mx.array) -> mx.array:
    """The ops path (what the training loss always ran before the kernel): per-token float32 loss."""
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="none")


def _check_shapes(logits: mx.array, targets: mx.array) -> None:
    if logits.ndim < 1 or tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets must have the logits' shape without the vocabulary axis "
                         f"{tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")


def check_targets(targets: mx.array, vocab: int) -> None:
    """A one-line ValueError unless every target is in [0, vocab). Evaluates the targets' min and max
    (a host sync): not possible inside mx.compile."""
    lo, hi = (int(v) for v in (targets.min(), targets.max()))
    if lo < 0 or hi >= vocab:
        raise ValueError(f"targets must be token ids in [0, {vocab}) (the vocabulary), got values in [{lo}, {hi}]")


def cross_entropy_kernel(logits: mx.array, targets: mx.array, validate: bool = True) -> mx.array:
    """Per-token softmax cross entropy through the fused kernels: logits (..., V) float32, bfloat16 or
    float16 (others are computed in float32), targets (...) ints -> loss (...) float32.
    Differentiable (mx.grad) in the logits; the gradient comes back in the logits' dtype.

    ``validate`` checks the targets first (one clear ValueError for a token id outside [0, V)); that
    evaluates them, so callers inside mx.compile pass False. Either way the kernels never index with
    an out-of-range target, and its row's loss is NaN."""
    _check_shapes(logits, targets)
    V = logits.shape[-1]
    if V < 1 or V > MAX_VOCAB:
        raise ValueError(f"vocabulary size must be in [1, {MAX_VOCAB}], got {V}")
    if logits.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        logits = logits.astype(mx.float32)
    targets = targets.astype(mx.int32)
    if validate:
        check_targets(targets, V)
    lead = tuple(targets.shape)
    if targets.size == 0:
        return mx.zeros(lead, mx.float32)
    loss, _ = _ce_op(logits.reshape(-1, V), targets.reshape(-1))
    loss = loss.reshape(lead)
    # An out-of-range target (only possible with validate=False) must not pass as a finite loss.
    return mx.where((targets >= 0) & (targets < V), loss, mx.array(float("nan"), mx.float32))


def fused_cross_entropy(logits: mx.array, targets: mx.array, validate: bool = True) -> mx.array:
    """Per-token float32 cross entropy (...,) of logits (..., V) and int targets (...): the fused
    kernels where ``ce_kernel_wanted`` says so, else the ops path (``cross_entropy_ops``).
    ``validate``: see ``cross_entropy_kernel`` (the ops path never validates)."""
    if ce_kernel_wanted(logits.shape, logits.dtype):
        return cross_entropy_kernel(logits, targets, validate)
    return cross_entropy_ops(logits, targets)
