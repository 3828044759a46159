"""Pretraining: data pipeline, loss going down, exact resume, atomic outputs, CLI errors, tokenizer
training. CPU, tiny models, no mx.compile (its first CPU build takes minutes)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from factory import _training_text, make_tokenizer
from mlx_megalodon.config import ModelArgs, is_full_precision_key
from mlx_megalodon.data import (BatchIterator, DataError, PackedDataset, TokenStream, iterate_batches,
                                load_documents)
from mlx_megalodon.tokenizer import Tokenizer
from mlx_megalodon.train import (CUDA_GRAPH_MB, TrainConfig, TrainError, Trainer, build_optimizer, check_seq_len,
                                 latest_checkpoint, list_checkpoints, loss_fn, lr_at, main, new_model,
                                 resolve_compute_dtype, train, use_large_cuda_graphs, write_model_dir)
from mlx_megalodon.train_tokenizer import main as tokenizer_main
from mlx_megalodon.train_tokenizer import train_tokenizer
from mlx_megalodon.utils import load

ROOT = Path(__file__).resolve().parent.parent
ARGS = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=64, cema_ndim=4,
            chunk_size=16, norm_num_groups=4, vocab_size=64)


def tiny_model(seed=0, **kw):
    return new_model(ModelArgs.from_dict({**ARGS, **kw}), seed)


def corpus_texts(n_docs=40, lines=20):
    return [" ".join(_training_text(lines, seed=i)) for i in range(n_docs)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok"), 64))


@pytest.fixture(scope="module")
def stream(tok):
    return TokenStream.from_texts(tok, corpus_texts())


def cfg(**kw):
    base = dict(seq_len=32, batch_size=4, iters=12, learning_rate=3e-3, warmup=3, val_every=0, save_every=0,
                compile=False, compute_dtype="float32", report_every=100)
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- data pipeline
def test_packing_rows_targets_and_segments(tok):
    texts = ["hello world", "the quick brown fox", "megalodon model hello"]
    s = TokenStream.from_texts(tok, texts)
    assert s.num_documents == 3 and s.tokens[0] == tok.bos_id and s.tokens[s.doc_starts[1] - 1] == tok.eos_id
    assert tok.decode(s.tokens[s.doc_starts[1]: s.doc_starts[2]].tolist()) == texts[1]
    ds = PackedDataset(s, 8)
    assert len(ds) == (len(s) - 1) // 8
    b = ds.rows([0, len(ds) - 1])
    assert b.inputs.shape == b.targets.shape == b.segment_ids.shape == (2, 8)
    assert b.inputs.dtype == np.int32 and b.segment_ids.dtype == np.int32
    np.testing.assert_array_equal(b.targets[0, :-1], b.inputs[0, 1:])
    np.testing.assert_array_equal(b.inputs[0], s.tokens[:8])
    # segment ids count document starts inside the row, from 0
    pos = np.arange(8)
    expect = np.searchsorted(s.doc_starts, pos, side="right") - 1
    np.testing.assert_array_equal(b.segment_ids[0], expect - expect[0])
    row = next(r for r in range(len(ds)) if any(r * 8 < d < r * 8 + 8 for d in s.doc_starts))
    seg = ds.rows([row]).segment_ids[0]
    assert seg[0] == 0 and seg.max() >= 1 and np.all(np.diff(seg) >= 0)
    assert (b.mask == 1).all()


def test_batch_iterator_is_resumable_and_epoch_shuffled(stream):
    ds = PackedDataset(stream, 32)
    it = BatchIterator(ds, 5, seed=3)
    first = [next(it).inputs for _ in range(4)]
    state = it.state_dict()
    rest = [next(it).inputs for _ in range(300)]   # crosses epoch boundaries
    it2 = BatchIterator(ds, 5, seed=3)
    it2.load_state_dict(state)
    for a, b in zip(rest, (next(it2).inputs for _ in range(300))):
        np.testing.assert_array_equal(a, b)
    # every row once per epoch
    it3 = BatchIterator(ds, 1, seed=0)
    seen = sorted(int(it3.next_indices()[0]) for _ in range(len(ds)))
    assert seen == list(range(len(ds)))
    assert np.array_equal(first[0], BatchIterator(ds, 5, seed=3).__next__().inputs)
    with pytest.raises(DataError, match="batch_size"):
        BatchIterator(ds, 4, seed=3).load_state_dict(state)
    # evaluation order: one pass, last batch short
    sizes = [b.inputs.shape[0] for b in iterate_batches(ds, 64, shuffle=False, loop=False)]
    assert sum(sizes) == len(ds) and all(s == 64 for s in sizes[:-1])


def test_split_and_cache_roundtrip(stream, tmp_path):
    head, tail = stream.split_tail(0.1)
    assert len(head) + len(tail) == len(stream)
    assert tail.doc_starts[0] == 0 and head.doc_starts[0] == 0
    np.testing.assert_array_equal(np.concatenate([head.tokens, tail.tokens]), stream.tokens)
    stream.save(tmp_path / "c.npz")
    again = TokenStream.load(tmp_path / "c.npz")
    assert again.fingerprint() == stream.fingerprint() and again.vocab_size == stream.vocab_size


def test_documents_from_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one document\nwith two lines\n")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    docs = load_documents([tmp_path])
    assert [d.text for d in docs] == ["one document\nwith two lines\n", "first", "second"]
    assert docs[2].line == 3


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.txt", "", r"empty\.txt: file is empty"),
    ("blank.jsonl", "\n  \n", r"blank\.jsonl: file is empty"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": broken\n', r"bad\.jsonl:3: malformed JSON"),
    ("nokey.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"nokey\.jsonl:2: no 'text' field"),
    ("list.jsonl", '[1, 2]\n', r"list\.jsonl:1: expected a JSON object"),
    ("num.jsonl", '{"text": 5}\n', r"num\.jsonl:1: field 'text' must be a string"),
])
def test_bad_data_messages(tmp_path, name, content, pattern):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_documents([tmp_path / name])


def test_bad_bytes_and_overlong(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"fine\nfine\n\xff\xfe oops")
    with pytest.raises(DataError, match=r"bin\.txt:3: not UTF-8"):
        load_documents([tmp_path / "bin.txt"])
    (tmp_path / "long.jsonl").write_text('{"text": "short"}\n{"text": "' + "x" * 50 + '"}\n')
    with pytest.raises(DataError, match=r"long\.jsonl:2: document of 50 characters exceeds --max-doc-chars 20"):
        load_documents([tmp_path / "long.jsonl"], max_chars=20)
    with pytest.raises(DataError, match="no such file"):
        load_documents([tmp_path / "missing.txt"])


# ----------------------------------------------------------------------------- schedule and checks
def test_lr_schedule_and_seq_len_rule():
    c = cfg(learning_rate=1.0, warmup=4, min_lr_ratio=0.1)
    assert [lr_at(s, c, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, c, 20) == pytest.approx(1.0) and lr_at(20, c, 20) == pytest.approx(0.1)
    assert lr_at(12, c, 20) == pytest.approx(0.55)
    assert lr_at(100, c, None) == 1.0
    for ok in (8, 16, 32, 64):
        check_seq_len(ok, 16)
    with pytest.raises(TrainError, match=r"--seq-len 24 is not compatible with the model's chunk_size 16.*16 or 32"):
        check_seq_len(24, 16)
    with pytest.raises(TrainError, match="--learning-rate must be a positive number"):
        cfg(learning_rate=-1.0).validate()
    with pytest.raises(TrainError, match="--grad-accum"):
        cfg(grad_accum=0).validate()


def test_loss_fn_mask(tok):
    model = tiny_model()
    x = mx.array(np.arange(16, dtype=np.int32).reshape(2, 8) % 64)
    full, n = loss_fn(model, x, x)
    mask = mx.array(np.r_[np.ones(8), np.zeros(8)].reshape(2, 8).astype(np.float32))
    half, n2 = loss_fn(model, x, x, mask)
    single, _ = loss_fn(model, x[:1], x[:1])
    assert n.item() == 16 and n2.item() == 8
    assert half.item() == pytest.approx(single.item(), rel=1e-6)


@pytest.mark.parametrize("share_emb", [False, True])
def test_loss_in_pieces_equals_whole(share_emb):
    """loss_fn with the head + loss in pieces (what --grad-checkpoint uses) gives the same loss and
    gradients as one B x L x vocab projection, with a short last piece, a mask and packed rows."""
    model = tiny_model(seed=3, share_emb=share_emb)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    y = mx.array(rng.integers(0, 64, (2, 37)).astype(np.int32))
    mask = mx.array((rng.random((2, 37)) > 0.2).astype(np.float32))
    seg = mx.array(np.repeat([[0] * 20 + [1] * 17], 2, axis=0).astype(np.int32))

    def value_and_grads(piece):
        def f(params):
            model.update(params)
            return loss_fn(model, x, y, mask, seg, loss_piece=piece)[0]
        return mx.value_and_grad(f)(model.trainable_parameters())

    (whole, g_whole), (pieces, g_pieces) = value_and_grads(0), value_and_grads(8)
    assert pieces.item() == pytest.approx(whole.item(), rel=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(g_whole), tree_flatten(g_pieces)):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-6), k
    assert model.features(x).shape == (2, 37, model.args.model_dim)


# ----------------------------------------------------------------------------- training
def test_training_lowers_loss(stream):
    train_set, valid_set = (PackedDataset(s, 32) for s in stream.split_tail(0.1))
    model = tiny_model()
    before = model.parameters()["embed"]["weight"] + 0
    r = train(model, train_set, valid_set, cfg(iters=30, compute_dtype="bfloat16", val_every=10, val_batches=2),
              quiet=True)
    losses = [l for _, l in r.train_losses]
    assert len(losses) == 30 and r.step == 30 and r.tokens == 30 * 4 * 32
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert [s for s, _ in r.val_history] == [10, 20, 30]
    assert r.val_history[-1][1] < r.val_history[0][1] and r.final_val_loss == r.val_history[-1][1]
    # float32 masters, updated
    assert model.parameters()["embed"]["weight"].dtype == mx.float32
    assert not mx.array_equal(before, model.parameters()["embed"]["weight"]).item()


def test_grad_accumulation_and_checkpointing_match(stream):
    ds = PackedDataset(stream, 32)

    def run(**kw):
        model = tiny_model()
        r = train(model, ds, None, cfg(iters=4, **kw), quiet=True)
        return [l for _, l in r.train_losses], model

    base, m0 = run(batch_size=4)
    accum, m1 = run(batch_size=2, grad_accum=2)
    ckpt, m2 = run(batch_size=4, grad_checkpoint=True)
    np.testing.assert_allclose(accum, base, rtol=2e-5)
    np.testing.assert_allclose(ckpt, base, rtol=1e-6)
    assert type(m2.layers[0]).__name__ == "MegaBlock"   # restored after training


def test_resident_batch_steps_like_the_numpy_batch(stream):
    """Batch.resident() gives MLX arrays, which the Trainer passes through without converting: the
    same losses and weights as stepping on the numpy batch, compiled, with packed rows."""
    batch = next(iter(BatchIterator(PackedDataset(stream, 32), 4, seed=1)))
    resident = batch.resident()
    assert all(isinstance(v, mx.array) for v in (resident.inputs, resident.targets, resident.mask,
                                                 resident.segment_ids))
    assert resident.resident().inputs is resident.inputs          # already resident: no copy
    assert np.array_equal(np.array(resident.targets), batch.targets) and resident.num_tokens == batch.num_tokens

    def run(b):
        model = tiny_model()
        c = cfg(iters=3, document_resets=True, compile=True)
        trainer = Trainer(model, build_optimizer(c), c)
        losses = [trainer.step([b])[0].item() for _ in range(3)]
        return losses, model.parameters()["embed"]["weight"]
    (l0, w0), (l1, w1) = run(batch), run(resident)
    assert l0 == l1 and l0[-1] < l0[0]
    assert mx.array_equal(w0, w1).item()


class Interrupt(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted(stream, tmp_path):
    ds = PackedDataset(stream, 32)
    c = cfg(iters=8, save_every=3, keep_checkpoints=5, compute_dtype="bfloat16")
    full_model = tiny_model()
    full = train(full_model, ds, None, c, checkpoint_dir=tmp_path / "a", quiet=True)

    def kill(step, loss):
        if step == 5:
            raise Interrupt
    with pytest.raises(Interrupt):
        train(tiny_model(), ds, None, c, checkpoint_dir=tmp_path / "b", quiet=True, on_step=kill)
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-00000003"]
    (tmp_path / "b" / ".step-00000006.tmp-deadbeef").mkdir()   # a half-written checkpoint is ignored
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    resumed_model = tiny_model(seed=123)      # weights come from the checkpoint
    resumed = train(resumed_model, ds, None, c, checkpoint_dir=tmp_path / "b", resume=True, quiet=True)
    assert resumed.train_losses == full.train_losses     # history restored + same continuation
    assert resumed.step == 8 and resumed.tokens == full.tokens
    for (k, a), (_, b) in zip(tree_flatten(full_model.parameters()), tree_flatten(resumed_model.parameters())):
        assert mx.array_equal(a, b).item(), k
    # --dtype auto on resume continues in the run's recorded dtype (bfloat16 here, not the CPU's float32)
    auto = train(tiny_model(), ds, None, cfg(iters=8, save_every=3, keep_checkpoints=5, compute_dtype="auto"),
                 checkpoint_dir=tmp_path / "b", resume=True, quiet=True)
    assert auto.step == 8 and auto.train_losses == full.train_losses
    # settings that change the run are refused on resume
    with pytest.raises(TrainError, match="compute_dtype was 'bfloat16'"):
        train(tiny_model(), ds, None, cfg(iters=8, save_every=3, compute_dtype="float32"),
              checkpoint_dir=tmp_path / "b", resume=True, quiet=True)
    with pytest.raises(TrainError, match="learning_rate was 0.003"):
        train(tiny_model(), ds, None, cfg(iters=8, save_every=3, learning_rate=1e-3, compute_dtype="bfloat16"),
              checkpoint_dir=tmp_path / "b", resume=True, quiet=True)


def test_keep_best_restores_best_validation(stream):
    train_set, valid_set = (PackedDataset(s, 32) for s in stream.split_tail(0.1))
    model = tiny_model()

    def spoil(step, loss):   # wreck the weights after the step-10 validation
        if step == 11:
            model.update({"embed": {"weight": mx.random.normal(model.embed.weight.shape) * 3}})
    with pytest.raises(TrainError, match="--keep-best"):
        cfg(keep_best=True, val_batches=2).validate()
    r = train(model, train_set, valid_set, cfg(iters=14, val_every=5, val_batches=0, keep_best=True),
              quiet=True, on_step=spoil)
    periodic = dict(r.val_history)
    assert periodic[14] > min(periodic[5], periodic[10])
    assert r.best_step in (5, 10) and r.final_val_loss == periodic[r.best_step]
    from mlx_megalodon.train import Trainer, build_optimizer
    again, _ = Trainer(model, build_optimizer(cfg()), cfg()).evaluate(valid_set, 4)
    assert again == pytest.approx(r.final_val_loss, rel=1e-6)


def test_time_budget_plans_and_stops(stream):
    ds = PackedDataset(stream, 32)
    r = train(tiny_model(), ds, PackedDataset(stream.split_tail(0.05)[1], 32),
              cfg(iters=None, time_budget_s=4.0, warmup=2), quiet=True)
    assert r.stop_reason in ("iterations done", "time budget reached")
    assert r.step > 12 and r.elapsed_s < 8.0 and r.final_val_loss is not None


def test_write_model_dir_bf16_and_shards(tok, tmp_path):
    model = tiny_model()
    out = write_model_dir(model, tok.path, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    w = mx.load(str(out / "model.safetensors"))
    for k, v in w.items():
        if mx.issubdtype(v.dtype, mx.floating):
            assert v.dtype == (mx.float32 if is_full_precision_key(k) else mx.bfloat16), k
    loaded, _ = load(out)
    x = mx.array([[1, 5, 9, 3, 7]])
    model_bf16 = tiny_model()
    from mlx_megalodon.utils import cast_model
    cast_model(model_bf16, mx.bfloat16)
    assert mx.allclose(loaded(x), model_bf16(x), atol=1e-5).item()
    sharded = write_model_dir(model, tok.path, tmp_path / "m", max_file_bytes=20_000)
    names = sorted(p.name for p in sharded.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert sum(n.endswith("-of-" + names[1].split("-of-")[1]) for n in names) >= 2
    assert all((sharded / n).stat().st_size <= 20_000 for n in names if n.endswith(".safetensors"))
    again, _ = load(sharded)
    assert mx.allclose(again(x), loaded(x)).item()


# ----------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(corpus_texts(30)):
        (d / f"doc{i:02d}.txt").write_text(t)
    cfg_path = d.parent / "tiny_config.json"
    cfg_path.write_text(json.dumps({k: v for k, v in ARGS.items() if k != "vocab_size"}))
    return d


def cli(tmp, corpus, *extra, out="out"):
    return ["--config", str(corpus.parent / "tiny_config.json"), "--tokenizer", str(tmp / "tok" / "tokenizer.model"),
            "--train", str(corpus), "--out", str(tmp / out), "--seq-len", "32", "--batch-size", "4",
            "--warmup", "2", "--lr", "3e-3", "--no-compile", "--quiet", *extra]


@pytest.fixture
def cli_tmp(tmp_path):
    make_tokenizer(tmp_path / "tok", 64)
    return tmp_path


def test_auto_compute_dtype_follows_the_device():
    assert resolve_compute_dtype("bfloat16") == "bfloat16" and resolve_compute_dtype("float16") == "float16"
    expected = "float32" if mx.default_device() == mx.cpu else "bfloat16"
    assert resolve_compute_dtype("auto") == expected
    with pytest.raises(TrainError, match="--dtype must be auto or one of"):
        TrainConfig(compute_dtype="int8").validate()


def test_cli_trains_writes_and_resumes(cli_tmp, corpus_dir):
    t = cli_tmp
    assert main(cli(t, corpus_dir, "--iters", "8", "--save-every", "3", "--keep-checkpoints", "5",
                    "--val-every", "4", "--val-batches", "2", out="a")) == 0
    out = t / "a"
    for name in ("config.json", "model.safetensors", "tokenizer.model", "train_log.json", "loss.png"):
        assert (out / name).is_file(), name
    model, tokenizer = load(out)
    assert model.args.vocab_size == 64 and tokenizer.vocab_size == 64
    log_a = json.loads((out / "train_log.json").read_text())
    assert len(log_a["train_losses"]) == 8 and math.isfinite(log_a["final_val_ppl"])
    # no --dtype: auto, recorded as the dtype it chose (float32 on MLX's CPU backend)
    assert log_a["train_config"]["compute_dtype"] == resolve_compute_dtype("auto")
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000003", "step-00000006",
                                                                       "step-00000008"]
    # "kill" after the step-3 checkpoint: drop the later ones, then resume
    import shutil
    for p in list_checkpoints(out / "checkpoints")[1:]:
        shutil.rmtree(p)
    assert main(cli(t, corpus_dir, "--iters", "8", "--save-every", "3", "--keep-checkpoints", "5",
                    "--val-every", "4", "--val-batches", "2", "--resume", out="a")) == 0
    log_b = json.loads((out / "train_log.json").read_text())
    assert log_b["train_losses"] == log_a["train_losses"]
    assert log_b["final_val_loss"] == log_a["final_val_loss"]
    # a second fresh run into the same directory is refused
    assert main(cli(t, corpus_dir, "--iters", "8", out="a")) == 1
    # continue training the written (bfloat16) model directory into a new one
    args = cli(t, corpus_dir, "--iters", "2", "--val-fraction", "0", out="c")
    del args[:4]                                          # no --config / --tokenizer
    assert main(["--model", str(out), *args]) == 0
    log_c = json.loads((t / "c" / "train_log.json").read_text())
    assert log_c["final_val_loss"] is None and len(log_c["train_losses"]) == 2
    assert log_c["train_losses"][0][1] < log_a["train_losses"][0][1]   # starts from the trained weights


@pytest.mark.parametrize("extra,pattern", [
    (["--seq-len", "24"], "--seq-len 24 is not compatible with the model's chunk_size 16"),
    (["--learning-rate", "-0.1"], "--learning-rate must be a positive number, got -0.1"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--iters", "-3"], "--iters must be a positive integer"),
    (["--beta2", "1.5"], r"--beta2 must be in \[0, 1\)"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--val-fraction", "1.5"], r"--val-fraction must be in \[0, 1\)"),
    (["--preset", "nope"], "unknown --preset 'nope'"),
    (["--model", "somewhere"], "give --model, or --preset/--config, not both"),
])
def test_cli_bad_flags(cli_tmp, corpus_dir, capsys, extra, pattern):
    assert main(cli(cli_tmp, corpus_dir, *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("megalodon-train: error:")
    assert __import__("re").search(pattern, err), err


def test_cli_bad_config(cli_tmp, corpus_dir, capsys):
    bad = cli_tmp / "bad_config.json"
    bad.write_text(json.dumps({**ARGS, "model_dimm": 3}))
    args = cli(cli_tmp, corpus_dir)
    args[1] = str(bad)
    assert main(args) == 1
    assert capsys.readouterr().err.strip() == f"megalodon-train: error: {bad}: unknown model field(s) model_dimm"
    bad.write_text(json.dumps({**ARGS, "model_dim": 30}))
    assert main(args) == 1
    assert "model_dim (30) must be divisible by norm_num_groups (4)" in capsys.readouterr().err


def test_cli_bad_data_one_line(cli_tmp, corpus_dir, capsys):
    bad = cli_tmp / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\nnot json\n')
    assert main(cli(cli_tmp, corpus_dir, "--valid", str(bad))) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"megalodon-train: error: {bad}:3: malformed JSON (Expecting value at column 1)"
    empty = cli_tmp / "empty.txt"
    empty.write_text("")
    assert main(cli(cli_tmp, corpus_dir, "--valid", str(empty))) == 1
    assert capsys.readouterr().err.strip() == f"megalodon-train: error: {empty}: file is empty"


def test_cli_subprocess_exit_codes(cli_tmp, corpus_dir):
    empty = cli_tmp / "empty.txt"
    empty.write_text("")
    args = cli(cli_tmp, corpus_dir)
    args[args.index("--train") + 1] = str(empty)
    p = subprocess.run([sys.executable, "-m", "mlx_megalodon.train", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 1 and p.stderr.strip() == f"megalodon-train: error: {empty}: file is empty"
    p = subprocess.run([sys.executable, "-m", "mlx_megalodon.train", *args[:-2], "--lr", "abc"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "invalid float value" in p.stderr


# ----------------------------------------------------------------------------- tokenizer training
def test_train_tokenizer(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts(20, 10)))
    code = tmp_path / "code.py"
    code.write_text("def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n" * 20)
    assert tokenizer_main(["--input", str(corpus), str(code), "--vocab-size", "400",
                           "--output", str(tmp_path / "t" / "tokenizer.model")]) == 0
    assert "400 pieces" in capsys.readouterr().out
    tok = Tokenizer(tmp_path / "t" / "tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.sp_model.unk_id()) == (400, 1, 2, 0)
    for text in ("def f(x):\n    return x + 1\n", "unseen ✓ 日本語 text\twith tabs  and  spaces"):
        ids = tok.encode(text, bos=False)
        assert tok.decode(ids) == text               # exact round trip, bytes for unseen characters
    assert tok.sp_model.unk_id() not in tok.encode("日本語", bos=False)
    # too small a vocabulary: one-line error
    assert tokenizer_main(["--input", str(corpus), "--vocab-size", "100", "--output", str(tmp_path / "x.model")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--vocab-size must be an integer >= 260" in err
    assert tokenizer_main(["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "x.model")]) == 1
    assert "nope.txt: no such file" in capsys.readouterr().err
    # the trained tokenizer drives the data pipeline
    s = TokenStream.from_texts(tok, corpus_texts(3, 5))
    assert s.num_documents == 3 and s.tokens.max() < 400


def test_train_tokenizer_function_rejects_huge_vocab(tmp_path):
    from mlx_megalodon.train_tokenizer import TokenizerTrainingError
    with pytest.raises(TokenizerTrainingError, match="does not fit this corpus"):
        train_tokenizer(["tiny corpus"] * 5, 5000, tmp_path / "t.model")


# ----------------------------------------------------------------------------- the default-model recipe
def test_default_model_recipe_fits_the_package():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_default_model", ROOT / "scripts" / "train_default_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from mlx_megalodon.config import parameter_count, upstream_shapes
    args = ModelArgs.from_dict({**script.DEFAULT_CONFIG, "vocab_size": script.RECIPES["default"]["vocab_size"]})
    n = parameter_count(args)
    assert 10e6 <= n <= 20e6
    size = sum(math.prod(shape) * (4 if is_full_precision_key(k) or "prior" in k else 2)
               for k, shape in upstream_shapes(args).items() if k != "rope.freqs" and k != "output.output.weight")
    assert size <= 25e6                                       # bytes on disk in bfloat16
    recipe = script.RECIPES["default"]
    check_seq_len(recipe["seq_len"], args.chunk_size)
    # the validation split is a pure function of the path
    assert script.is_validation("json/decoder.py", 30) == script.is_validation("json/decoder.py", 30)
    held = sum(script.is_validation(f"pkg/mod{i}.py", 30) for i in range(2000))
    assert 30 <= held <= 90


@pytest.mark.parametrize("backend, preset, expect", [("cuda", None, str(CUDA_GRAPH_MB)), ("cuda", "250", "250"),
                                                     ("metal", None, None), (None, None, None)])
def test_large_cuda_graphs_only_on_cuda_and_never_over_the_users_value(monkeypatch, backend, preset, expect):
    """use_large_cuda_graphs defaults MLX_MAX_MB_PER_BUFFER on MLX's CUDA backend only and keeps a
    value the user set."""
    from mlx_megalodon import kernels
    monkeypatch.setattr(kernels, "gpu_backend", lambda: backend)
    if preset is None:
        monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER", raising=False)
    else:
        monkeypatch.setenv("MLX_MAX_MB_PER_BUFFER", preset)
    assert use_large_cuda_graphs() == (backend == "cuda" and preset is None)
    assert os.environ.get("MLX_MAX_MB_PER_BUFFER") == expect


@pytest.mark.parametrize("entry", ["train", "lora"])
def test_training_entry_points_size_cuda_graphs_before_anything_runs(monkeypatch, entry):
    """MLX reads MLX_MAX_MB_PER_BUFFER at the first GPU evaluation, so the training CLIs set it
    before their run starts (here the run itself is replaced: it records what it saw)."""
    from mlx_megalodon import kernels, lora, train as train_module
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "cuda")
    monkeypatch.delenv("MLX_MAX_MB_PER_BUFFER", raising=False)
    seen = []

    def fake_run(*args, **kwargs):
        seen.append(os.environ.get("MLX_MAX_MB_PER_BUFFER"))
        raise KeyboardInterrupt if entry == "train" else ValueError("stopped here")
    if entry == "train":
        monkeypatch.setattr(train_module, "run", fake_run)
        assert train_module.main(["--preset", "tiny", "--train", "x.txt", "--out", "o"]) == 130
    else:
        monkeypatch.setattr(lora, "resolve_options", fake_run)
        assert lora.main(["--model", "m"]) == 1
    assert seen == [str(CUDA_GRAPH_MB)]


def test_a_resident_batch_counts_its_tokens_on_the_host():
    """Batch.resident keeps the token count it had as numpy, and num_tokens returns a kept count
    without summing the mask: train reads it right after queueing a step, and summing an MLX mask
    there would wait for the device to finish that step."""
    from mlx_megalodon.data import Batch
    mask = np.ones((2, 8), np.float32)
    mask[1, 5:] = 0
    b = Batch(np.zeros((2, 8), np.int32), np.zeros((2, 8), np.int32), mask, np.zeros((2, 8), np.int32))
    r = b.resident()
    assert isinstance(r.mask, mx.array) and r.token_count == b.num_tokens == 13 and r.num_tokens == 13
    assert Batch(r.inputs, r.targets, r.mask, r.segment_ids, token_count=3).num_tokens == 3
    assert Batch(r.inputs, r.targets, r.mask, r.segment_ids).num_tokens == 13   # no count kept: the sum
