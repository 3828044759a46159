"""The kernel benchmark scripts still run against the current kernels API: their CPU-emulation
smoke modes (the GPU measurements themselves run on the H200; see BENCHMARKS.md)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulation needs g++")


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@needs_gxx
def test_cema_train_shapes_smoke(tmp_path):
    r = run("benchmarks/cema_train_shapes.py", "--cpu-emulation", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "cema_train_shapes.json").read_text())
    assert {row["pass"] for row in result["rows"]} == {"fwd", "fwd+bwd"}
    assert all(row["ms"] > 0 and row["chunk"] >= 1 for row in result["rows"])
    assert result["defaults"]["BWD_MAX_NPT"] >= 1


@pytest.mark.parametrize("script", ["benchmarks/cema_backward_ab.py", "benchmarks/cross_entropy_kernel.py",
                                    "benchmarks/timestep_norm_kernel.py"])
def test_gpu_only_benchmarks_say_so_without_a_gpu(script):
    import mlx.core as mx
    if mx.default_device() == mx.gpu:
        pytest.skip("a GPU is present: the script would run its measurements")
    r = run(script, timeout=120)
    assert r.returncode != 0 and "needs a GPU backend" in (r.stdout + r.stderr)
