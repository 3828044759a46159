"""Inference state of the PyTorch reference (mutable, updated in place by ``Mega.forward``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import torch

NormState = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # count [B] int64, mean [B,G], var [B,G]


@dataclass
class LayerCache:
    """One Megalodon block's state.

    cema: CEMA hidden state h [B, D, N] complex64 (complex128 for a float64 model).
    norm: the block TimestepNorm's running (count [B] int64, mean [B, G], var [B, G]).
    k, v: RoPE'd keys [B, pos, H, z_head_dim] and values [B, pos, H, v_head_dim] of the current,
          not yet full, attention chunk only (emptied whenever a chunk fills).
    pos:  position within the current chunk (== k.shape[1]).
    """
    cema: torch.Tensor
    norm: NormState
    k: torch.Tensor
    v: torch.Tensor
    pos: int = 0


@dataclass
class MegaCache:
    """layers: one LayerCache per block; final_norm: the output TimestepNorm's state;
    offset: number of tokens consumed so far."""
    layers: List[LayerCache]
    final_norm: NormState
    offset: int = 0
    batch_size: int = field(default=1)
