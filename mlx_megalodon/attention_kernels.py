"""Fused chunk attention kernels (metal/chunk_attention.body) and the policy that decides where
they replace ``mx.fast.scaled_dot_product_attention``.

Megalodon's attention is causal inside chunks of C steps and absent across chunks, with no
1/sqrt(d) scale; RoPE (positions restarting in every chunk) stays in ops and the kernels take the
rotated q and k. Three uses:

- ``chunk_attention_kernel(q, k, v, chunk)``: training / prefill, B x H x L x d in any of
  float32 / bfloat16 / float16, softmax statistics and accumulation in float32; differentiable
  through ``mx.custom_function`` (forward saves the row logsumexp; the backward recomputes the
  probabilities in a dQ kernel and a dK/dV kernel).
- ``decode_attention_kernel(q, keys, values, pos)``: one query against the current chunk's
  chunk-long key/value buffers, positions <= pos (an array: one compiled step serves every
  position), keys split over several lane groups whose partials a second kernel combines.
- ``attention_kernel_wanted(kind, q_shape, v_dim, chunk, dtype)``: the one policy the model asks
  (moving_average_gated_attention.chunk_attention and ._attend_step). ``MEGALODON_KERNELS=0``
  forces the ops path; ``MEGALODON_ATTN_KERNEL=1`` / ``0`` forces the attention kernels on / off
  (benchmarks); otherwise ``PREFER_KERNEL`` (filled in from H200 measurements) decides.

Sources are assembled by mlx_megalodon/kernels.py (same preludes, same GPU launcher) and the
readable metal/chunk_attention.{metal,cu} are written by ``python -m mlx_megalodon.kernels``.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import kernels as K

BODY = "chunk_attention.body"
_TPL = ("T", "W", "NZ", "NV")

# name -> (inputs, outputs, template parameters); an argument type is "T" (dtype of q), "float" or
# "int", as in kernels.KERNELS.
KERNELS = {
    "attn_fwd": (
        (("q", "T"), ("k", "T"), ("v", "T"), ("params", "int")),
        (("o", "T"), ("lse", "float")),
        _TPL,
    ),
    "attn_bwd_dq": (
        (("q", "T"), ("k", "T"), ("v", "T"), ("dout", "float"), ("lse", "float"), ("dsum", "float"),
         ("params", "int")),
        (("dq_out", "T"),),
        _TPL,
    ),
    "attn_bwd_dkv": (
        (("q", "T"), ("k", "T"), ("v", "T"), ("dout", "float"), ("lse", "float"), ("dsum", "float"),
         ("params", "int")),
        (("dk_out", "T"), ("dv_out", "T")),
        _TPL,
    ),
    "attn_decode_part": (
        (("q", "T"), ("keys", "T"), ("values", "T"), ("pos", "int"), ("params", "int")),
        (("part_acc", "float"), ("part_stat", "float")),
        _TPL,
    ),
    "attn_decode_combine": (
        (("part_acc", "float"), ("part_stat", "float"), ("pos", "int"), ("params", "int")),
        (("o", "T"),),
        ("T", "SL"),
    ),
}
for _name, _sig in KERNELS.items():
    K.OTHER_KERNELS[_name] = (BODY, _sig)

# Lanes per row on a GPU (one warp / simdgroup), and the most registers per lane the kernels may
# ask for (q/k dims, value columns): beyond that a row would spill.
GPU_LANES = 32
MAX_NZ = 32
MAX_NV = 128
# Decode (flash-decoding), the defaults of decode_attention_kernel's tuning knobs, picked from the
# H200 sweep (benchmarks/attention_kernels.py --only-decode --verbose-sweep; benchmarks/KERNELS.md):
# the one setting that beat SDPA in all 12 measured rows (1.09-1.38x, bf16/fp32, 1/4 heads, chunk
# 2048/4096, half-full and full chunks).
# - keys per split: a 2048-key chunk makes 64 splits of 32;
# - value columns per lane: a lane group (warp) owns W * 16 = 512 of the 2048 value columns, so
#   one head at position 2047 runs 64 splits x 4 slices = 256 groups;
# - combine lanes: lanes that share one output column's splits in the combine kernel.
DECODE_KEYS_PER_SPLIT = 32
DECODE_COLUMNS_PER_LANE = 16
DECODE_COMBINE_LANES = 8

# Where the kernels beat SDPA, per backend, from measurements (benchmarks/attention_kernels.py,
# recorded in benchmarks/KERNELS.md). "chunk": training / prefill chunk attention; "decode": the
# compiled one-token step. CUDA (H200): SDPA's tensor-core matmuls win chunk attention by 39-76x;
# the decode kernel wins by 1.09-1.38x. Metal has never been measured (no Mac), so it keeps SDPA;
# MEGALODON_ATTN_KERNEL=1 tries the kernels there.
PREFER_KERNEL_BY_BACKEND: Dict[str, Dict[str, bool]] = {
    "cuda": {"chunk": False, "decode": True},
    "metal": {"chunk": False, "decode": False},
}
PREFER_KERNEL: Dict[str, bool] = {"chunk": False, "decode": False}   # any other launcher (tests)


# ---------------------------------------------------------------------------------------------
# Generated, readable sources and the CPU harness

# Instantiations written into the generated files: (dtype, W, NZ, NV), the mega200M / 7B head
# dims (256, 2048) over 32 lanes (the decode kernels: the default columns per lane and combine
# lanes).
_GEN_CONFIGS = (("float", 32, 8, 64), ("bfloat16_t", 32, 8, 64), ("half", 32, 8, 64))


def _instances(kernel: str) -> List[Dict[str, object]]:
    return [dict(T=dt, W=w, NZ=nz, NV=DECODE_COLUMNS_PER_LANE if kernel == "attn_decode_part" else nv,
                 SL=DECODE_COMBINE_LANES) for dt, w, nz, nv in _GEN_CONFIGS]


def generate_metal() -> str:
    return K.generate_metal_source("chunk_attention.body", KERNELS, _instances)


def generate_cuda() -> str:
    return K.generate_cuda_source("chunk_attention.body", KERNELS, _instances)


# The CPU emulation: one lane per row (W = 1), T = float, register arrays of CPU_MAX_DIM.
CPU_MAX_DIM = 64


def generate_cpu() -> str:
    """The attention kernels for the CPU emulation: one lane per row (W = SL = 1), float32,
    head dims up to CPU_MAX_DIM."""
    return K.generate_cpu_source(KERNELS, dict(T="float", W=1, NZ=CPU_MAX_DIM, NV=CPU_MAX_DIM, SL=1))


class CpuLauncher:
    """Runs the attention kernel bodies on the CPU through g++ and ctypes, one lane per row, in
    float32 (tests of the kernels' arithmetic without a GPU). Outputs start as NaN, so an element
    no thread writes shows up."""
    lanes = 1
    max_dim = CPU_MAX_DIM

    def __init__(self, workdir: Optional[str] = None):
        self.workdir = workdir or tempfile.mkdtemp(prefix="mgk_attn_cpu_")
        self._lib: Optional[ctypes.CDLL] = None

    def lib(self) -> ctypes.CDLL:
        if self._lib is None:
            self._lib = K.compile_cpu_library(generate_cpu(), self.workdir, "mgk_attn", opt="-O2")
        return self._lib

    def __call__(self, name, inputs, templates, threads, output_shapes, output_dtypes):
        t = dict(templates)
        assert t.get("W", 1) == 1 and t.get("SL", 1) == 1 and t.get("NZ", CPU_MAX_DIM) == CPU_MAX_DIM
        fn = getattr(self.lib(), f"run_{name}")
        return K.call_cpu_kernel(fn, KERNELS[name][0], inputs, threads, output_shapes, output_dtypes)


_launcher = K.LauncherSlot("attention kernels")
set_launcher = _launcher.set


def _lanes_and_registers(launch, dz: int, dv: int) -> Tuple[int, int, int]:
    """(W, NZ, NV) for these head dims on this launcher."""
    w = getattr(launch, "lanes", GPU_LANES)
    if w == 1:
        if dz > CPU_MAX_DIM or dv > CPU_MAX_DIM:
            raise ValueError(f"the CPU emulation handles head dims <= {CPU_MAX_DIM}, got {dz} and {dv}")
        return 1, CPU_MAX_DIM, CPU_MAX_DIM
    return w, -(-dz // w), -(-dv // w)


# ---------------------------------------------------------------------------------------------
# Policy

def kernel_supported(q_shape: Sequence[int], v_dim: int, dtype) -> bool:
    """Shapes and dtypes the kernels handle, on whatever launcher is active."""
    if dtype not in (mx.float32, mx.bfloat16, mx.float16) or len(q_shape) != 4 or min(q_shape) < 1 or v_dim < 1:
        return False
    dz = q_shape[-1]
    if _launcher.override is not None:
        w = getattr(_launcher.override, "lanes", GPU_LANES)
        limit = getattr(_launcher.override, "max_dim", None)
        if limit is not None and (dz > limit or v_dim > limit):
            return False
    else:
        w = GPU_LANES
    return -(-dz // w) <= MAX_NZ and -(-v_dim // w) <= MAX_NV


def attention_kernel_wanted(kind: str, q_shape: Sequence[int], v_dim: int, chunk: int, dtype) -> bool:
    """Should attention of `kind` ("chunk": training / prefill; "decode": the one-token step) with
    q of shape B x H x L x dz, value head dim `v_dim`, chunk size `chunk`, run on the kernels?
    Only where a GPU backend (or a test launcher) is present, kernels are enabled
    (MEGALODON_KERNELS != 0) and the shape is supported; then MEGALODON_ATTN_KERNEL=1/0 forces the
    answer, else the measured default for the backend (``preferred``) gives it."""
    if kind not in PREFER_KERNEL:
        raise ValueError(f"unknown attention kind {kind!r}; expected one of {sorted(PREFER_KERNEL)}")
    if not K.kernels_enabled():
        return False
    if not _launcher.available():
        return False
    if not kernel_supported(q_shape, v_dim, dtype):
        return False
    force = os.environ.get("MEGALODON_ATTN_KERNEL")
    if force in ("0", "1"):
        return force == "1"
    return preferred(kind)


def preferred(kind: str) -> bool:
    """The measured default for `kind` on the active backend (a test launcher: PREFER_KERNEL)."""
    if _launcher.override is None:
        return PREFER_KERNEL_BY_BACKEND.get(K.gpu_backend() or "", PREFER_KERNEL)[kind]
    return PREFER_KERNEL[kind]


# ---------------------------------------------------------------------------------------------
# Chunk attention (training / prefill)

def _check_qkv(q, k, v):
    if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, k B x H x L x dz and v B x H x L x dv, got {q.shape}, {k.shape}, {v.shape}")


def _forward(q, k, v, chunk: int):
    launch = _launcher()
    B, H, L, DZ = q.shape
    DV = v.shape[-1]
    W, NZ, NV = _lanes_and_registers(launch, DZ, DV)
    params = K._params(B * H, L, chunk, DZ, DV, 0, 0)
    o, lse = launch("attn_fwd", [q, k, v, params], [("T", q.dtype), ("W", W), ("NZ", NZ), ("NV", NV)],
                    B * H * L * W, [(B, H, L, DV), (B, H, L)], [q.dtype, mx.float32])
    return o, lse


def _backward(q, k, v, o, lse, dout, chunk: int):
    launch = _launcher()
    B, H, L, DZ = q.shape
    DV = v.shape[-1]
    W, NZ, NV = _lanes_and_registers(launch, DZ, DV)
    params = K._params(B * H, L, chunk, DZ, DV, 0, 0)
    dout = dout.astype(mx.float32)
    dsum = (dout * o.astype(mx.float32)).sum(axis=-1)            # D_i = dO_i . o_i, B x H x L
    tpl = [("T", q.dtype), ("W", W), ("NZ", NZ), ("NV", NV)]
    args = [q, k, v, dout, lse, dsum, params]
    dq, = launch("attn_bwd_dq", args, tpl, B * H * L * W, [q.shape], [q.dtype])
    dk, dv = launch("attn_bwd_dkv", args, tpl, B * H * L * W, [k.shape, v.shape], [q.dtype, q.dtype])
    return dq, dk, dv


@lru_cache(maxsize=None)
def _attention_op(chunk: int):
    """The differentiable op for one chunk size: (q, k, v) -> (o, lse). The lse output is for
    the backward only: its cotangent is ignored."""
    @mx.custom_function
    def op(q, k, v):
        return _forward(q, k, v, chunk)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        q, k, v = primals
        o, lse = outputs
        return _backward(q, k, v, o, lse, cotangents[0], chunk)

    return op


def chunk_attention_kernel(q, k, v, chunk: int):
    """softmax(q kᵀ) v, causal inside each chunk of `chunk` steps (the last may be shorter), none
    across chunks, no scale. q, k: B x H x L x dz after RoPE, v: B x H x L x dv, all one dtype
    (float32, bfloat16 or float16; accumulation in float32). Returns B x H x L x dv in q's dtype."""
    _check_qkv(q, k, v)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    return _attention_op(int(chunk))(q, k, v)[0]


# ---------------------------------------------------------------------------------------------
# Decode (one token against the current chunk's buffers)

def _decode_plan(launch, C: int, DZ: int, DV: int, keys_per_split, columns_per_lane, combine_lanes):
    """(W, NZ, NV, keys per split, splits NS, value columns per slice VS, combine lanes SL)."""
    W, NZ, nv_max = _lanes_and_registers(launch, DZ, DV)
    kps = max(1, min(C, keys_per_split or DECODE_KEYS_PER_SPLIT))
    cpl = columns_per_lane or DECODE_COLUMNS_PER_LANE
    if cpl < 1:
        raise ValueError(f"columns_per_lane must be >= 1, got {cpl}")
    # No more columns per lane than the value row has (one slice then), nor than fit in registers.
    cpl = min(cpl, -(-DV // W), MAX_NV)
    sl = 1 if W == 1 else (combine_lanes or DECODE_COMBINE_LANES)
    if sl < 1 or sl > GPU_LANES or sl & (sl - 1):
        raise ValueError(f"combine_lanes must be a power of two in 1..{GPU_LANES}, got {sl}")
    # The CPU emulation's register arrays are CPU_MAX_DIM long whatever the slice (W = 1).
    nv = nv_max if W == 1 else cpl
    return W, NZ, nv, kps, -(-C // kps), W * cpl, sl


def decode_attention_kernel(q, keys, values, pos, keys_per_split: Optional[int] = None, *,
                            columns_per_lane: Optional[int] = None, combine_lanes: Optional[int] = None):
    """q: B x H x 1 x dz (after RoPE), keys: B x H x C x dz, values: B x H x C x dv (chunk-long
    buffers), pos: int or int array (one element), the query's chunk position; attends to buffer
    rows 0..pos. Returns B x H x 1 x dv in q's dtype. Not differentiable (decoding only).

    Tuning knobs (None: the module defaults DECODE_*): keys_per_split, the keys of one flash-decoding
    split; columns_per_lane, the value columns each lane accumulates (a lane group owns
    lanes x columns_per_lane of them and recomputes its split's scores); combine_lanes, the lanes
    (a power of two) sharing one output column's splits in the combine kernel."""
    if q.ndim != 4 or q.shape[2] != 1 or keys.ndim != 4 or keys.shape[:2] != q.shape[:2] \
            or keys.shape[-1] != q.shape[-1] or values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"expected q B x H x 1 x dz, keys B x H x C x dz, values B x H x C x dv; "
                         f"got {q.shape}, {keys.shape}, {values.shape}")
    launch = _launcher()
    B, H, _, DZ = q.shape
    C, DV = keys.shape[2], values.shape[-1]
    W, NZ, NV, kps, NS, VS, SL = _decode_plan(launch, C, DZ, DV, keys_per_split, columns_per_lane, combine_lanes)
    slices = -(-DV // VS)
    pos = (pos if isinstance(pos, mx.array) else mx.array(pos)).astype(mx.int32).reshape(1)
    params = K._params(B * H, C, C, DZ, DV, NS, kps, VS)
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    # Only the splits holding a visible key are written and read: no initialization needed.
    part_acc, part_stat = launch("attn_decode_part", [q, keys, values, pos, params],
                                 [("T", q.dtype), ("W", W), ("NZ", NZ), ("NV", NV)], B * H * NS * slices * W,
                                 [(B * H, NS, DV), (B * H, NS, 2)], [mx.float32, mx.float32])
    out, = launch("attn_decode_combine", [part_acc, part_stat, pos, params], [("T", q.dtype), ("SL", SL)],
                  B * H * DV * SL, [(B, H, 1, DV)], [q.dtype])
    return out
