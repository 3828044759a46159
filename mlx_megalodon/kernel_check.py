"""A first-use check of the custom kernels on GPU backends where nobody has run them.

No Mac was available to this project, so the Metal builds of the kernels have never executed (their
shared bodies ran on CUDA and in the CPU emulation). The first ``Model`` built in a process on such
a backend runs each kernel that the dispatch policy would use on a small case, forward and
gradients, against the pure-ops path. If a kernel fails to build, raises, or disagrees, every
kernel is turned off for the process (as ``MEGALODON_KERNELS=0`` does) with one warning on
stderr: a kernel that does not work on a new machine costs speed, never a wrong or broken model.
``MEGALODON_KERNELS=0`` skips the check; ``=1`` keeps it.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import kernels as K

UNMEASURED_BACKENDS = ("metal",)
RTOL = 1e-3                     # relative Frobenius error, float32 (measured kernels agree to ~1e-6)
RTOL_BF16 = 3e-2                # bf16 input against the same rounded input on the ops path (~1e-2 measured)
_results: Dict[str, bool] = {}


def _rel(a: mx.array, b: mx.array) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _compare(name: str, fast: Callable, reference: Callable, inputs: List[mx.array],
             differentiable: bool = True, rtol: float = RTOL) -> Optional[str]:
    """Outputs (and, if differentiable, the gradient of a weighted sum in every input), kernel vs
    ops; a reason or None."""
    weights = [mx.array(np.random.default_rng(7 + i).normal(size=o.shape).astype(np.float32))
               for i, o in enumerate(reference(*inputs))]

    def loss(fn):
        return lambda *xs: sum((o.astype(mx.float32) * w).sum() for o, w in zip(fn(*xs), weights))
    argnums = tuple(range(len(inputs)))
    got, want = [fast(*inputs)], [reference(*inputs)]
    if differentiable:
        got.append(mx.grad(loss(fast), argnums=argnums)(*inputs))
        want.append(mx.grad(loss(reference), argnums=argnums)(*inputs))
    mx.eval(got, want)
    for what, g, w in zip(("output", "gradient"), got, want):
        for i, (a, b) in enumerate(zip(g, w)):
            err = _rel(a, b)
            if not err <= rtol:        # also catches NaN
                return f"{name} {what} {i} differs from the ops path by {err:.2g}"
    return None


def _cema_case() -> Tuple[Callable, Callable, List[mx.array], bool]:
    from .complex_exponential_moving_average import CEMACoefficients, cema_recurrence
    rng = np.random.default_rng(0)        # numpy: the check never moves MLX's global random state
    B, L, D, N = 2, 37, 8, 4
    f = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))  # noqa: E731
    p = mx.array(rng.uniform(0.1, 0.9, (D, N)).astype(np.float32))
    log_mag = mx.array(np.log(rng.uniform(0.5, 0.95, (D, N))).astype(np.float32))
    phase = mx.array(rng.uniform(0.0, np.pi, (D, N)).astype(np.float32))
    static = (p, log_mag, phase, f(D, N), f(D, N), f(D))

    def run(scan):
        def fn(x, h_re, h_im):
            y, (re, im) = scan(x, CEMACoefficients(*static), (h_re, h_im), True)
            return y, re, im
        return fn
    return run(K.cema_kernel_scan), run(cema_recurrence), [f(B, L, D), f(B, D, N), f(B, D, N)], True


def _cema_bf16_case() -> Tuple[Callable, Callable, List[mx.array], bool, float]:
    """The bfloat16 instantiation (training and inference in bf16 compute use it): x rounded to bf16
    for both paths, so only the kernel's own arithmetic differs."""
    fast, reference, inputs, _ = _cema_case()
    x = inputs[0].astype(mx.bfloat16)
    return (lambda h_re, h_im: fast(x, h_re, h_im),
            lambda h_re, h_im: reference(x.astype(mx.float32), h_re, h_im), inputs[1:], True, RTOL_BF16)


def _cema_no_final_state_case() -> Tuple[Callable, Callable, List[mx.array], bool]:
    """What training runs: y only (return_state=False), so the backward takes the GHT0 = 1 kernels
    (no final-state cotangent); gradients in the incoming state and every coefficient too."""
    from .complex_exponential_moving_average import CEMACoefficients, cema_recurrence
    rng = np.random.default_rng(3)
    B, L, D, N = 2, 37, 8, 4
    f = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))  # noqa: E731
    coeffs = [mx.array(rng.uniform(0.1, 0.9, (D, N)).astype(np.float32)),
              mx.array(np.log(rng.uniform(0.5, 0.95, (D, N))).astype(np.float32)),
              mx.array(rng.uniform(0.0, np.pi, (D, N)).astype(np.float32)), f(D, N), f(D, N), f(D)]

    def run(scan):
        def fn(x, h_re, h_im, *cs):
            return (scan(x, CEMACoefficients(*cs), (h_re, h_im), False)[0],)
        return fn
    return run(K.cema_kernel_scan), run(cema_recurrence), [f(B, L, D), f(B, D, N), f(B, D, N), *coeffs], True


def _timestep_norm_ops(*args):
    """timestep_norm on its ops path (the kernel forced off for this call's graph)."""
    from .timestep_norm import timestep_norm
    saved = os.environ.get("MEGALODON_TNORM_KERNEL")
    os.environ["MEGALODON_TNORM_KERNEL"] = "0"
    try:
        return timestep_norm(*args)
    finally:
        if saved is None:
            os.environ.pop("MEGALODON_TNORM_KERNEL")
        else:
            os.environ["MEGALODON_TNORM_KERNEL"] = saved


