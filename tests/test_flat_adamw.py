"""FlatAdamW (mlx_megalodon/flat_adamw.py): the same training as the per-tensor AdamW, its layout,
and checkpoints that resume with either optimizer."""
import shutil
import tempfile

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from factory import _training_text, make_tokenizer

from mlx_megalodon.config import ModelArgs
from mlx_megalodon.data import Batch, PackedDataset, TokenStream
from mlx_megalodon.flat_adamw import FlatAdamW, FlatLayout
from mlx_megalodon.tokenizer import Tokenizer
from mlx_megalodon.train import (AdamW, TrainConfig, TrainError, Trainer, build_optimizer, default_decay_filter,
                                 list_checkpoints, load_checkpoint, new_model, train)

ARGS = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=64, cema_ndim=4,
            chunk_size=16, norm_num_groups=4, vocab_size=64)


def tiny_model(seed=0, **kw):
    return new_model(ModelArgs.from_dict({**ARGS, **kw}), seed)


def cfg(**kw):
    base = dict(seq_len=32, batch_size=4, iters=6, learning_rate=3e-3, warmup=2, val_every=0, save_every=0,
                compile=False, compute_dtype="float32", report_every=100)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dataset():
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(make_tokenizer(tmp, 64))
        stream = TokenStream.from_texts(tok, [" ".join(_training_text(20, seed=i)) for i in range(30)])
    return PackedDataset(stream, 32)


def two_rows(seed: int) -> Batch:
    """Two random rows of 32 tokens, one document each."""
    toks = np.random.default_rng(seed).integers(0, 64, size=(2, 33)).astype(np.int32)
    return Batch(toks[:, :-1], toks[:, 1:], np.ones((2, 32), np.float32), np.zeros((2, 32), np.int32))


def _run(dataset, **kw):
    model = tiny_model()
    result = train(model, dataset, None, cfg(**kw), quiet=True)
    return [loss for _, loss in result.train_losses], model


@pytest.mark.parametrize("settings", [
    dict(compute_dtype="float32"),
    dict(compute_dtype="float32", grad_clip=0.05),            # clipping active on every step
    dict(compute_dtype="bfloat16"),
    dict(compute_dtype="float32", batch_size=2, grad_accum=2),  # the accumulating path
])
def test_flat_training_matches_per_tensor_adamw(dataset, settings):
    base, base_model = _run(dataset, **settings)
    flat, flat_model = _run(dataset, flat_optimizer=True, **settings)
    assert len(flat) == len(base) == 6
    tol = 1e-2 if settings["compute_dtype"] == "bfloat16" else 1e-5
    np.testing.assert_allclose(flat, base, rtol=tol)
    for (k, a), (_, b) in zip(tree_flatten(base_model.trainable_parameters()), tree_flatten(flat_model.trainable_parameters())):
        assert a.dtype == b.dtype == mx.float32, k
        assert np.allclose(np.array(a), np.array(b), rtol=10 * tol, atol=10 * tol), k


def test_layout_groups_by_compute_dtype_and_decay():
    model = tiny_model()
    params = model.trainable_parameters()
    layout = FlatLayout(params, mx.bfloat16, lambda path, p: default_decay_filter(path, p))
    paths = {g: set(v) for g, v in layout.paths.items()}
    assert set(paths) == {"cast", "cast_decay", "full"}
    assert "layers.0.mega.wz.weight" in paths["cast_decay"] and "layers.0.mega.wz.bias" in paths["cast"]
    assert "layers.0.mega.cema.alpha" in paths["full"] and "layers.0.nffn.norm.weight" in paths["full"]
    assert sum(len(v) for v in paths.values()) == len(tree_flatten(params))
    flats = layout.flatten(dict(tree_flatten(params)))
    assert all(f.dtype == mx.float32 and f.ndim == 1 for f in flats.values())
    back = dict(tree_flatten(layout.unflatten(flats)))
    for k, v in tree_flatten(params):
        assert mx.array_equal(back[k], v).item(), k
    compute = dict(tree_flatten(layout.unflatten(flats, compute=True)))
    assert compute["layers.0.mega.wz.weight"].dtype == mx.bfloat16
    assert compute["layers.0.mega.cema.alpha"].dtype == mx.float32
    # float32 compute: nothing is cast
    assert {g for g in FlatLayout(params, mx.float32, default_decay_filter).paths} == {"full", "full_decay"}


