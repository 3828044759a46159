"""Loading and saving MLX Megalodon models (MLX directories, upstream checkpoints, Hub ids)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import CheckpointError, load_mlx_weights, resolve_path
from .config import ConfigError, ModelArgs
from .mega import Model
from .tokenizer import Tokenizer


def _to_mx(tensor) -> mx.array:
    """torch tensor -> mx array, bfloat16 included (numpy has no bfloat16)."""
    import torch
    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
    return mx.array(tensor.numpy())


def _read_mlx_safetensors(path: Path) -> Dict[str, mx.array]:
    index = path / "model.safetensors.index.json"
    files = sorted({*json.loads(index.read_text())["weight_map"].values()}) if index.exists() \
        else ["model.safetensors"]
    weights = {}
    for name in files:
        try:
            weights.update(mx.load(str(path / name)))
        except Exception as e:  # mx.load's messages do not name the file
            raise CheckpointError(f"{path / name}: unreadable safetensors file ({e})") from None
    return weights


def apply_quantization(model: Model, quantization: dict, weights: Optional[dict] = None) -> None:
    """Quantize the linear and embedding layers the way ``convert.py -q`` did."""
    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        return weights is None or f"{path}.scales" in weights
    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                class_predicate=predicate)


def load_model(path_or_repo, dtype: Optional[mx.Dtype] = None) -> Tuple[Model, Path]:
    """Returns (model, tokenizer path). Reads MLX directories natively; upstream checkpoints go
    through the shared conversion in memory."""
    path = resolve_path(path_or_repo)
    is_mlx = (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    if is_mlx:
        config_file = path / "config.json"
        try:
            args = ModelArgs.from_dict(json.loads(config_file.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_file}: cannot read config ({e})") from None
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{config_file}: {e}") from None
        weights = _read_mlx_safetensors(path)
        tokenizer_path = path / "tokenizer.model"
    else:
        args, torch_weights, tokenizer_path = load_mlx_weights(path)
        weights = {k: _to_mx(v) for k, v in torch_weights.items()}
    model = Model(args)
    weights = model.sanitize(weights)
    if args.quantization:
        apply_quantization(model, args.quantization, weights)
    expected = dict(tree_flatten(model.parameters()))
    for key in expected:
        if key not in weights:
            raise CheckpointError(f"{path}: missing weight '{key}'")
    for key, value in weights.items():
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected weight '{key}'")
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{path}: weight '{key}' has shape {tuple(value.shape)}, "
                                  f"expected {tuple(expected[key].shape)}")
    model.load_weights(list(weights.items()), strict=True)
    if dtype is not None:
        cast_model(model, dtype)
    mx.eval(model.parameters())
    model.eval()
    return model, Path(tokenizer_path) if tokenizer_path else None


def cast_model(model: Model, dtype: mx.Dtype) -> None:
    """Cast compute weights to ``dtype``; CEMA, norms and the Q/K affine stay float32."""
    from .config import is_full_precision_key
    params = tree_flatten(model.parameters())
    model.load_weights([(k, v if is_full_precision_key(k) or not mx.issubdtype(v.dtype, mx.floating)
                         else v.astype(dtype)) for k, v in params], strict=False)


def load(path_or_repo, dtype: Optional[mx.Dtype] = None):
    """``model, tokenizer = load(path_or_repo)``: an MLX directory, an upstream checkpoint
    directory, or a Hugging Face Hub repo id holding either."""
    model, tokenizer_path = load_model(path_or_repo, dtype)
    if tokenizer_path is None or not Path(tokenizer_path).exists():
        raise CheckpointError(f"{path_or_repo}: no tokenizer.model found")
    return model, Tokenizer(str(tokenizer_path))


DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"


def default_model_path() -> Path:
    """The small model shipped inside the package (used when no --model is given)."""
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        raise CheckpointError(f"{DEFAULT_MODEL_DIR}: no default model is shipped in this build; pass --model")
    return DEFAULT_MODEL_DIR
