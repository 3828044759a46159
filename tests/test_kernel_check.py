"""mlx_megalodon.kernel_check: the first-use check of kernels on a backend nobody has measured
(Metal), exercised here with a pretend Metal backend and the kernels' CPU emulation."""
import io

import mlx.core as mx
import numpy as np
import pytest

from factory import tiny_args
from mlx_megalodon import attention_kernels as A
from mlx_megalodon import kernel_check as KC
from mlx_megalodon import kernels as K
from mlx_megalodon import timestep_norm_kernels as TK
from mlx_megalodon.mega import Model


@pytest.fixture
def pretend_metal(monkeypatch):
    """gpu_backend() says "metal"; every kernel switch and result is restored afterwards."""
    monkeypatch.setattr(K, "gpu_backend", lambda: "metal")
    monkeypatch.delenv("MEGALODON_KERNELS", raising=False)
    KC._results.clear()
    yield
    K.disable_kernels(None)
    KC._results.clear()
    for module in (K, A, TK):
        module.set_launcher(None)


@pytest.fixture
def emulated(pretend_metal, tmp_path, monkeypatch):
    """Every kernel family on its CPU emulation, the attention and TimestepNorm kernels forced on."""
    for module, name in ((K, "cema"), (A, "attn"), (TK, "tnorm")):
        (tmp_path / name).mkdir()
        module.set_launcher(module.CpuLauncher(str(tmp_path / name)))
    monkeypatch.setenv("MEGALODON_ATTN_KERNEL", "1")
    monkeypatch.setenv("MEGALODON_TNORM_KERNEL", "1")


def test_a_kernel_that_does_not_build_turns_all_kernels_off(pretend_metal):
    """No Metal here, so building the Metal CEMA kernel fails: one warning, kernels off, and a model
    built afterwards runs on the ops path."""
    stream = io.StringIO()
    assert KC.ensure_kernels_work(stream=stream) is False
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 1 and "custom metal kernels are off" in lines[0] and "CEMA scan" in lines[0]
    assert not K.kernels_enabled() and not K.cema_kernel_available(16)
    assert KC.ensure_kernels_work(stream=stream) is False              # checked once per process
    assert len(stream.getvalue().strip().splitlines()) == 1
    model = Model(tiny_args())
    logits = model(mx.array([[1, 2, 3, 4]]))
    assert np.isfinite(np.array(logits)).all()


def test_correct_kernels_pass_and_stay_on(emulated):
    assert KC._timestep_norm_case() is not None and KC._decode_attention_case() is not None
    assert KC.check() is None
    stream = io.StringIO()
    assert KC.ensure_kernels_work(stream=stream) is True and stream.getvalue() == ""
    assert K.kernels_enabled()


class Perturbed:
    """Wraps a launcher; the first output of `kernel` comes back 1% too large."""

    def __init__(self, inner, kernel):
        self.inner, self.kernel = inner, kernel
        self.lanes = getattr(inner, "lanes", 1)
        self.max_split = getattr(inner, "max_split", 1)
        self.max_group = getattr(inner, "max_group", 16)
        self.max_dim = getattr(inner, "max_dim", None)

    def __call__(self, name, *args, **kwargs):
        out = self.inner(name, *args, **kwargs)
        return [out[0] * 1.01, *out[1:]] if name == self.kernel else out


@pytest.mark.parametrize("family,kernel,label", [
    (K, "cema_fwd_final", "CEMA scan output"),
    (TK, "tnorm_fwd_final", "TimestepNorm output"),
    (A, "attn_decode_combine", "decode attention output"),
])
def test_wrong_numbers_are_caught(emulated, family, kernel, label):
    family.set_launcher(Perturbed(family._launcher.override, kernel))
    reason = KC.check()
    assert reason is not None and label in reason and "differs from the ops path" in reason


def test_measured_backends_and_kernels_off_skip_the_check(monkeypatch):
    def must_not_run():
        raise AssertionError("the check ran")
    monkeypatch.setattr(KC, "check", must_not_run)
    monkeypatch.setattr(K, "gpu_backend", lambda: "cuda")
    assert KC.ensure_kernels_work() is True
    monkeypatch.setattr(K, "gpu_backend", lambda: "metal")
    monkeypatch.setenv("MEGALODON_KERNELS", "0")
    assert KC.ensure_kernels_work() is False
    assert KC.ensure_kernels_work(backend=None) is False