def test_the_model_trains_on_views_of_the_flat_weights():
    model = tiny_model()
    c = cfg(flat_optimizer=True, compute_dtype="bfloat16")
    optimizer = build_optimizer(c)
    assert isinstance(optimizer, FlatAdamW) and isinstance(build_optimizer(cfg()), AdamW)
    trainer = Trainer(model, optimizer, c)
    batch = two_rows(0)
    for _ in range(2):
        loss, _, norm = trainer.step([batch])
        mx.eval(loss, norm, trainer.state)
    assert int(optimizer.state["step"]) == 2 and set(optimizer.state) == {"step", "learning_rate", "flat"}
    now = dict(tree_flatten(optimizer.layout.unflatten(optimizer.state["flat"]["p"])))
    for k, v in tree_flatten(model.trainable_parameters()):
        assert v.dtype == mx.float32 and mx.array_equal(now[k], v).item(), k
    with pytest.raises(RuntimeError, match="already bound"):
        optimizer.bind(model.trainable_parameters(), mx.bfloat16)


def test_checkpoints_resume_with_either_optimizer(dataset, tmp_path):
    c = dict(iters=6, save_every=3, keep_checkpoints=5)
    full_model = tiny_model()
    full = train(full_model, dataset, None, cfg(flat_optimizer=True, **c), checkpoint_dir=tmp_path / "flat",
                 quiet=True)
    per_tensor = train(tiny_model(), dataset, None, cfg(**c), checkpoint_dir=tmp_path / "plain", quiet=True)
    # the same per-parameter optimizer state keys as AdamW writes
    flat_keys = set(mx.load(str(list_checkpoints(tmp_path / "flat")[0] / "optimizer.safetensors")))
    plain_keys = set(mx.load(str(list_checkpoints(tmp_path / "plain")[0] / "optimizer.safetensors")))
    assert flat_keys == plain_keys and "step" in flat_keys
    for flat_resume in (False, True):
        target = tmp_path / f"resume-{flat_resume}"
        shutil.copytree(tmp_path / "flat", target)
        for later in list_checkpoints(target)[1:]:   # resume from step 3
            shutil.rmtree(later)
        resumed_model = tiny_model(seed=7)
        resumed = train(resumed_model, dataset, None, cfg(flat_optimizer=flat_resume, **c), checkpoint_dir=target,
                        resume=True, quiet=True)
        np.testing.assert_allclose([l for _, l in resumed.train_losses], [l for _, l in full.train_losses],
                                   rtol=1e-5)
        for (k, a), (_, b) in zip(tree_flatten(full_model.parameters()), tree_flatten(resumed_model.parameters())):
            assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6), k
    np.testing.assert_allclose([l for _, l in per_tensor.train_losses], [l for _, l in full.train_losses],
                               rtol=1e-5)


def test_a_bound_optimizer_refuses_a_checkpoint(dataset, tmp_path):
    train(tiny_model(), dataset, None, cfg(iters=3, save_every=3), checkpoint_dir=tmp_path, quiet=True)
    model = tiny_model()
    optimizer = build_optimizer(cfg(flat_optimizer=True))
    Trainer(model, optimizer, cfg(flat_optimizer=True))
    with pytest.raises(TrainError, match="before building the Trainer"):
        load_checkpoint(list_checkpoints(tmp_path)[0], model, optimizer)


