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
    """One layer's state: TimestepNorm statistics, CEMA state (re, im) and current-chunk K/V.

    Keys and values live in buffers of one chunk's length (B x H x chunk x d, RoPE applied to
    keys); only the first ``offset % chunk`` rows are meaningful. Fixed shapes let one compiled
    decoding step serve every position."""

    def __init__(self, chunk_size: int):
        super().__init__()
        self.chunk_size = chunk_size
        self.cema = None           # (re, im), each B x D x N float32
        self.keys = None           # B x H x chunk x dz
        self.values = None         # B x H x chunk x dv

    @property
    def chunk_fill(self) -> int:
        return self.offset % self.chunk_size

    def write_chunk(self, keys: mx.array, values: mx.array, start: int, chunk_size: int) -> None:
        """Store rows [start, start + n) of the current chunk."""
        n = keys.shape[2]
        if self.keys is None or self.keys.shape[2] != chunk_size:
            self.keys = self._fit(self.keys, keys, chunk_size)
            self.values = self._fit(self.values, values, chunk_size)
        self.keys[:, :, start:start + n] = keys
        self.values[:, :, start:start + n] = values

    @staticmethod
    def _fit(buffer, like, chunk_size):
        """A chunk-long buffer holding what ``buffer`` held (a cache read back from a file stores
        only its filled rows)."""
        out = mx.zeros((*like.shape[:2], chunk_size, like.shape[-1]), dtype=like.dtype)
        if buffer is not None:
            out[:, :, :buffer.shape[2]] = buffer.astype(like.dtype)
        return out

    @property
    def state(self):
        if self.norm is None:
            return []
        arrays = list(self.norm) + list(self.cema)
        fill = self.chunk_fill
        if self.keys is not None and fill:
            arrays += [self.keys[:, :, :fill], self.values[:, :, :fill]]
        return arrays

    @state.setter
    def state(self, arrays):
        if not arrays:
            self.norm, self.cema, self.keys, self.values = None, None, None, None
            return
        self.norm = TimestepNormState(*arrays[:3])
        self.cema = (arrays[3], arrays[4])
        self.keys, self.values = (arrays[5], arrays[6]) if len(arrays) > 5 else (None, None)
