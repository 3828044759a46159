"""Fused TimestepNorm kernels (metal/timestep_norm.body) and the switch that decides where they
replace the ops path of ``timestep_norm.timestep_norm``.

The ops path evaluates the running group statistics with cumulative sums over whole B x L x G
arrays (a log2(L)-pass scan for packed rows) and lets autograd differentiate them: many passes
over memory. The kernels do it in a chunked scan like the CEMA kernel's (see the body for the
maths): forward = per-chunk Welford summaries, a short combine across chunks, and a pass that
normalizes every step from its true running statistics (saving the per-step mean and rstd for
the backward); backward = the reverse-time sums of the statistics' gradients in the same three
passes, giving gx, partial sums of the affine gradients and the incoming state's gradient.
Statistics are float32 whatever x's dtype; y and gx are in x's dtype.

Dispatch: ``kernel_wanted(shape, num_groups)``, asked once by timestep_norm.timestep_norm.
``MEGALODON_KERNELS=0`` forces the ops path; ``MEGALODON_TNORM_KERNEL=1`` / ``0`` forces the kernel
on / off; otherwise ``TIMESTEP_NORM_KERNEL_DEFAULT`` (on for CUDA, measured on the H200; off for Metal) decides.
Sources are assembled by mlx_megalodon/kernels.py (same preludes, same GPU launcher); the readable
metal/timestep_norm.{metal,cu} are written by ``python -m mlx_megalodon.kernels``.
"""
from __future__ import annotations

import ctypes
import tempfile
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import kernels as K

BODY = "timestep_norm.body"
_SCAN = ("T", "W", "NPT", "RESET")

# name -> (inputs, outputs, template parameters); argument types as in kernels.KERNELS ("T" is
# x's dtype). `starts` (B x L document starts) is read only when RESET = 1.
KERNELS = {
    "tnorm_fwd_local": (
        (("x", "T"), ("starts", "int"), ("params", "int")),
        (("loc", "float"),),
        _SCAN,
    ),
    "tnorm_fwd_combine": (
        (("loc", "float"), ("c0", "float"), ("m0", "float"), ("v0", "float"), ("starts", "int"),
         ("params", "int")),
        (("h_in", "float"),),
        ("RESET",),
    ),
    "tnorm_fwd_final": (
        (("x", "T"), ("weight", "float"), ("bias", "float"), ("c0", "float"), ("m0", "float"), ("v0", "float"),
         ("h_in", "float"), ("eps", "float"), ("starts", "int"), ("params", "int")),
        (("y", "T"), ("stats", "float"), ("mean_out", "float"), ("var_out", "float")),
        _SCAN,
    ),
    "tnorm_bwd_local": (
        (("x", "T"), ("gy", "T"), ("weight", "float"), ("stats", "float"), ("c0", "float"), ("gmT", "float"),
         ("gvT", "float"), ("starts", "int"), ("params", "int")),
        (("loc", "float"),),
        _SCAN,
    ),
    "tnorm_bwd_combine": (
        (("loc", "float"), ("stats", "float"), ("starts", "int"), ("params", "int")),
        (("carry", "float"),),
        ("RESET",),
    ),
    "tnorm_bwd_final": (
        (("x", "T"), ("gy", "T"), ("weight", "float"), ("stats", "float"), ("c0", "float"), ("m0", "float"),
         ("gmT", "float"), ("gvT", "float"), ("carry", "float"), ("starts", "int"), ("params", "int")),
        (("gx", "T"), ("gwb", "float"), ("gstate", "float")),
        _SCAN,
    ),
}
for _name, _sig in KERNELS.items():
    K.OTHER_KERNELS[_name] = (BODY, _sig)

# Where the kernel replaces the ops path, per GPU backend. On CUDA it was measured on the H200:
# 3.3-4.1x faster than ops (benchmarks/timestep_norm_kernel.py) and the mega200M training step
# 1.19x / 1.14x faster at 4K / 32K. Metal has never run it, so it stays off there until a Mac
# measures it; MEGALODON_TNORM_KERNEL=1 / 0 forces it either way.
TIMESTEP_NORM_KERNEL_DEFAULT: Dict[str, bool] = {"cuda": True, "metal": False}
PREFER_KERNEL = False   # any other launcher (tests)