def test_every_parameter_starts_aligned_and_the_padding_stays_zero():
    from mlx_megalodon.flat_adamw import ALIGN, GROUP_ALIGN, split_op
    shapes = ((3, 5), (7,), (64,), (2, 2))
    tail = GROUP_ALIGN - 3 * ALIGN - 4          # the group's end pads it to a multiple of GROUP_ALIGN
    layout_flat = mx.concatenate([mx.arange(15, dtype=mx.float32), mx.zeros((ALIGN - 15,)),
                                  mx.arange(7, dtype=mx.float32), mx.zeros((ALIGN - 7,)),
                                  mx.arange(64, dtype=mx.float32), mx.arange(4, dtype=mx.float32),
                                  mx.zeros((tail,))])
    parts = split_op(shapes)(layout_flat)
    assert [p.shape for p in parts] == [(3, 5), (7,), (64,), (2, 2)]
    assert all(mx.array_equal(p.reshape(-1), mx.arange(p.size, dtype=mx.float32)).item() for p in parts)
    grad = mx.grad(lambda f: sum((q * (i + 1)).sum() for i, q in enumerate(split_op(shapes)(f))))(layout_flat)
    assert grad.shape == layout_flat.shape
    expected = np.concatenate([np.full(15, 1.0), np.zeros(ALIGN - 15), np.full(7, 2.0), np.zeros(ALIGN - 7),
                               np.full(64, 3.0), np.full(4, 4.0), np.zeros(tail)])
    assert np.array_equal(np.array(grad), expected)
    # a real layout: after training steps the padding is still zero
    model = tiny_model()
    c = cfg(flat_optimizer=True, compute_dtype="bfloat16", weight_decay=0.5)
    optimizer = build_optimizer(c)
    trainer = Trainer(model, optimizer, c)
    batch = two_rows(1)
    for _ in range(2):
        mx.eval(trainer.step([batch])[0], trainer.state)
    layout = optimizer.layout
    for g, paths in layout.paths.items():
        flat = np.array(optimizer.state["flat"]["p"][g])
        start, mask = 0, np.ones(flat.size, bool)
        for shape in layout.shapes[g]:
            size = int(np.prod(shape))
            mask[start:start + size] = False
            start += -(-size // ALIGN) * ALIGN
        assert flat.size == -(-start // GROUP_ALIGN) * GROUP_ALIGN and np.all(flat[mask] == 0), g


def test_the_data_parallel_reduction_takes_the_flat_gradients():
    """Trainer(always_reduce=True) runs distributed.reduce_step at world size 1 on the flat gradients:
    the same losses as without it."""
    batch = two_rows(2)
    losses = {}
    for reduce in (False, True):
        c = cfg(flat_optimizer=True, compile=False)
        trainer = Trainer(tiny_model(), build_optimizer(c), c, always_reduce=reduce)
        losses[reduce] = [trainer.step([batch])[0].item() for _ in range(3)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)


def test_compiled_step_matches_per_tensor_adamw():
    """The compiled single-micro-batch step (the GPU's path) with FlatAdamW: same losses and weights."""
    batch = two_rows(3)
    runs = {}
    for flat in (False, True):
        c = cfg(flat_optimizer=flat, compile=True, document_resets=False, compute_dtype="bfloat16")
        model = tiny_model(num_layers=1)
        trainer = Trainer(model, build_optimizer(c), c)
        losses = []
        for _ in range(3):
            loss, _, norm = trainer.step([batch])
            mx.eval(loss, norm, trainer.state)
            losses.append((loss.item(), norm.item()))   # the gradient norm too: clipping scales by it
        runs[flat] = losses, dict(tree_flatten(model.trainable_parameters()))
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for k, v in runs[False][1].items():
        assert np.allclose(np.array(runs[True][1][k]), np.array(v), rtol=1e-4, atol=1e-6), k


def test_default_decay_rule_is_adamws():
    params = tiny_model().trainable_parameters()
    optimizer = FlatAdamW(1e-3)
    optimizer.bind(params, mx.float32)
    decayed = {path for g, paths in optimizer.layout.paths.items() if optimizer.layout.decay[g] for path in paths}
    assert decayed == {k for k, v in tree_flatten(params) if default_decay_filter(k, v)} != set()
    assert not any(FlatAdamW(1e-3, weight_decay=0.0)._decays(k, v) for k, v in tree_flatten(params))


def test_global_norm_of_a_long_vector_keeps_its_small_terms():
    """One float32 sum over 8M squares on MLX's CPU drops terms far below the running total; the
    norm sums large arrays in pieces (FlatAdamW's gradient vectors are 10^8 long for mega200M)."""
    from mlx_megalodon.train import global_norm
    n = 1 << 23
    g = mx.concatenate([mx.array([100.0]), mx.full((n - 1,), 1e-3)])
    exact = np.sqrt(1e4 + (n - 1) * 1e-6)
    assert abs(global_norm({"g": g}).item() - exact) < 1e-4 * exact
