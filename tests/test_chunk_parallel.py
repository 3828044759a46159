"""Chunk parallelism (paper §3.5): a sequence of 2 x 16 tokens split over two ring ranks gives the
single-process logits and, through autodiff over the collectives, the single-process gradients."""
import json
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from factory import random_upstream_state_dict, tiny_args
from mlx_megalodon.checkpoint import upstream_to_mlx
from mlx_megalodon.mega import Model
from test_distributed import launch, ring  # noqa: F401  (the ring fixture skips cleanly)

SPAN = 16

WORKER = textwrap.dedent("""
    import json, sys
    import mlx.core as mx
    import mlx.nn as nn
    import numpy as np
    from mlx.utils import tree_flatten, tree_map
    from mlx_megalodon.chunk_parallel import chunk_parallel_logits, chunk_parallel_loss
    from mlx_megalodon.config import ModelArgs
    from mlx_megalodon.mega import Model

    out = sys.argv[1]
    g = mx.distributed.init()
    r, R = g.rank(), g.size()
    model = Model(ModelArgs.from_dict(json.load(open(out + "/args.json"))))
    model.load_weights(out + "/weights.safetensors")
    toks = np.load(out + "/tokens.npy")
    Ls = (toks.shape[1] - 1) // R
    inp = mx.array(toks[:, r * Ls:(r + 1) * Ls])
    tgt = mx.array(toks[:, r * Ls + 1:(r + 1) * Ls + 1])
    logits = chunk_parallel_logits(model, inp, g)
    loss_fn = lambda inp, tgt: chunk_parallel_loss(model, inp, tgt, g)
    loss, grads = nn.value_and_grad(model, loss_fn)(inp, tgt)
    grads = tree_map(lambda a: mx.distributed.all_sum(a, group=g), grads)
    loss = mx.distributed.all_sum(loss, group=g)
    mx.eval(logits, loss, grads)
    np.savez(f"{out}/rank{r}.npz", logits=np.array(logits), loss=np.array(loss),
             **{"g:" + k: np.array(v) for k, v in tree_flatten(grads)})
    print("done", r)
""")


def _model(args, seed=0):
    sd = random_upstream_state_dict(args, seed=seed)
    model = Model(args)
    weights = {k: mx.array(v.numpy()) for k, v in upstream_to_mlx(args, sd).items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def test_chunk_parallel_matches_full_sequence(ring, tmp_path):  # noqa: F811
    args = tiny_args(chunk_size=8)
    model = _model(args)
    toks = np.random.default_rng(3).integers(0, args.vocab_size, size=(2, 2 * SPAN + 1))
    (tmp_path / "args.json").write_text(json.dumps(args.to_dict() if hasattr(args, "to_dict") else vars(args)))
    model.save_weights(str(tmp_path / "weights.safetensors"))
    np.save(tmp_path / "tokens.npy", toks)
    (tmp_path / "worker.py").write_text(WORKER)
    p = launch([tmp_path / "worker.py", tmp_path], timeout=120)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]

    inp, tgt = mx.array(toks[:, :-1]), mx.array(toks[:, 1:])
    full = np.array(model(inp))
    got = np.concatenate([r["logits"] for r in ranks], axis=1)
    scale = max(1.0, float(np.abs(full).max()))
    err = float(np.abs(got - full).max())
    assert err <= 1e-4 * scale, f"logits: max abs error {err:.3g} (scale {scale:.3g})"

    loss_fn = lambda inp, tgt: nn.losses.cross_entropy(model(inp), tgt, reduction="sum")
    loss, grads = nn.value_and_grad(model, loss_fn)(inp, tgt)
    assert abs(float(ranks[0]["loss"]) - loss.item()) <= 1e-4 * abs(loss.item())
    worst = {}
    for k, v in tree_flatten(grads):
        ref = np.array(v)
        for r in ranks:   # all_summed inside the script: both ranks hold the total
            g = r["g:" + k]
            worst[k] = float(np.abs(g - ref).max()) / max(float(np.abs(ref).max()), 1e-6)
            assert worst[k] <= 1e-3, f"grad {k}: relative max error {worst[k]:.3g}"
    print(f"logits err {err:.3g} (scale {scale:.3g}); worst relative grad err {max(worst.values()):.3g}")


def test_single_rank_is_the_plain_forward():
    args = tiny_args(chunk_size=8)
    model = _model(args)
    toks = mx.array(np.random.default_rng(4).integers(0, args.vocab_size, size=(2, 2 * SPAN)))
    from mlx_megalodon.chunk_parallel import chunk_parallel_logits
    got = np.array(chunk_parallel_logits(model, toks))
    np.testing.assert_allclose(got, np.array(model(toks)), atol=1e-5)
    with pytest.raises(ValueError):
        chunk_parallel_logits(model, toks[:, :12])