# Work split. Lanes per (b, group) on a GPU: the fewest (a power of two <= GPU_LANES dividing the
# group size) that leave at most GPU_NPT features per lane; never more than MAX_NPT features per
# lane (beyond, registers spill: the ops path runs). The H200 sweep (BENCHMARKS.md, mega200M's
# 32-feature groups, fwd+bwd) put 8 lanes x 4 features with 64-step chunks at 0.60 ms against
# 1.00-1.08 ms for 32 lanes x 1: fewer shuffles per step, and 64-step chunks halve the combine.
GPU_LANES = 32
GPU_NPT = 4
MAX_NPT = 16
TARGET_THREADS = 264 * 1024   # threads wanted in flight per launch (H200: 132 SMs x 2048)
MIN_CHUNK = 64
UNROLL = 8                    # TN_UNROLL in the body: chunks are a multiple of it
CHUNK_OVERRIDE: Optional[int] = None  # tests / benchmarks: force this chunk length


# ---------------------------------------------------------------------------------------------
# Generated, readable sources and the CPU harness

# Instantiations written into the generated files: (dtype, W, NPT, RESET) — mega200M's group of
# 32 features (1024 / 32) over 32 lanes and over 8 lanes, the 7B's 64 (4096 / 64), with and
# without document resets.
_GEN_CONFIGS = (("float", 32, 1, 0), ("bfloat16_t", 32, 1, 0), ("half", 32, 1, 0), ("bfloat16_t", 8, 4, 0),
                ("bfloat16_t", 32, 2, 0), ("float", 32, 1, 1), ("bfloat16_t", 32, 1, 1))


def _instances(kernel: str) -> List[Dict[str, object]]:
    return [dict(T=dt, W=w, NPT=npt, RESET=reset) for dt, w, npt, reset in _GEN_CONFIGS]


def generate_metal() -> str:
    return K.generate_metal_source("timestep_norm.body", KERNELS, _instances)


def generate_cuda() -> str:
    return K.generate_cuda_source("timestep_norm.body", KERNELS, _instances)


def generate_cpu(npt: int, reset: int) -> str:
    """The TimestepNorm kernels for the CPU emulation (W = 1: one lane holds the whole group of
    `npt` features; T = float)."""
    return K.generate_cpu_source(KERNELS, dict(T="float", W=1, NPT=npt, RESET=reset))


class CpuLauncher:
    """Runs the TimestepNorm kernel bodies on the CPU through g++ and ctypes, one lane per
    (b, group), in float32 (tests of the kernels' arithmetic without a GPU). Outputs start as NaN,
    so an element no thread writes shows up."""
    lanes = 1
    max_group = 256

    def __init__(self, workdir: Optional[str] = None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="mgk_tnorm_cpu_")
        self._libs: Dict[Tuple[int, int], ctypes.CDLL] = {}
        self._npt = 1

    def lib(self, npt: int, reset: int) -> ctypes.CDLL:
        lib = self._libs.get((npt, reset))
        if lib is None:
            lib = self._libs[(npt, reset)] = K.compile_cpu_library(generate_cpu(npt, reset), self.workdir,
                                                                   f"mgk_tnorm_{npt}_{reset}")
        return lib

    def __call__(self, name, inputs, templates, threads, output_shapes, output_dtypes):
        t = dict(templates)
        assert t.get("W", 1) == 1
        # The combine kernels have no NPT: the library of the last scan kernel runs them.
        self._npt = t.get("NPT", self._npt)
        fn = getattr(self.lib(self._npt, t["RESET"]), f"run_{name}")
        return K.call_cpu_kernel(fn, KERNELS[name][0], inputs, threads, output_shapes, output_dtypes)


_launcher = K.LauncherSlot("TimestepNorm kernels")
set_launcher = _launcher.set


# ---------------------------------------------------------------------------------------------
# Policy and work split

def lanes(group_size: int, launch=None) -> Optional[Tuple[int, int]]:
    """(W lanes per group, NPT features per lane) for this group size on `launch` (default: the
    active launcher, or a GPU's), or None where the kernels do not handle it."""
    launch = launch if launch is not None else _launcher.override
    w_max = getattr(launch, "lanes", GPU_LANES) if launch is not None else GPU_LANES
    if group_size < 1:
        return None
    if w_max == 1:
        return (1, group_size) if group_size <= getattr(launch, "max_group", MAX_NPT) else None
    w = 1
    while w * 2 <= w_max and group_size % (w * 2) == 0 and group_size // w > GPU_NPT:
        w *= 2
    npt = group_size // w
    return (w, npt) if npt <= MAX_NPT else None


