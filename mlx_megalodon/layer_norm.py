"""RMS and layer norms whose stored scale is offset by one, as upstream stores them."""
import mlx.core as mx
import mlx.nn as nn

from . import layer_norm_kernels


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.zeros((dims,))

    def __call__(self, x):
        return mx.fast.rms_norm(x, (self.weight + 1.0).astype(x.dtype), self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.zeros((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x):
        weight, bias = (self.weight + 1.0).astype(x.dtype), self.bias.astype(x.dtype)
        # same forward either way; the kernel only replaces the backward (layer_norm_kernels.py),
        # so a model in eval mode (generation) keeps the plain op
        if self.training and layer_norm_kernels.ln_kernel_wanted(x.shape, x.dtype):
            return layer_norm_kernels.layer_norm(x, weight, bias, self.eps)
        return mx.fast.layer_norm(x, weight, bias, self.eps)
