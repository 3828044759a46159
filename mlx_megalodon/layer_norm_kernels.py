"""LayerNorm whose backward runs one kernel (metal/layer_norm.body) that also sums the scale and
shift gradients, and the switch that decides where it replaces MLX's own vjp.

The forward is always ``mx.fast.layer_norm``. MLX's vjp of it writes the input gradient and then
sums g * xhat and g over all rows with a column reduction that MLX 0.32's CUDA backend runs on
D / 32 blocks: for the normalized FFN of a mega200M training step (32K rows of 1,024) each sum took
0.35-0.5 ms on the H200, on the step's critical path, in all 12 layers (BENCHMARKS.md, eighth
session trace). ``ln_bwd`` gives every group of 32 lanes a run of rows, writes the input gradient
and keeps its columns' partial sums in registers; the (groups x 2 x D) partial sums are then added
in two short reductions. Statistics and sums are float32 whatever the input dtype.

Dispatch: ``ln_kernel_wanted(shape, dtype)``. ``MEGALODON_KERNELS=0`` forces MLX's vjp;
``MEGALODON_LN_KERNEL=1`` / ``0`` forces the kernel on / off; otherwise ``LN_KERNEL_DEFAULT``
decides per backend. Sources are assembled by mlx_megalodon/kernels.py (same preludes, same GPU
launcher); the readable metal/layer_norm.{metal,cu} are written by ``python -m mlx_megalodon.kernels``.
"""
from __future__ import annotations

import tempfile
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

import mlx.core as mx

from . import kernels as K

BODY = "layer_norm.body"

# name -> (inputs, outputs, template parameters); argument types as in kernels.KERNELS.
KERNELS = {
    "ln_bwd": (
        (("x", "T"), ("w", "T"), ("g", "T"), ("eps", "float"), ("params", "int")),
        (("gx", "T"), ("part", "float")),
        ("T", "W", "NC"),
    ),
}
for _name, _sig in KERNELS.items():
    K.OTHER_KERNELS[_name] = (BODY, _sig)

# Where the kernel replaces MLX's LayerNorm vjp, per GPU backend. Metal: off until measured on a Mac.
LN_KERNEL_DEFAULT: Dict[str, bool] = {"cuda": True, "metal": False}
PREFER_KERNEL = False   # any other launcher (tests)

GPU_LANES = 32
# Columns per lane are compiled in (registers): up to 64 on a GPU, so D <= 2,048 there.
MAX_COLUMNS_PER_LANE = 64
# Groups of lanes wanted per launch: enough warps in flight to hide memory latency, while the
# partial sums (groups x 2 x D floats) stay small next to the input.
TARGET_GROUPS = 4096
# The partial sums are added in two stages (blocks of this many groups, then the blocks) once there
# are enough of them: one column reduction over thousands of rows is what this module avoids.
PARTIAL_BLOCK = 64
DTYPES = (mx.float32, mx.bfloat16, mx.float16)


