"""Custom Metal / CUDA kernels: the fused CEMA scan, and the switch that enables them.

The kernel bodies are written once, in ``metal/cema_scan.body`` (backend-neutral C++), and put
behind a thin per-backend prelude (``metal/prelude_metal.h``, ``prelude_cuda.h``; ``prelude_cpu.h``
runs them one thread at a time on the CPU for tests). This module assembles them at first use into
``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel`` objects; nothing is built at import, since
constructing a CUDA kernel on a CPU-only MLX raises. ``python -m mlx_megalodon.kernels`` rewrites
the generated, human-readable ``metal/cema_scan.metal`` and ``metal/cema_scan.cu`` (for reading and
for the syntax check; MLX compiles the assembled strings, not these files).

The scan is a chunked two-level scan over the sequence (see cema_scan.body for the maths): per
chunk local end states from zero, a short sequential combine across chunks with q**C, then a
re-scan of every chunk from its true incoming state. The backward pass is the same in reverse time
and needs no stored forward states. Packed rows (document starts, the state restarting from zero
at each) take the RESET = 1 instantiation of the same kernels. ``MEGALODON_KERNELS=0`` forces the
pure-ops path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import mlx.core as mx

# ---------------------------------------------------------------------------------------------
# Kernel sources

_HERE = Path(__file__).resolve().parent
# Installed: mlx_megalodon/metal (package data); from a checkout: <repo>/metal.
_SOURCE_DIRS = (_HERE / "metal", _HERE.parent / "metal")


def source_dir() -> Path:
    for d in _SOURCE_DIRS:
        if (d / "cema_scan.body").is_file():
            return d
    raise FileNotFoundError(f"kernel sources (cema_scan.body) not found in {list(map(str, _SOURCE_DIRS))}")


# name -> (inputs, outputs, template parameters). An argument is (name, type) with type "T" (the
# dtype of x), "TY" (the dtype of y and its cotangent gy), "float" or "int"; template parameters are
# ("T" | "TY" | "NPT" | "NSPLIT" | "RESET" | "GHT0" | "DSTRIDE").
# CEMA: `starts` (B x L document starts) is read only when RESET = 1 (packed rows). GHT0 = 1
# (backward): the final-state cotangent is zero, the cheaper gamma-free scan (see the body).
# DSTRIDE (forward scans): D compiled in (GPU launches), or 0 to read it at run time.
KERNELS: Dict[str, Tuple[Tuple[Tuple[str, str], ...], Tuple[Tuple[str, str], ...], Tuple[str, ...]]] = {
    "cema_fwd_local": (
        (("x", "T"), ("p", "float"), ("log_mag", "float"), ("phase", "float"), ("starts", "int"),
         ("params", "int")),
        (("loc", "float"),),
        ("T", "NPT", "NSPLIT", "RESET", "DSTRIDE"),
    ),
    "cema_fwd_combine": (
        (("loc", "float"), ("h0_re", "float"), ("h0_im", "float"), ("log_mag", "float"), ("phase", "float"),
         ("starts", "int"), ("params", "int")),
        (("h_in", "float"),),
        ("NPT", "NSPLIT", "RESET"),
    ),
    "cema_fwd_final": (
        (("x", "T"), ("p", "float"), ("log_mag", "float"), ("phase", "float"), ("gamma_re", "float"),
         ("gamma_im", "float"), ("omega", "float"), ("h0_re", "float"), ("h0_im", "float"), ("h_in", "float"),
         ("starts", "int"), ("params", "int")),
        (("y", "TY"), ("h_out_re", "float"), ("h_out_im", "float")),
        ("T", "TY", "NPT", "NSPLIT", "RESET", "DSTRIDE"),
    ),
    "cema_bwd_local": (
        (("gy", "TY"), ("log_mag", "float"), ("phase", "float"), ("gamma_re", "float"),
         ("gamma_im", "float"), ("starts", "int"), ("params", "int")),
        (("loc", "float"),),
        ("TY", "NPT", "NSPLIT", "RESET", "GHT0"),
    ),
    "cema_bwd_combine": (
        (("loc", "float"), ("ghT_re", "float"), ("ghT_im", "float"), ("log_mag", "float"), ("phase", "float"),
         ("starts", "int"), ("params", "int")),
        (("carry", "float"),),
        ("NPT", "NSPLIT", "RESET"),
    ),
    "cema_bwd_final": (
        (("x", "T"), ("gy", "TY"), ("p", "float"), ("log_mag", "float"), ("phase", "float"),
         ("gamma_re", "float"), ("gamma_im", "float"), ("omega", "float"), ("h0_re", "float"), ("h0_im", "float"),
         ("ghT_re", "float"), ("ghT_im", "float"), ("carry", "float"), ("starts", "int"), ("params", "int")),
        (("gx", "T"), ("part", "float"), ("gomega", "float"), ("gh0_re", "float"), ("gh0_im", "float")),
        ("T", "TY", "NPT", "NSPLIT", "RESET", "GHT0"),
    ),
}

# Kernels of other bodies, registered by their modules (attention_kernels.py):
# name -> (body file, (inputs, outputs, template parameters)).
OTHER_KERNELS: Dict[str, Tuple[str, tuple]] = {}


def _body_and_signature(kernel: str) -> Tuple[str, tuple]:
    if kernel in KERNELS:
        return "cema_scan.body", KERNELS[kernel]
    return OTHER_KERNELS[kernel]


_MARK = re.compile(r"^//@ (header|entry|kernel (\w+))\s*$", re.M)


def _sections(text: str) -> Dict[str, str]:
    """Split a file at `//@ header`, `//@ entry`, `//@ kernel NAME` lines; text before the first
    marker is kept under "" (a prelude's own header part)."""
    out: Dict[str, str] = {}
    marks = list(_MARK.finditer(text))
    out[""] = text[: marks[0].start()] if marks else text
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out[m.group(2) or m.group(1)] = text[m.end():end].strip("\n") + "\n"
    return out


@lru_cache(maxsize=None)
def _read(name: str) -> str:
    return (source_dir() / name).read_text()


def assemble(backend: str, kernel: str) -> Tuple[str, str]:
    """(header, body source) of one kernel for `backend` in {"metal", "cuda", "cpu"}."""
    prelude = _sections(_read(f"prelude_{backend}.h"))
    body = _sections(_read(OTHER_KERNELS[kernel][0] if kernel in OTHER_KERNELS else "cema_scan.body"))
    if kernel not in body:
        raise KeyError(kernel)
    header = prelude[""].rstrip("\n") + "\n\n" + body["header"]
    return header, prelude["entry"] + body[kernel]


def _source_tag(body: str = "cema_scan.body") -> str:
    h = hashlib.sha1()
    for f in (body, "prelude_metal.h", "prelude_cuda.h", "prelude_cpu.h"):
        h.update(_read(f).encode())
    return h.hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# Generated, readable sources (metal/cema_scan.metal, metal/cema_scan.cu) and the CPU harness

_GEN_NOTE = "// GENERATED by `python -m mlx_megalodon.kernels` from {body} + {prelude}; do not edit.\n"
CUDA_DTYPE = {"float": "float", "bfloat16_t": "__nv_bfloat16", "half": "__half"}
# One kernel's signature: (inputs, outputs, template parameter names), as in KERNELS.
Signature = Tuple[Tuple[Tuple[str, str], ...], Tuple[Tuple[str, str], ...], Tuple[str, ...]]
DTYPE_TPARAMS = ("T", "TY")   # template parameters that are types (the others are ints)


def template_decl(tparams: Sequence[str]) -> str:
    params = [f"typename {t}" if t in DTYPE_TPARAMS else f"int {t}" for t in tparams]
    return f"template <{', '.join(params)}>\n"


def template_args(tparams: Sequence[str], values: Dict[str, object]) -> str:
    return "<" + ", ".join(str(values[t]) for t in tparams) + ">"


def _distinct(tparams, configs: Iterable[Dict[str, object]]) -> List[Dict[str, object]]:
    seen, out = set(), []
    for values in configs:
        key = template_args(tparams, values)
        if key not in seen:
            seen.add(key)
            out.append(values)
    return out


def generate_metal_source(body: str, kernels: Dict[str, Signature],
                          instances: Callable[[str], Iterable[Dict[str, object]]]) -> str:
    """Every kernel of ``body`` as a full Metal function with the signature mx.fast.metal_kernel
    would write, instantiated for ``instances(name)`` (template values, T in Metal spelling)."""
    header, _ = assemble("metal", next(iter(kernels)))
    parts = [_GEN_NOTE.format(body=body, prelude="prelude_metal.h"), header, "\n"]
    for name, (ins, outs, tparams) in kernels.items():
        _, src = assemble("metal", name)
        args = [f"  const device {ty}* {arg} [[buffer({i})]]" for i, (arg, ty) in enumerate(ins)]
        args += [f"  device {ty}* {arg} [[buffer({len(ins) + i})]]" for i, (arg, ty) in enumerate(outs)]
        args.append("  uint3 thread_position_in_grid [[thread_position_in_grid]]")
        parts.append(f"// ---- kernel {name}\n" + template_decl(tparams) + f"[[kernel]] void {name}(\n"
                     + ",\n".join(args) + ") {\n" + src + "}\n")
        for values in _distinct(tparams, instances(name)):
            targs = template_args(tparams, values)
            host = name + re.sub(r"[<>, ]+", "_", targs).rstrip("_")
            parts.append(f'template [[host_name("{host}")]] [[kernel]] decltype({name}{targs}) {name}{targs};\n')
        parts.append("\n")
    return "".join(parts)


def generate_cuda_source(body: str, kernels: Dict[str, Signature],
                         instances: Callable[[str], Iterable[Dict[str, object]]]) -> str:
    """Every kernel of ``body`` as a CUDA function in the shape mx.fast.cuda_kernel builds (MLX puts
    its own header first: `#include "mlx/backend/cuda/device/utils.cuh"`, fp16/bf16 types,
    cooperative_groups; MLX writes `using T = ...; constexpr int NPT = ...;` where this file has
    template parameters)."""
    header, _ = assemble("cuda", next(iter(kernels)))
    parts = [_GEN_NOTE.format(body=body, prelude="prelude_cuda.h"),
             "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n\n", header, "\nnamespace mlx::core::cu {\n\n"]
    for name, (ins, outs, tparams) in kernels.items():
        _, src = assemble("cuda", name)
        args = [f"    const {ty}* {arg}" for arg, ty in ins] + [f"    {ty}* {arg}" for arg, ty in outs]
        parts.append(f"// ---- kernel {name}\n" + template_decl(tparams) + f"__global__ void {name}(\n"
                     + ",\n".join(args) + ") {\n" + src + "}\n")
        for values in _distinct(tparams, instances(name)):
            tnames = {t: CUDA_DTYPE[values.get(t, "float")] for t in DTYPE_TPARAMS}
            targs = template_args(tparams, {**values, **tnames})
            sig = ", ".join([f"const {tnames.get(ty, ty)}*" for _, ty in ins]
                            + [f"{tnames.get(ty, ty)}*" for _, ty in outs])
            parts.append(f"template __global__ void {name}{targs}({sig});\n")
        parts.append("\n")
    parts.append("}  // namespace mlx::core::cu\n")
    return "".join(parts)


# Instantiations written into the generated CEMA files (dtype, NPT, NSPLIT, RESET, DSTRIDE), each
# backward kernel with GHT0 = 0 and 1 (the forward kernels have no GHT0, the backward ones no
# DSTRIDE: duplicates are dropped).
_GEN_CONFIGS = (("float", 16, 1, 0, 1024), ("float", 16, 1, 0, 0), ("float", 4, 4, 0, 0), ("bfloat16_t", 8, 2, 0, 0),
                ("half", 4, 4, 0, 0), ("float", 16, 1, 1, 0), ("bfloat16_t", 8, 2, 1, 0))


def _instances(kernel: str) -> List[Dict[str, object]]:
    # TY = T: y and gy in x's dtype, as a training step in that dtype runs them.
    return [dict(T=dt, TY=dt, NPT=npt, NSPLIT=ns, RESET=rs, DSTRIDE=ds, GHT0=g0)
            for dt, npt, ns, rs, ds in _GEN_CONFIGS for g0 in (0, 1)]


def generate_metal() -> str:
    return generate_metal_source("cema_scan.body", KERNELS, _instances)


def generate_cuda() -> str:
    return generate_cuda_source("cema_scan.body", KERNELS, _instances)


def generate_cpu_source(kernels: Dict[str, Signature], values: Dict[str, object]) -> str:
    """C++ that runs every kernel of one family one thread at a time with the template `values`
    (T = float for the emulation), with an extern "C" entry `run_<kernel>(inputs..., outputs...,
    n_threads)` per kernel; inputs and outputs of type T or TY are float there."""
    header, _ = assemble("cpu", next(iter(kernels)))
    parts = [header, "\n"]
    for name, (ins, outs, tparams) in kernels.items():
        _, src = assemble("cpu", name)
        args = [f"const {ty}* {arg}" for arg, ty in ins] + [f"{ty}* {arg}" for arg, ty in outs]
        parts.append(template_decl(tparams) + f"static void {name}({', '.join(args)}, unsigned int mgk_cpu_tid) {{\n"
                     + src + "}\n")
        cargs = [f"const {'float' if ty in DTYPE_TPARAMS else ty}* {arg}" for arg, ty in ins] + \
                [f"{'float' if ty in DTYPE_TPARAMS else ty}* {arg}" for arg, ty in outs]
        names = ", ".join(a for a, _ in ins + outs)
        parts.append(f'extern "C" void run_{name}({", ".join(cargs)}, unsigned int n_threads) {{\n'
                     f"  for (unsigned int t = 0; t < n_threads; ++t) {name}{template_args(tparams, values)}({names}, t);\n}}\n\n")
    return "".join(parts)


def generate_cpu(npt: int, reset: int = 0, ght0: int = 0, dstride: int = 0) -> str:
    """The CEMA kernels for the CPU emulation (T = TY = float, NPT = npt, NSPLIT = 1, RESET = reset,
    GHT0 = ght0, DSTRIDE = dstride)."""
    return generate_cpu_source(KERNELS, dict(T="float", TY="float", NPT=npt, NSPLIT=1, RESET=reset, GHT0=ght0, DSTRIDE=dstride))


def write_generated(directory: Optional[Path] = None) -> List[Path]:
    """Rewrite the readable <body>.metal / <body>.cu of every kernel family."""
    # imported here, not at the top: they import this module
    from . import attention_kernels as A, cross_entropy_kernels as X, layer_norm_kernels as N, timestep_norm_kernels as T
    directory = Path(directory) if directory is not None else source_dir()
    out = []
    for stem, module in (("cema_scan", None), ("chunk_attention", A), ("timestep_norm", T),
                         ("cross_entropy", X), ("layer_norm", N)):
        gen_metal, gen_cuda = (generate_metal, generate_cuda) if module is None else (module.generate_metal,
                                                                                      module.generate_cuda)
        for suffix, generate in ((".metal", gen_metal), (".cu", gen_cuda)):
            path = directory / (stem + suffix)
            path.write_text(generate())
            out.append(path)
    return out


# ---------------------------------------------------------------------------------------------
# Backends and launchers

_disabled_reason: Optional[str] = None


def kernels_enabled() -> bool:
    """MEGALODON_KERNELS != 0, and no failed first-use check (kernel_check) turned them off."""
    return os.environ.get("MEGALODON_KERNELS", "1") != "0" and _disabled_reason is None


def disable_kernels(reason: Optional[str]) -> None:
    """Turn every kernel family off for this process (None turns them back on: tests)."""
    global _disabled_reason
    _disabled_reason = reason


@lru_cache(maxsize=None)
def gpu_backend() -> Optional[str]:
    """"cuda" or "metal" when MLX has that GPU backend here, else None."""
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:
        pass
    try:
        if mx.cuda.is_available():
            return "cuda"
    except Exception:
        pass
    return None


class GpuLauncher:
    """Builds each kernel on first use (never at import) and launches it on the default GPU stream."""
    max_split = 32
    compile_time_stride = True   # the forward scans get D compiled in (DSTRIDE): one build per D

    def __init__(self, backend: str):
        self.backend = backend
        self._kernels: Dict[str, object] = {}
        # Threads per threadgroup / block: a multiple of the warp / simdgroup width (32).
        self.threadgroup = 128

    def _kernel(self, name: str):
        k = self._kernels.get(name)
        if k is None:
            header, src = assemble(self.backend, name)
            body_file, (ins, outs, _) = _body_and_signature(name)
            kname = f"mgk_{name}_{_source_tag(body_file)}"  # source hash in the name: no stale JIT cache
            if self.backend == "cuda":
                k = mx.fast.cuda_kernel(name=kname, input_names=[a for a, _ in ins],
                                        output_names=[a for a, _ in outs], source=src, header=header)
            else:
                k = mx.fast.metal_kernel(name=kname, input_names=[a for a, _ in ins],
                                         output_names=[a for a, _ in outs], source=src, header=header)
            self._kernels[name] = k
        return k

    def __call__(self, name, inputs, templates, threads, output_shapes, output_dtypes):
        return self._kernel(name)(
            inputs=inputs, template=templates, grid=(threads, 1, 1), threadgroup=(self.threadgroup, 1, 1),
            output_shapes=output_shapes, output_dtypes=output_dtypes)


class CpuLauncher:
    """Runs the kernel bodies on the CPU through g++ and ctypes, one thread at a time (NSPLIT = 1,
    float32 only). For tests of the kernels' arithmetic where no GPU exists; outputs start as NaN
    so an element no thread writes shows up."""
    max_split = 1

    def __init__(self, workdir: Optional[str] = None, compile_time_stride: bool = False):
        self.workdir = workdir or tempfile.mkdtemp(prefix="mgk_cpu_")
        # False: one library serves every D (DSTRIDE = 0); True: the GPU launches' D-specific build
        self.compile_time_stride = compile_time_stride
        self._libs: Dict[Tuple[int, int, int, int], ctypes.CDLL] = {}

    def _lib(self, npt: int, reset: int = 0, ght0: int = 0, dstride: int = 0) -> ctypes.CDLL:
        key = (npt, reset, ght0, dstride)
        lib = self._libs.get(key)
        if lib is None:
            lib = self._libs[key] = compile_cpu_library(generate_cpu(*key), self.workdir,
                                                        "mgk_{}_{}_{}_{}".format(*key))
        return lib

    def __call__(self, name, inputs, templates, threads, output_shapes, output_dtypes):
        t = dict(templates)
        assert t["NSPLIT"] == 1
        fn = getattr(self._lib(t["NPT"], t.get("RESET", 0), t.get("GHT0", 0), t.get("DSTRIDE", 0)), f"run_{name}")
        return call_cpu_kernel(fn, KERNELS[name][0], inputs, threads, output_shapes, output_dtypes)


def compile_cpu_library(source: str, workdir: str, stem: str, opt: str = "-O1") -> ctypes.CDLL:
    """g++-compile a CPU-emulation source into ``workdir`` (named by its hash, so a rebuilt source
    never loads a stale library) and load it."""
    cpp = Path(workdir) / f"{stem}_{hashlib.sha1(source.encode()).hexdigest()[:10]}.cpp"
    so = cpp.with_suffix(".so")
    if not so.exists():
        cpp.write_text(source)
        subprocess.run(["g++", "-std=c++17", opt, "-shared", "-fPIC", "-o", str(so), str(cpp)],
                       check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(so))


def call_cpu_kernel(fn, input_types, inputs, threads, output_shapes, output_dtypes):
    """Run a compiled CPU-emulation entry ``fn(inputs..., outputs..., n_threads)``: inputs as
    float32 / int32 host copies (``input_types``: (name, "int" | other) pairs), outputs starting as
    NaN so an element no thread writes shows up."""
    import numpy as np
    arrays = [np.ascontiguousarray(np.array(a.astype(mx.int32 if ty == "int" else mx.float32)))
              for a, (_, ty) in zip(inputs, input_types)]
    results = [np.full(tuple(s), np.nan, dtype=np.float32) for s in output_shapes]
    ptrs = [arr.ctypes.data_as(ctypes.c_void_p) for arr in arrays + results]
    fn(*ptrs, ctypes.c_uint(threads))
    return [mx.array(r).astype(dt) for r, dt in zip(results, output_dtypes)]


@lru_cache(maxsize=None)
def _gpu_launcher(backend: str) -> GpuLauncher:
    return GpuLauncher(backend)


class LauncherSlot:
    """Where one kernel family gets its launcher: a test override when one is set (e.g. a
    CpuLauncher, so kernel bodies run on the CPU), else this backend's GPU launcher."""

    def __init__(self, family: str):
        self.family = family
        self.override = None

    def set(self, launcher) -> None:
        """Tests: route this family's launches through `launcher`; None undoes it."""
        self.override = launcher

    def available(self) -> bool:
        return self.override is not None or gpu_backend() is not None

    def policy(self, env: str, defaults: Dict[str, bool], prefer_under_test: bool) -> bool:
        """A kernel family's answer once its own checks pass: the environment variable `env` = 1 / 0
        forces it; else under a test launcher `prefer_under_test`, and on a GPU the family's
        measured default for the backend (False where none is recorded)."""
        force = os.environ.get(env)
        if force in ("0", "1"):
            return force == "1"
        if self.override is None:
            return defaults.get(gpu_backend() or "", False)
        return prefer_under_test

    def __call__(self):
        if self.override is not None:
            return self.override
        backend = gpu_backend()
        if backend is None:
            raise RuntimeError(f"no GPU backend for the {self.family}")
        return _gpu_launcher(backend)


_launcher = LauncherSlot("CEMA kernels")
set_launcher = _launcher.set


def cema_kernel_available(length: int) -> bool:
    """True where cema_scan should use the kernel: kernels enabled, a GPU backend (or a test
    launcher) present, and a non-empty sequence."""
    if length < 1 or not kernels_enabled():
        return False
    return _launcher.available()


# ---------------------------------------------------------------------------------------------
# The CEMA scan

# Work split. Overridable (benchmarks, tests): threads wanted in flight per launch; shortest chunk;
# most state dims one thread keeps in registers in the forward / backward scans.
TARGET_THREADS = 264 * 1024
MIN_CHUNK = 32
FWD_MAX_NPT = 16
BWD_MAX_NPT = 4
CHUNK_OVERRIDE: Optional[int] = None  # tests: force this chunk length
# Dtypes the kernels read x in and write y / read gy in (float32 accumulation throughout).
Y_DTYPES = (mx.float32, mx.bfloat16, mx.float16)


def _split(N: int, max_npt: int, max_split: int) -> int:
    """Threads per (b, d): the smallest power of two dividing N that leaves <= max_npt dims each."""
    s = 1
    while N // s > max_npt and N % (2 * s) == 0 and 2 * s <= max_split:
        s *= 2
    return s


def plan(B: int, L: int, D: int, nsplit: int, chunk: Optional[int] = None) -> Tuple[int, int, int]:
    """(chunk length C, number of chunks NC, length of the last chunk)."""
    if chunk is None:
        chunk = CHUNK_OVERRIDE
    if chunk is None:
        want = max(1, TARGET_THREADS // max(1, B * D * nsplit))
        chunk = max(MIN_CHUNK, -(-L // want))
    chunk = max(1, min(int(chunk), L))
    nc = -(-L // chunk)
    return chunk, nc, L - (nc - 1) * chunk


_PARAMS: Dict[Tuple[int, ...], mx.array] = {}


def _params(*sizes: int) -> mx.array:
    """The int32 size vector the kernels read (B, L, D, C, NC, LAST, 0, 0), made once per shape."""
    a = _PARAMS.get(sizes)
    if a is None:
        if len(_PARAMS) > 256:
            _PARAMS.clear()
        a = _PARAMS[sizes] = mx.array([*sizes, 0, 0], dtype=mx.int32)
        mx.eval(a)
    return a


_DUMMY: Dict[mx.Dtype, mx.array] = {}


def _dummy(dtype=mx.float32) -> mx.array:
    """Stand-in for an input that no thread reads: chunk states (a single chunk), float32; the
    document starts without resets, int32."""
    if dtype not in _DUMMY:
        _DUMMY[dtype] = mx.zeros((1,), dtype)
        mx.eval(_DUMMY[dtype])
    return _DUMMY[dtype]


def _forward(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, starts=None, y_dtype=mx.float32):
    """starts: None, or int32 B x L document starts (the RESET = 1 kernels). y is written in
    y_dtype (one rounding of the float32 result)."""
    launch = _launcher()
    B, L, D = x.shape
    N = p.shape[-1]
    f32 = mx.float32
    s = _split(N, FWD_MAX_NPT, launch.max_split)
    C, NC, LAST = plan(B, L, D, s)
    params = _params(B, L, D, C, NC, LAST)
    reset = int(starts is not None)
    starts = starts if reset else _dummy(mx.int32)
    dstride = D if getattr(launch, "compile_time_stride", False) else 0
    tx = [("T", x.dtype), ("NPT", N // s), ("NSPLIT", s), ("RESET", reset), ("DSTRIDE", dstride)]
    h_in = _dummy()
    if NC > 1:
        loc, = launch("cema_fwd_local", [x, p, log_mag, phase, starts, params], tx, B * (NC - 1) * D * s,
                      [(B, NC - 1, 2, N, D)], [f32])
        h_in, = launch("cema_fwd_combine", [loc, h0_re, h0_im, log_mag, phase, starts, params],
                       [("NPT", N), ("NSPLIT", 1), ("RESET", reset)], B * N * D, [(B, NC - 1, 2, N, D)], [f32])
    y, h_re, h_im = launch(
        "cema_fwd_final",
        [x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, h_in, starts, params],
        tx[:1] + [("TY", y_dtype)] + tx[1:], B * NC * D * s, [(B, L, D), (B, D, N), (B, D, N)], [y_dtype, f32, f32])
    return y, h_re, h_im


def _backward(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, gy, ghT_re, ghT_im, starts=None):
    """Cotangents of every input. ghT_re / ghT_im None: the final state has no cotangent (the
    caller kept y only), and the GHT0 = 1 kernels run the cheaper gamma-free scan. gy is read in
    its own dtype when that is one the kernels take (y's dtype: no float32 copy of it)."""
    launch = _launcher()
    B, L, D = x.shape
    N = p.shape[-1]
    f32 = mx.float32
    ght0 = int(ghT_re is None)
    if ght0:
        ghT_re = ghT_im = mx.zeros((B, D, N), f32)   # cema_bwd_combine starts from them; final ignores them
    if gy.dtype not in Y_DTYPES:
        gy = gy.astype(f32)
    ghT_re, ghT_im = ghT_re.astype(f32), ghT_im.astype(f32)
    ty = ("TY", gy.dtype)
    s = _split(N, BWD_MAX_NPT, launch.max_split)
    C, NC, LAST = plan(B, L, D, s)
    params = _params(B, L, D, C, NC, LAST)
    reset = int(starts is not None)
    starts = starts if reset else _dummy(mx.int32)
    carry = _dummy()
    if NC > 1:
        loc, = launch("cema_bwd_local", [gy, log_mag, phase, gamma_re, gamma_im, starts, params],
                      [ty, ("NPT", N // s), ("NSPLIT", s), ("RESET", reset), ("GHT0", ght0)], B * (NC - 1) * D * s,
                      [(B, NC - 1, 6, N, D)], [f32])
        carry, = launch("cema_bwd_combine", [loc, ghT_re, ghT_im, log_mag, phase, starts, params],
                        [("NPT", N), ("NSPLIT", 1), ("RESET", reset)], B * N * D, [(B, NC - 1, 6, N, D)], [f32])
    gx, part, gom, gh0_re, gh0_im = launch(
        "cema_bwd_final",
        [x, gy, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, ghT_re, ghT_im, carry, starts, params],
        [("T", x.dtype), ty, ("NPT", N // s), ("NSPLIT", s), ("RESET", reset), ("GHT0", ght0)], B * NC * D * s,
        [(B, L, D), (B * NC, 5, N, D), (B * NC, D), (B, D, N), (B, D, N)], [x.dtype, f32, f32, f32, f32])
    part = mx.swapaxes(part.sum(axis=0), -1, -2)                    # 5 x D x N
    gp, gq_re, gq_im, gg_re, gg_im = (part[i] for i in range(5))
    mag = mx.exp(log_mag)
    q_re, q_im = mag * mx.cos(phase), mag * mx.sin(phase)
    g_log_mag = gq_re * q_re + gq_im * q_im                           # Re(conj(gq) q)
    g_phase = gq_im * q_re - gq_re * q_im                             # Re(conj(gq) i q)
    return gx, gp, g_log_mag, g_phase, gg_re, gg_im, gom.sum(axis=0), gh0_re, gh0_im


@lru_cache(maxsize=None)
def _cema_ops(y_dtype: mx.Dtype):
    """The differentiable CEMA ops writing y in ``y_dtype``: (with final state, with final state
    and document starts, y only, y only with document starts). The y-only ops never let the final
    state out, so it has no cotangent and their backward takes the GHT0 = 1 kernels."""
    @mx.custom_function
    def op(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im):
        return _forward(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, y_dtype=y_dtype)

    @op.vjp
    def op_vjp(primals, cotangents, outputs):
        gy, ghr, ghi = cotangents
        return _backward(*primals, gy, ghr, ghi)

    # Packed rows: the same op with the document starts as a last, integer input (no cotangent).
    @mx.custom_function
    def op_reset(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, starts):
        return _forward(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, starts, y_dtype)

    @op_reset.vjp
    def op_reset_vjp(primals, cotangents, outputs):
        gy, ghr, ghi = cotangents
        *args, starts = primals
        return (*_backward(*args, gy, ghr, ghi, starts=starts), mx.zeros_like(starts))

    @mx.custom_function
    def op_y(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im):
        return _forward(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, y_dtype=y_dtype)[0]

    @op_y.vjp
    def op_y_vjp(primals, gy, y):
        return _backward(*primals, gy, None, None)

    @mx.custom_function
    def op_reset_y(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, starts):
        return _forward(x, p, log_mag, phase, gamma_re, gamma_im, omega, h0_re, h0_im, starts, y_dtype)[0]

    @op_reset_y.vjp
    def op_reset_y_vjp(primals, gy, y):
        *args, starts = primals
        return (*_backward(*args, gy, None, None, starts=starts), mx.zeros_like(starts))

    return op, op_reset, op_y, op_reset_y


def cema_kernel_scan(x, coeffs, state=None, return_state: bool = False, doc_starts=None, y_dtype=None):
    """Same contract as cema_fft / cema_recurrence: x B x L x D (float32, bfloat16 or float16; the
    scan accumulates in float32), coeffs a CEMACoefficients, state (re, im) B x D x N or None.
    Returns (y B x L x D, (re, im) or None), y in ``y_dtype`` (float32, bfloat16 or float16;
    None: float32). Differentiable (mx.grad) in every input; y's cotangent is read in y's dtype.
    With return_state=False the final state has no cotangent and the backward runs the cheaper
    GHT0 = 1 kernels.

    doc_starts (packed rows, as for cema_segmented): B x L ints, each token's document start
    (non-decreasing along a row, doc_starts[t] <= t, a start s has doc_starts[s] == s); the state
    restarts from zero at every start (a start at t = 0 drops `state`)."""
    B, L, D = x.shape
    N = coeffs.p.shape[-1]
    f32 = mx.float32
    if x.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        x = x.astype(f32)
    c = [a.astype(f32) for a in coeffs]
    if state is None:
        h0_re = h0_im = mx.zeros((B, D, N), f32)
    else:
        h0_re, h0_im = (s.astype(f32) for s in state)
    starts = ()
    if doc_starts is not None:
        if tuple(doc_starts.shape) != (B, L):
            raise ValueError(f"doc_starts must have shape (batch, length) = {(B, L)}, got {tuple(doc_starts.shape)}")
        starts = (doc_starts.astype(mx.int32),)
    y_dtype = f32 if y_dtype is None else y_dtype
    if y_dtype not in Y_DTYPES:
        raise ValueError(f"y_dtype must be one of float32, bfloat16, float16, got {y_dtype}")
    op, op_reset, op_y, op_reset_y = _cema_ops(y_dtype)
    if not return_state:
        return (op_reset_y if starts else op_y)(x, *c, h0_re, h0_im, *starts), None
    y, h_re, h_im = (op_reset if starts else op)(x, *c, h0_re, h0_im, *starts)
    return y, (h_re, h_im)


if __name__ == "__main__":
    for path in write_generated():
        print("wrote", path)
