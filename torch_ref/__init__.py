"""A pure-PyTorch reference implementation of Megalodon (Ma et al. 2024), used as the witness for
the MLX port. CPU or CUDA, no custom extensions, no MLX."""
from __future__ import annotations

import torch

from mlx_megalodon.config import ModelArgs

from .cache import LayerCache, MegaCache
from .complex_exponential_moving_average import MultiHeadComplexEMA
from .mega import Mega
from .moving_average_gated_attention import MovingAverageGatedAttention
from .normalized_feedforward_network import NormalizedFeedForwardNetwork
from .rotary_positional_embedding import RotaryEmbedding
from .timestep_norm import TimestepNorm

__all__ = ["Mega", "ModelArgs", "load", "MegaCache", "LayerCache", "MultiHeadComplexEMA",
           "TimestepNorm", "RotaryEmbedding", "MovingAverageGatedAttention",
           "NormalizedFeedForwardNetwork"]


def _to_torch(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    import numpy as np
    return torch.from_numpy(np.ascontiguousarray(np.asarray(value)))


def load(path_or_repo, device="cpu", dtype: torch.dtype = torch.float32):
    """Build the reference model from an upstream checkpoint (directory or repo id).

    Returns (model in eval mode on `device`, tokenizer or None). With a dtype other than float32,
    projections and embeddings take that dtype while CEMA, norms and the Q/K affine stay float32."""
    from mlx_megalodon.checkpoint import load_upstream_state
    from mlx_megalodon.tokenizer import Tokenizer

    args, state, tokenizer_path = load_upstream_state(path_or_repo)
    model = Mega(args)
    model.load_state_dict({k: _to_torch(v) for k, v in state.items()}, strict=True)
    model = model.to(device)
    if dtype != torch.float32:
        model.to_compute_dtype(dtype)
    model.eval()
    tokenizer = Tokenizer(tokenizer_path) if tokenizer_path is not None else None
    return model, tokenizer
