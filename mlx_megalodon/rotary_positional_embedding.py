"""RoPE on interleaved pairs with upstream's frequencies; positions count within a chunk."""
import mlx.core as mx
import numpy as np


def rope_periods(head_dim: int, base: float) -> mx.array:
    """base**(j/d) for j = 0, 2, ... in float32, the quantity upstream inverts into ``rope.freqs``
    (MLX's rope takes these periods and divides by them)."""
    return mx.array(np.array([base ** (j / head_dim) for j in range(0, head_dim, 2)], dtype=np.float32))


def apply_rope(x: mx.array, periods: mx.array, offset: int = 0) -> mx.array:
    """x: ... x T x d (sequence on axis -2); rotates position offset + t."""
    return mx.fast.rope(x, x.shape[-1], traditional=True, base=None, scale=1.0, offset=offset, freqs=periods)
