"""Is MLX's CPU backend using a slow BLAS here, and what to run instead.

MLX's Linux CPU wheel (``mlx[cpu]``) links the reference (netlib) BLAS it bundles in
``mlx_cpu.libs``, so matrix products on the CPU backend run 15-30x slower than with an optimized
BLAS (BENCHMARKS.md measures both). OpenBLAS exports the same symbols, so preloading it speeds MLX
up without rebuilding anything, and the results agree to float32 rounding. Only float32 matmuls
reach BLAS: MLX's CPU bf16 / fp16 matmuls run its own slow loops whatever is preloaded, so on the
CPU large models decode and train faster in float32 (``generate --dtype float32``; ``train``'s
default ``--dtype auto`` picks float32 there). This module only detects the situation and prints
the command; it never changes the running process.

    python -m mlx_megalodon.cpu_blas        # says what this machine uses and what to run

The command-line tools print the same hint once at start when it applies
(``MEGALODON_NO_BLAS_HINT=1`` silences it).
"""
from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Iterable, List, Optional

# Where distributions install OpenBLAS (the threaded build first).
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = "Debian/Ubuntu: apt install libopenblas0-pthread; Fedora: dnf install openblas-threads"


def bundled_reference_blas(mlx_dir: Optional[Path] = None) -> List[Path]:
    """The reference BLAS libraries the MLX Linux CPU wheel ships next to the ``mlx`` package."""
    if mlx_dir is None:
        import mlx.core
        mlx_dir = Path(mlx.core.__file__).resolve().parent
    return sorted(Path(p) for p in glob.glob(str(mlx_dir.parent / "mlx_cpu.libs" / "libblas*.so*")))


def find_openblas(candidates: Iterable[str] = OPENBLAS_CANDIDATES) -> Optional[str]:
    """The first OpenBLAS shared library found (conda environments included), else None."""
    paths = list(candidates)
    prefix = os.environ.get("CONDA_PREFIX")
    if prefix:
        paths.insert(0, os.path.join(prefix, "lib", "libopenblas.so.0"))
    return next((p for p in paths if os.path.isfile(p)), None)


def preloaded_blas(environ=os.environ) -> bool:
    return "blas" in environ.get("LD_PRELOAD", "").lower()


def hint(platform: str = sys.platform, environ=os.environ, on_cpu: Optional[bool] = None,
         reference_libs: Optional[List[Path]] = None, openblas: Optional[str] = "search") -> Optional[str]:
    """One line saying how to make MLX's CPU matmuls fast, or None when nothing needs doing (not
    Linux, a GPU backend in use, no bundled reference BLAS, or a BLAS already preloaded)."""
    if platform != "linux" or preloaded_blas(environ):
        return None
    if on_cpu is None:
        import mlx.core as mx
        on_cpu = mx.default_device() == mx.cpu
    if not on_cpu:
        return None
    libs = bundled_reference_blas() if reference_libs is None else reference_libs
    if not libs:
        return None
    found = find_openblas() if openblas == "search" else openblas
    threads = os.cpu_count() or 1
    if found:
        return (f"MLX's CPU backend here uses the slow reference BLAS ({libs[0].name}); for 15-30x faster "
                f"matmuls run with: LD_PRELOAD={found} OPENBLAS_NUM_THREADS={threads}")
    return (f"MLX's CPU backend here uses the slow reference BLAS ({libs[0].name}); install OpenBLAS "
            f"({INSTALL_HINT}) and run with LD_PRELOAD=<path to libopenblas.so.0> for 15-30x faster matmuls")


_printed = False


def warn_if_slow(stream=None) -> None:
    """Print ``hint()`` once per process to stderr (the CLIs call this at start)."""
    global _printed
    if _printed or os.environ.get("MEGALODON_NO_BLAS_HINT") == "1":
        return
    _printed = True
    message = hint()
    if message:
        print(f"note: {message}", file=stream or sys.stderr)


def main() -> int:
    message = hint()
    if message is None:
        import mlx.core as mx
        print(f"nothing to do: device {mx.default_device()}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}")
    else:
        print(message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
