"""Streaming state for incremental decoding: constant size, whatever the context length.

Each Megalodon layer carries its TimestepNorm statistics, its CEMA hidden state and the keys and
values of the current chunk only (attention never looks past a chunk boundary); the final norm
carries its statistics. ``state``/``meta_state`` follow mlx-lm's cache protocol so prompt caches
can be written to and read from safetensors.
"""
from __future__ import annotations

from typing import List, Optional

import mlx.core as mx

from .timestep_norm import TimestepNormState


class TimestepNormCache:
    """State of a TimestepNorm across calls (the final norm's cache)."""

    def __init__(self):
        self.norm: Optional[TimestepNormState] = None
        self.offset = 0

    def _arrays(self) -> List[Optional[mx.array]]:
        return list(self.norm) if self.norm is not None else [None, None, None]

    @property
    def state(self):
        return [a for a in self._arrays() if a is not None]

    @state.setter
    def state(self, arrays):
        self.norm = TimestepNormState(*arrays[:3]) if len(arrays) >= 3 else None

    @property
    def meta_state(self):
        return (str(self.offset),)

    @meta_state.setter
    def meta_state(self, values):
        self.offset = int(values[0])

    def is_trimmable(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)

    def empty(self) -> bool:
        return self.norm is None


class MegalodonCache(TimestepNormCache):
    """One layer's state: TimestepNorm statistics, CEMA state (re, im) and current-chunk K/V."""

    def __init__(self):
        super().__init__()
        self.cema = None           # (re, im), each B x D x N float32
        self.keys = None           # B x H x T x dz, RoPE already applied, T < chunk_size
        self.values = None         # B x H x T x dv

    @property
    def chunk_fill(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def state(self):
        if self.norm is None:
            return []
        arrays = list(self.norm) + list(self.cema)
        if self.keys is not None:
            arrays += [self.keys, self.values]
        return arrays

    @state.setter
    def state(self, arrays):
        if not arrays:
            self.norm, self.cema, self.keys, self.values = None, None, None, None
            return
        self.norm = TimestepNormState(*arrays[:3])
        self.cema = (arrays[3], arrays[4])
        self.keys, self.values = (arrays[5], arrays[6]) if len(arrays) > 5 else (None, None)