def _timestep_norm_case() -> Optional[Tuple[Callable, Callable, List[mx.array], bool]]:
    from . import timestep_norm_kernels as TK
    from .timestep_norm import TimestepNormState
    rng = np.random.default_rng(1)
    B, L, D, G = 2, 37, 64, 4
    if not TK.kernel_wanted((B, L, D), G):
        return None
    x = mx.array((rng.normal(size=(B, L, D)) * 2 + 1).astype(np.float32))
    weight = mx.array(rng.normal(size=D).astype(np.float32) * 0.1)
    bias = mx.array(rng.normal(size=D).astype(np.float32) * 0.1)
    count = mx.full((B,), 5.0)
    mean, var = (mx.array(rng.uniform(0.5, 1.5, (B, G)).astype(np.float32)) for _ in range(2))

    def kernel(x, weight, bias):
        y, _, m, v = TK.timestep_norm_kernel(x, weight, bias, count, mean, var, G, 1e-5)
        return y, m, v

    def ops(x, weight, bias):
        y, state = _timestep_norm_ops(x, weight, bias, TimestepNormState(count, mean, var), G, 1e-5)
        return y, state.mean, state.var
    return kernel, ops, [x, weight, bias], True


def _decode_attention_case() -> Optional[Tuple[Callable, Callable, List[mx.array], bool]]:
    from . import attention_kernels as A
    rng = np.random.default_rng(2)
    B, H, C, dz, dv, pos = 1, 2, 64, 16, 32, 40
    if not A.attention_kernel_wanted("decode", (B, H, 1, dz), dv, C, mx.float32):
        return None
    q, k = (mx.array((rng.normal(size=s) * 0.3).astype(np.float32)) for s in ((B, H, 1, dz), (B, H, C, dz)))
    v = mx.array(rng.normal(size=(B, H, C, dv)).astype(np.float32))
    position = mx.array(pos, dtype=mx.int32)
    visible = mx.arange(C) <= pos
    return (lambda q, k, v: (A.decode_attention_kernel(q, k, v, position),),
            lambda q, k, v: (mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=visible),),
            [q, k, v], False)          # decoding only: the kernel has no gradient


def _cross_entropy_case() -> Optional[Tuple[Callable, Callable, List[mx.array], bool, float]]:
    """The fused cross entropy (only where the policy would use it: off until measured), on bf16
    logits as training gives it, against the ops path on the same rounded logits; a vocabulary
    that is no multiple of the lanes' stride and a target at each row's max."""
    from . import cross_entropy_kernels as XK
    rng = np.random.default_rng(4)
    B, L, V = 2, 5, 1000
    if not XK.ce_kernel_wanted((B, L, V), mx.bfloat16):
        return None
    # float32 values that bf16 holds exactly; the gradient comes back through the cast in float32
    logits = mx.array((rng.normal(size=(B, L, V)) * 4).astype(np.float32)).astype(mx.bfloat16).astype(mx.float32)
    targets = rng.integers(0, V, (B, L)).astype(np.int32)
    targets[0, 0] = np.argmax(np.array(logits[0, 0]))
    targets = mx.array(targets)
    return (lambda x: (XK.cross_entropy_kernel(x.astype(mx.bfloat16), targets, validate=False),),
            lambda x: (XK.cross_entropy_ops(x.astype(mx.bfloat16), targets),), [logits], True, RTOL_BF16)


def _layer_norm_case() -> Optional[Tuple[Callable, Callable, List[mx.array], bool]]:
    """The LayerNorm kernel backward (only where the policy would use it), against MLX's own vjp; a
    row length that is no multiple of the lanes and rows that do not fill the last group."""
    from . import layer_norm_kernels as NK
    rng = np.random.default_rng(5)
    R, D = 37, 100
    if not NK.ln_kernel_wanted((R, D), mx.float32):
        return None
    x = mx.array((rng.normal(size=(R, D)) * 2 + 0.5).astype(np.float32))
    weight = mx.array(rng.normal(size=(D,)).astype(np.float32))
    bias = mx.array(rng.normal(size=(D,)).astype(np.float32))
    return (lambda *a: (NK.layer_norm(*a, 1e-5),), lambda *a: (mx.fast.layer_norm(*a, 1e-5),),
            [x, weight, bias], True)


CASES = (("CEMA scan", _cema_case), ("CEMA scan, bfloat16 input", _cema_bf16_case),
         ("CEMA scan, no final state", _cema_no_final_state_case),
         ("TimestepNorm", _timestep_norm_case), ("decode attention", _decode_attention_case),
         ("cross entropy", _cross_entropy_case), ("LayerNorm", _layer_norm_case))


def check(cases=CASES) -> Optional[str]:
    """Run every case the dispatch policy would use; the first failure's reason, or None."""
    for name, make in cases:
        try:
            case = make()
            if case is not None:
                reason = _compare(name, *case)
                if reason:
                    return reason
        except Exception as e:  # a kernel that does not build or launch: the reason is its error
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"{name}: {type(e).__name__}: {first}"
    return None


def ensure_kernels_work(backend: Optional[str] = None, stream=None) -> bool:
    """On an unmeasured backend, check the kernels once per process and turn them all off if the
    check fails. Returns whether kernels are on afterwards."""
    backend = K.gpu_backend() if backend is None else backend
    if backend not in UNMEASURED_BACKENDS or not K.kernels_enabled():
        return K.kernels_enabled()
    if backend not in _results:
        reason = check()
        _results[backend] = reason is None
        if reason is not None:
            K.disable_kernels(reason)
            print(f"mlx-megalodon: custom {backend} kernels are off for this process (their first-use check "
                  f"failed: {reason}); the pure-MLX path runs instead. Please report this.",
                  file=stream or sys.stderr)
    return K.kernels_enabled()