def kernel_wanted(shape: Sequence[int], num_groups: int) -> bool:
    """Should timestep_norm run the fused kernels for x of shape B x L x D with `num_groups`?
    Only where a GPU backend (or a test launcher) is present, kernels are enabled
    (MEGALODON_KERNELS != 0) and the shape is supported; then MEGALODON_TNORM_KERNEL=1/0 forces
    the answer, else TIMESTEP_NORM_KERNEL_DEFAULT for the backend."""
    if not K.kernels_enabled():
        return False
    if not _launcher.available():
        return False
    if len(shape) != 3 or min(shape) < 1 or num_groups < 1 or shape[2] % num_groups:
        return False
    if lanes(shape[2] // num_groups) is None:
        return False
    return _launcher.policy("MEGALODON_TNORM_KERNEL", TIMESTEP_NORM_KERNEL_DEFAULT, PREFER_KERNEL)


def plan(B: int, L: int, G: int, W: int, chunk: Optional[int] = None) -> Tuple[int, int, int]:
    """(chunk length C, number of chunks NC, length of the last chunk): enough chunks for about
    TARGET_THREADS threads, C a multiple of UNROLL and at least MIN_CHUNK."""
    if chunk is None:
        chunk = CHUNK_OVERRIDE
    if chunk is None:
        want = max(1, TARGET_THREADS // max(1, B * G * W))
        chunk = max(MIN_CHUNK, -(-L // want))
        chunk = -(-chunk // UNROLL) * UNROLL
    chunk = max(1, min(int(chunk), L))
    nc = -(-L // chunk)
    return chunk, nc, L - (nc - 1) * chunk


_EPS: Dict[float, mx.array] = {}


def _eps(eps: float) -> mx.array:
    a = _EPS.get(eps)
    if a is None:
        a = _EPS[eps] = mx.array([eps], dtype=mx.float32)
        mx.eval(a)
    return a


# ---------------------------------------------------------------------------------------------
# Forward / backward

def _setup(x, num_groups: int, starts):
    launch = _launcher()
    B, L, D = x.shape
    W, NPT = lanes(D // num_groups, launch)
    C, NC, LAST = plan(B, L, num_groups, W)
    params = K._params(B, L, D, num_groups, C, NC, LAST)
    reset = int(starts is not None)
    return launch, (B, L, D, W, NPT, NC), params, reset, (starts if reset else K._dummy(mx.int32))


def _forward(x, weight, bias, c0, m0, v0, num_groups: int, eps: float, starts=None):
    launch, (B, L, D, W, NPT, NC), params, reset, starts = _setup(x, num_groups, starts)
    G, f32 = num_groups, mx.float32
    tpl = [("T", x.dtype), ("W", W), ("NPT", NPT), ("RESET", reset)]
    h_in = K._dummy()
    if NC > 1:
        loc, = launch("tnorm_fwd_local", [x, starts, params], tpl, B * (NC - 1) * G * W,
                      [(B, NC - 1, 3, G)], [f32])
        h_in, = launch("tnorm_fwd_combine", [loc, c0, m0, v0, starts, params], [("RESET", reset)], B * G,
                       [(B, NC - 1, 3, G)], [f32])
    y, stats, mean, var = launch(
        "tnorm_fwd_final", [x, weight, bias, c0, m0, v0, h_in, _eps(eps), starts, params], tpl,
        B * NC * G * W, [(B, L, D), (B, L, G, 2), (B, G), (B, G)], [x.dtype, f32, f32, f32])
    return y, mean, var, stats


def _backward(x, weight, c0, m0, stats, gy, gmT, gvT, num_groups: int, starts=None):
    launch, (B, L, D, W, NPT, NC), params, reset, starts = _setup(x, num_groups, starts)
    G, f32 = num_groups, mx.float32
    gy, gmT, gvT = gy.astype(x.dtype), gmT.astype(f32), gvT.astype(f32)
    tpl = [("T", x.dtype), ("W", W), ("NPT", NPT), ("RESET", reset)]
    carry = K._dummy()
    if NC > 1:
        loc, = launch("tnorm_bwd_local", [x, gy, weight, stats, c0, gmT, gvT, starts, params], tpl,
                      B * (NC - 1) * G * W, [(B, NC - 1, 2, G)], [f32])
        carry, = launch("tnorm_bwd_combine", [loc, stats, starts, params], [("RESET", reset)], B * G,
                        [(B, NC - 1, 2, G)], [f32])
    gx, gwb, gstate = launch(
        "tnorm_bwd_final", [x, gy, weight, stats, c0, m0, gmT, gvT, carry, starts, params], tpl,
        B * NC * G * W, [(B, L, D), (B * NC, 2, D), (B, NC, 2, G)], [x.dtype, f32, f32])
    gwb = gwb.sum(axis=0)
    gstate = gstate.sum(axis=1)
    return gx, gwb[0], gwb[1], mx.zeros_like(c0), gstate[:, 0], gstate[:, 1]


@lru_cache(maxsize=None)
def _norm_op(num_groups: int, eps: float, packed: bool):
    """The differentiable op (x, weight, bias, c0, m0, v0[, starts]) -> (y, mean, var, stats) for
    one (num_groups, eps); `stats` (per-step mean and rstd) is for the backward only, its
    cotangent is ignored, as is c0's (a count) and starts' (integers)."""
    if packed:
        @mx.custom_function
        def op(x, weight, bias, c0, m0, v0, starts):
            return _forward(x, weight, bias, c0, m0, v0, num_groups, eps, starts)

        @op.vjp
        def op_vjp(primals, cotangents, outputs):
            x, weight, _, c0, m0, _, starts = primals
            gy, gm, gv = cotangents[:3]
            grads = _backward(x, weight, c0, m0, outputs[3], gy, gm, gv, num_groups, starts)
            return (*grads, mx.zeros_like(starts))
    else:
        @mx.custom_function
        def op(x, weight, bias, c0, m0, v0):
            return _forward(x, weight, bias, c0, m0, v0, num_groups, eps)

        @op.vjp
        def op_vjp(primals, cotangents, outputs):
            x, weight, _, c0, m0, _ = primals
            gy, gm, gv = cotangents[:3]
            return _backward(x, weight, c0, m0, outputs[3], gy, gm, gv, num_groups)
    return op


def timestep_norm_kernel(x, weight, bias, count, mean, var, num_groups: int, eps: float,
                         doc_starts: Optional[mx.array] = None):
    """The fused-kernel TimestepNorm, same contract as timestep_norm.timestep_norm: x B x L x D
    (float32, bfloat16 or float16; others are computed in float32), weight (stored minus one) and
    bias D, incoming state count B (ints), mean and var B x G. doc_starts: None, or B x L ints,
    each token's document start (non-decreasing along a row, doc_starts[t] <= t, a start s has
    doc_starts[s] == s, doc_starts[0] == 0); every document restarts from the incoming state.
    Returns (y in x's dtype, count B, mean B x G, var B x G float32). Differentiable (mx.grad) in
    x, weight, bias, mean and var."""
    if x.ndim != 3:
        raise ValueError(f"x must be B x L x D, got shape {tuple(x.shape)}")
    B, L, D = x.shape
    if num_groups < 1 or D % num_groups:
        raise ValueError(f"num_features ({D}) must be divisible by num_groups ({num_groups})")
    if lanes(D // num_groups, _launcher()) is None:
        raise ValueError(f"group size {D // num_groups} is not handled by the TimestepNorm kernels")
    G, f32 = num_groups, mx.float32
    if x.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        x = x.astype(f32)
    c0 = count.astype(f32)
    args = [x, weight.astype(f32), bias.astype(f32), mx.broadcast_to(c0, (B,)),
            mx.broadcast_to(mean.astype(f32), (B, G)), mx.broadcast_to(var.astype(f32), (B, G))]
    if doc_starts is None:
        y, m, v, _ = _norm_op(G, float(eps), False)(*args)
        new_count = count + L
    else:
        if tuple(doc_starts.shape) != (B, L):
            raise ValueError(f"doc_starts must have shape (batch, length) = {(B, L)}, got {tuple(doc_starts.shape)}")
        starts = doc_starts.astype(mx.int32)
        y, m, v, _ = _norm_op(G, float(eps), True)(*args, starts)
        new_count = count + (L - starts[:, -1]).astype(count.dtype)
    return y, new_count, m, v
