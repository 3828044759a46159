"""mlx_megalodon.cpu_blas: when to suggest preloading OpenBLAS, and what it prints."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mlx_megalodon import cpu_blas

REF = [Path("/x/mlx_cpu.libs/libblas-abc.so.3.10.0")]


def test_hint_names_the_found_openblas_and_threads(monkeypatch):
    monkeypatch.setattr(cpu_blas.os, "cpu_count", lambda: 6)
    msg = cpu_blas.hint("linux", {}, on_cpu=True, reference_libs=REF, openblas="/usr/lib/libopenblas.so.0")
    assert "libblas-abc.so.3.10.0" in msg
    assert "LD_PRELOAD=/usr/lib/libopenblas.so.0 OPENBLAS_NUM_THREADS=6" in msg


def test_hint_without_openblas_says_how_to_install():
    msg = cpu_blas.hint("linux", {}, on_cpu=True, reference_libs=REF, openblas=None)
    assert "apt install libopenblas0-pthread" in msg and "LD_PRELOAD=" in msg


def test_no_hint_where_nothing_helps():
    kw = dict(reference_libs=REF, openblas="/usr/lib/libopenblas.so.0")
    assert cpu_blas.hint("darwin", {}, on_cpu=True, **kw) is None                 # Accelerate on a Mac
    assert cpu_blas.hint("linux", {}, on_cpu=False, **kw) is None                 # a GPU backend
    assert cpu_blas.hint("linux", {"LD_PRELOAD": "/opt/libopenblas.so"}, on_cpu=True, **kw) is None
    assert cpu_blas.hint("linux", {}, on_cpu=True, reference_libs=[], openblas=None) is None  # MLX built with another BLAS


def test_find_openblas_prefers_the_conda_environment(tmp_path, monkeypatch):
    lib = tmp_path / "lib" / "libopenblas.so.0"
    lib.parent.mkdir()
    lib.write_bytes(b"")
    monkeypatch.setenv("CONDA_PREFIX", str(tmp_path))
    assert cpu_blas.find_openblas(["/nonexistent/libopenblas.so.0"]) == str(lib)
    monkeypatch.delenv("CONDA_PREFIX")
    assert cpu_blas.find_openblas(["/nonexistent/libopenblas.so.0"]) is None


def test_bundled_reference_blas_is_read_next_to_the_mlx_package(tmp_path):
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx_cpu.libs").mkdir()
    (tmp_path / "mlx_cpu.libs" / "libblas-1234.so.3").write_bytes(b"")
    (tmp_path / "mlx_cpu.libs" / "liblapack-1234.so.3").write_bytes(b"")
    assert [p.name for p in cpu_blas.bundled_reference_blas(tmp_path / "mlx")] == ["libblas-1234.so.3"]


def test_warn_if_slow_prints_once_and_can_be_silenced(monkeypatch, capsys):
    monkeypatch.setattr(cpu_blas, "hint", lambda: "use OpenBLAS")
    monkeypatch.setattr(cpu_blas, "_printed", False)
    monkeypatch.setenv("MEGALODON_NO_BLAS_HINT", "1")
    cpu_blas.warn_if_slow()
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("MEGALODON_NO_BLAS_HINT")
    cpu_blas.warn_if_slow()
    cpu_blas.warn_if_slow()
    assert capsys.readouterr().err == "note: use OpenBLAS\n"


def test_module_command_runs():
    out = subprocess.run([sys.executable, "-m", "mlx_megalodon.cpu_blas"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip()
