"""Weight quantization with MLX's affine quantizer, and writing MLX model directories.

Linear and embedding weights are quantized; CEMA, every norm and the Q/K affine are not (they are
not linear layers, and they stay float32).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def quantizable(group_size: int):
    def predicate(path: str, module: nn.Module) -> bool:
        return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0
    return predicate


def quantize_model(model, bits: int = 4, group_size: int = 64) -> dict:
    """Quantize in place; returns the config entry ``{"group_size", "bits"}``."""
    if bits not in QUANT_BITS:
        raise ValueError(f"--q-bits must be one of {QUANT_BITS}, got {bits}")
    if group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"--q-group-size must be one of {QUANT_GROUP_SIZES}, got {group_size}")
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=quantizable(group_size))
    model.args.quantization = {"group_size": group_size, "bits": bits}
    return model.args.quantization


def save_model(model, tokenizer_path: Optional[os.PathLike], dst: os.PathLike) -> Path:
    """Write config.json, model.safetensors and tokenizer.model atomically (temp dir + rename)."""
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst}: destination already exists")
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        weights = dict(tree_flatten(model.parameters()))
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(model.args.to_dict(), indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def quantize_directory(src: os.PathLike, dst: os.PathLike, bits: int, group_size: int) -> Path:
    """Quantize the MLX model directory ``src`` into a new directory ``dst``."""
    from .utils import load_model
    model, tokenizer_path = load_model(src)
    quantize_model(model, bits, group_size)
    return save_model(model, tokenizer_path, dst)