def columns_per_lane(D: int, lanes: int) -> int:
    """NC: the smallest power of two >= ceil(D / lanes) (one build serves every D up to it)."""
    need = -(-D // lanes)
    nc = 1
    while nc < need:
        nc *= 2
    return nc


def rows_per_group(R: int) -> int:
    return max(1, -(-R // TARGET_GROUPS))


# ---------------------------------------------------------------------------------------------
# Generated, readable sources and the CPU harness

_GEN_CONFIGS = (("float", 32, 32), ("bfloat16_t", 32, 32), ("half", 32, 32), ("bfloat16_t", 32, 64))


def _instances(kernel: str) -> List[Dict[str, object]]:
    return [dict(T=dt, W=w, NC=nc) for dt, w, nc in _GEN_CONFIGS]


def generate_metal() -> str:
    return K.generate_metal_source(BODY, KERNELS, _instances)


def generate_cuda() -> str:
    return K.generate_cuda_source(BODY, KERNELS, _instances)


def generate_cpu(nc: int) -> str:
    """The LayerNorm kernel for the CPU emulation (W = 1: one lane holds a whole row; T = float)."""
    return K.generate_cpu_source(KERNELS, dict(T="float", W=1, NC=nc))


class CpuLauncher:
    """Runs the LayerNorm kernel body on the CPU through g++ and ctypes, one lane per group of rows,
    in float32 (tests of the kernel's arithmetic without a GPU). One build per NC = D. Outputs start
    as NaN, so an element no thread writes shows up."""
    lanes = 1

    def __init__(self, workdir: Optional[str] = None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="mgk_ln_cpu_")
        self._libs = {}

    def __call__(self, name, inputs, templates, threads, output_shapes, output_dtypes):
        values = dict(templates)
        assert values["W"] == 1
        nc = values["NC"]
        lib = self._libs.get(nc)
        if lib is None:
            lib = self._libs[nc] = K.compile_cpu_library(generate_cpu(nc), self.workdir, f"mgk_ln_{nc}")
        return K.call_cpu_kernel(getattr(lib, f"run_{name}"), KERNELS[name][0], inputs, threads,
                                 output_shapes, output_dtypes)


_launcher = K.LauncherSlot("LayerNorm kernel")
set_launcher = _launcher.set


def lanes(launch=None) -> int:
    """Lanes per row on `launch` (default: the active launcher, or a GPU's)."""
    launch = launch if launch is not None else _launcher.override
    return getattr(launch, "lanes", GPU_LANES) if launch is not None else GPU_LANES


# ---------------------------------------------------------------------------------------------
# Policy

def ln_kernel_wanted(shape: Sequence[int], dtype: Optional[mx.Dtype] = None) -> bool:
    """Should a LayerNorm over the last axis of ``shape`` take the kernel backward? Only where a GPU
    backend (or a test launcher) is present, kernels are enabled (MEGALODON_KERNELS != 0), the
    dtype is float32 / bfloat16 / float16 and a row fits a lane's registers; then
    MEGALODON_LN_KERNEL=1/0 forces the answer, else LN_KERNEL_DEFAULT for the backend."""
    if not K.kernels_enabled() or not _launcher.available():
        return False
    if len(shape) < 1 or min(shape) < 1:
        return False
    if dtype is not None and dtype not in DTYPES:
        return False
    if _launcher.override is None and columns_per_lane(shape[-1], GPU_LANES) > MAX_COLUMNS_PER_LANE:
        return False
    return _launcher.policy("MEGALODON_LN_KERNEL", LN_KERNEL_DEFAULT, PREFER_KERNEL)


# ---------------------------------------------------------------------------------------------
# Backward and the differentiable op

def sum_partials(part: mx.array) -> mx.array:
    """(G, 2, D) float32 partial sums -> (2, D): in two stages once there are at least two blocks of
    PARTIAL_BLOCK groups (zero groups pad the last block), so no single column reduction runs over
    thousands of rows whatever the row count."""
    G = part.shape[0]
    if G >= 2 * PARTIAL_BLOCK:
        pad = -G % PARTIAL_BLOCK
        if pad:
            part = mx.pad(part, [(0, pad), (0, 0), (0, 0)])
        part = part.reshape(-1, PARTIAL_BLOCK, *part.shape[1:]).sum(axis=1)
    return part.sum(axis=0)


def layer_norm_backward(x: mx.array, weight: mx.array, g: mx.array, eps: float):
    """(gx, gw, gb) of y = layer_norm(x) * weight + bias for x, g of shape (R, D), through ln_bwd.
    gx comes back in x's dtype, gw and gb in float32."""
    launch = _launcher()
    R, D = x.shape
    W = lanes(launch)
    nc = columns_per_lane(D, W)
    rpg = rows_per_group(R)
    groups = -(-R // rpg)
    gx, part = launch("ln_bwd", [x, weight.astype(x.dtype), g.astype(x.dtype), mx.array([eps], mx.float32),
                                 K._params(R, D, rpg)],
                      [("T", x.dtype), ("W", W), ("NC", nc)], groups * W, [(R, D), (groups, 2, D)],
                      [x.dtype, mx.float32])
    sums = sum_partials(part)
    return gx, sums[0], sums[1]


@lru_cache(maxsize=None)
def _layer_norm_op(eps: float):
    """The differentiable 2-D op for one eps: MLX's forward, the kernel backward."""

    @mx.custom_function
    def op(x, weight, bias):
        return mx.fast.layer_norm(x, weight, bias, eps)

    @op.vjp
    def op_vjp(primals, cotangent, output):
        x, weight, bias = primals
        gx, gw, gb = layer_norm_backward(x, weight, cotangent, eps)
        return gx, gw.astype(weight.dtype), gb.astype(bias.dtype)

    return op


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """``mx.fast.layer_norm(x, weight, bias, eps)`` over the last axis, whose gradient runs ln_bwd.
    weight and bias are (D,) and are used in x's dtype."""
    D = x.shape[-1]
    if tuple(weight.shape) != (D,) or tuple(bias.shape) != (D,):
        raise ValueError(f"layer_norm: weight and bias must have shape ({D},), got {tuple(weight.shape)} "
                         f"and {tuple(bias.shape)}")
    lead = x.shape[:-1]
    if x.size == 0:                       # nothing to launch over
        return mx.fast.layer_norm(x, weight.astype(x.dtype), bias.astype(x.dtype), eps)
    y = _layer_norm_op(float(eps))(x.reshape(-1, D), weight.astype(x.dtype), bias.astype(x.dtype))
    return y.reshape(*lead, D)
