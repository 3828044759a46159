"""Megalodon (Ma et al. 2024) in MLX.

Submodules that need no MLX (config, checkpoint, tokenizer) stay importable without it, so the
PyTorch reference in ``torch_ref`` can share the one weight conversion.
"""
__version__ = "0.1.0"

_LAZY = {
    "load": "mlx_megalodon.utils",
    "save": "mlx_megalodon.utils",
    "Model": "mlx_megalodon.mega",
    "ModelArgs": "mlx_megalodon.config",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlx_megalodon' has no attribute '{name}'")
