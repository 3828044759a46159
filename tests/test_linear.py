"""The two-stage parameter gradients (mlx_megalodon/linear.py) against MLX's own autodiff."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_megalodon.layer_norm import LayerNorm
from mlx_megalodon.linear import Linear, column_sum

# Row counts below, at and above the first-stage group (512 rows), with and without a remainder.
SHAPES = [(3, 7, 16), (1024, 8), (2, 1100, 32), (4, 1024, 24)]


def _rel(a, b):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("shape", SHAPES)
def test_column_sum_is_the_sum_over_all_leading_axes(shape):
    t = mx.random.normal(shape, key=mx.random.key(1))
    want = np.array(t).reshape(-1, shape[-1]).astype(np.float64).sum(axis=0)
    assert np.allclose(np.array(column_sum(t)), want, rtol=1e-5, atol=1e-4)
    assert column_sum(t).shape == (shape[-1],)


def test_column_sum_of_no_rows_is_zero():
    assert np.array_equal(np.array(column_sum(mx.zeros((0, 5)))), np.zeros(5))


@pytest.mark.parametrize("dtype,tol", [(mx.float32, 1e-5), (mx.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(3, 1100, 32), (700, 32)])
def test_linear_gradients_match_autodiff(dtype, tol, shape):
    lin = Linear(32, 48)
    x = mx.random.normal(shape, key=mx.random.key(2)).astype(dtype)
    g = mx.random.normal(shape[:-1] + (48,), key=mx.random.key(3)).astype(dtype)
    params = {"weight": lin.weight.astype(dtype), "bias": lin.bias.astype(dtype)}

    def ours(p, x):
        lin.update(p)
        return (lin(x) * g).astype(mx.float32).sum()

    def plain(p, x):
        return ((x @ p["weight"].T + p["bias"]) * g).astype(mx.float32).sum()

    (gp, gx), (rp, rx) = mx.grad(ours, argnums=(0, 1))(params, x), mx.grad(plain, argnums=(0, 1))(params, x)
    for k in params:
        assert gp[k].dtype == dtype and gp[k].shape == params[k].shape
        assert _rel(gp[k], rp[k]) < tol, k
    assert gx.dtype == dtype and _rel(gx, rx) < tol
    # the forward is nn.Linear's
    plain_lin = nn.Linear(32, 48)
    plain_lin.update(params)
    lin.update(params)
    assert np.array_equal(np.array(lin(x).astype(mx.float32)), np.array(plain_lin(x).astype(mx.float32)))


def test_linear_without_bias_is_nn_linear():
    lin = Linear(8, 4, bias=False)
    x = mx.random.normal((5, 8), key=mx.random.key(4))
    assert "bias" not in lin and np.allclose(np.array(lin(x)), np.array(x @ lin.weight.T))


def test_gradients_hold_under_compile():
    lin = Linear(16, 16)
    norm = LayerNorm(16)
    model = nn.Sequential(lin, norm)
    x = mx.random.normal((4, 600, 16), key=mx.random.key(11))
    loss_and_grad = nn.value_and_grad(model, lambda x: (model(x) ** 2).sum())
    eager = loss_and_grad(x)
    compiled = mx.compile(loss_and_grad)(x)
    assert np.allclose(np.array(eager[0]), np.array(compiled[0]), rtol=1e-5)
    flat_eager, flat_compiled = tree_flatten(eager[1]), tree_flatten(compiled[1])
    assert [k for k, _ in flat_eager] == [k for k, _ in flat_compiled] and len(flat_eager) == 4
    for (_, a), (_, b) in zip(flat_eager, flat_compiled):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-4)
