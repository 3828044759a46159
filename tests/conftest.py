import sys
from pathlib import Path

# The repository root (for ``import mlx_megalodon`` / ``import torch_ref``) and this folder (for
# ``from factory import ...``) on sys.path, however pytest is started.
_TESTS = Path(__file__).resolve().parent
for _p in (str(_TESTS.parent), str(_TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# fp32 parity tests compare against float32/float64 references: keep MLX's CUDA matmuls in true
# fp32 (MLX defaults to TF32 there). No effect on the CPU and Metal backends.
import os as _os
_os.environ.setdefault("MLX_ENABLE_TF32", "0")
# The CLIs' one-time "slow reference BLAS" note (mlx_megalodon.cpu_blas) would add a stderr line to
# every CLI test on Linux CPU; tests/test_cpu_blas.py covers it.
_os.environ.setdefault("MEGALODON_NO_BLAS_HINT", "1")
