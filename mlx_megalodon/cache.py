"""Streaming state for incremental decoding: constant size, whatever the context length.

Each Megalodon layer carries its TimestepNorm statistics, its CEMA hidden state and the keys and
values of the current chunk only (attention never looks past a chunk boundary); the final norm
carries its statistics. ``state``/``meta_state`` follow mlx-lm's cache protocol so prompt caches
can be written to and read from safetensors.
"""
from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .timestep_norm import TimestepNormState


class TimestepNormCache:
    """State of a TimestepNorm across calls (the final norm's cache)."""

    def __init__(self):
        self.norm: Optional[TimestepNormState] = None
        self.offset = 0

    @property
    def state(self):
        return [] if self.norm is None else list(self.norm)

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

    def ensure_buffers(self, batch: int, heads: int, key_dim: int, value_dim: int, dtype: mx.Dtype) -> None:
        """Make keys/values chunk-long buffers, keeping the rows they hold (a cache read back
        from a file stores only its filled rows)."""
        def fit(buffer, dim):
            if buffer is not None and buffer.shape[2] == self.chunk_size:
                return buffer
            out = mx.zeros((batch, heads, self.chunk_size, dim), dtype=dtype)
            if buffer is not None:
                out[:, :, :buffer.shape[2]] = buffer.astype(dtype)
            return out
        self.keys, self.values = fit(self.keys, key_dim), fit(self.values, value_dim)

    def write_chunk(self, keys: mx.array, values: mx.array, start: int) -> None:
        """Store rows [start, start + n) of the current chunk."""
        B, H, n, key_dim = keys.shape
        self.ensure_buffers(B, H, key_dim, values.shape[-1], keys.dtype)
        self.keys[:, :, start:start + n] = keys
        self.values[:, :, start:start + n] = values

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
