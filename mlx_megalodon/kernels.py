"""Custom Metal/CUDA kernels and the switch that enables them (filled in by the kernels work)."""
import os


def kernels_enabled() -> bool:
    return os.environ.get("MEGALODON_KERNELS", "1") != "0"


def cema_kernel_available(length: int) -> bool:
    return False


def cema_kernel_scan(x, coeffs, state=None, return_state=False):
    raise NotImplementedError("no CEMA kernel on this backend")
