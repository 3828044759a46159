"""Data parallelism on the CPU: two ranks started by ``mlx.launch --backend ring`` on localhost
train exactly like one process on the combined batch (pretraining CLI and LoRA), and training
checkpoints move between 1 and 2 ranks. Single-rank reference runs go in-process."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from factory import _training_text, make_tokenizer, make_upstream_dir, random_upstream_state_dict, tiny_args
from mlx_megalodon import distributed as dist
from mlx_megalodon.data import BatchIterator, PackedDataset, TokenStream, iterate_batches
from mlx_megalodon.train import list_checkpoints
from mlx_megalodon.train import main as train_main

ROOT = Path(__file__).resolve().parent.parent
TRAIN_ARGS = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=1, ffn_hidden_dim=64, cema_ndim=4,
                  chunk_size=16, norm_num_groups=4)
LORA_ARGS = dict(model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=96, cema_ndim=4,
                 chunk_size=16, norm_num_groups=4)
TOL = 1e-5


# ----------------------------------------------------------------------------- launching
def _launcher():
    found = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    return found if Path(found).is_file() else None


def _free_base_port(n: int = 2) -> int:
    """A port p with p..p+n-1 free on 127.0.0.1 (the ring backend listens on base + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            socks = []
            for p in range(base, base + n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no free ports")


def launch(argv, n=2, timeout=150):
    """Run ``python ARGV...`` on ``n`` ring ranks over localhost with mlx.launch."""
    cmd = [_launcher(), "-n", str(n), "--backend", "ring", "-p", str(_free_base_port(n)),
           "--python", sys.executable, "--", *map(str, argv)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ring():
    """Two ring ranks that can all_sum, or a clean skip saying why not."""
    if _launcher() is None:
        pytest.skip("mlx.launch not found next to the Python interpreter")
    probe = ("import mlx.core as mx; g = mx.distributed.init(); "
             "x = mx.distributed.all_sum(mx.array([g.rank() + 1.0]), group=g); print('ring', g.size(), x.item())")
    try:
        p = launch(["-c", probe], timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("mlx.launch --backend ring did not finish a 2-rank all_sum within 60 s")
    if p.returncode != 0 or p.stdout.count("ring 2 3.0") != 2:
        tail = " ".join((p.stdout + p.stderr).split())[-300:]
        pytest.skip(f"mlx.launch --backend ring cannot start 2 ranks here (rc {p.returncode}): {tail}")


def check(p):
    assert p.returncode == 0, f"rc {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


# ----------------------------------------------------------------------------- helpers on one process
def test_helpers_are_identity_on_one_process():
    w = dist.world()
    assert (w.rank, w.size, w.is_main, w.distributed) == (0, 1, True, False) and dist.is_main()
    g = {"a": mx.ones((2, 3)), "b": [mx.arange(4).astype(mx.float32)]}
    assert dist.average_gradients(g) is g and dist.all_sum_tree(g) is g
    out, loss, n = dist.reduce_step(g, mx.array(2.0), mx.array(7.0))
    assert out is g and loss.item() == 2.0 and n.item() == 7.0
    assert dist.all_sum_scalars([1.5, 2]) == [1.5, 2.0] and dist.broadcast_scalar(3.0) == 3.0
    assert dist.any_rank(True) and not dist.any_rank(False)
    dist.barrier()
    dist.check_identical(g)
    names, c = dist.checksums(g)
    assert names == ["a", "b.0"] and c.shape == (4,) and c[0].item() == 6.0
    assert dist.shard(list(range(10)), 1, 3) == [1, 4, 7]


def test_batch_shards_cover_the_global_batch(tmp_path):
    tok = make_tokenizer(tmp_path, 64)
    from mlx_megalodon.tokenizer import Tokenizer
    stream = TokenStream.from_texts(Tokenizer(tok), [" ".join(_training_text(20, seed=i)) for i in range(10)])
    ds = PackedDataset(stream, 16)
    whole = BatchIterator(ds, 6, seed=5)
    parts = [BatchIterator(ds, 6, seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(40):                                    # crosses epochs
        full = whole.next_indices()
        got = [p.next_indices() for p in parts]
        assert all(np.array_equal(g, full) for g in got)   # every rank draws the same global rows
    for p in parts:
        assert p.state_dict() == whole.state_dict()        # the state is world-size independent
    b = [next(p) for p in parts]
    ref = ds.rows(whole.next_indices())
    for r in range(3):
        np.testing.assert_array_equal(b[r].inputs, ref.inputs[r::3])
    with pytest.raises(Exception, match="not divisible"):
        BatchIterator(ds, 5, rank=0, world_size=2)
    # evaluation: a short last batch leaves some ranks nothing
    sizes = [[b.inputs.shape[0] for b in iterate_batches(ds, 4, shuffle=False, loop=False, rank=r, world_size=3)]
             for r in range(3)]
    assert sum(map(sum, sizes)) == len(ds) and len({len(s) for s in sizes}) == 1


COLLECTIVES = """
import json, mlx.core as mx
from mlx_megalodon import distributed as dist
w = dist.world()
r = w.rank
out = {"rank": r, "size": w.size}
grads = {"w": mx.full((3, 2), r + 1.0), "b": [mx.array([r * 1.0])]}
g, loss, n = dist.reduce_step(grads, mx.array(r + 1.0), mx.array((r + 1) * 10.0))
out["reduce"] = [g["w"].tolist(), g["b"][0].tolist(), loss.item(), n.item()]
out["avg"] = dist.average_gradients(grads)["w"][0, 0].item()
out["sum"] = dist.all_sum_tree((grads, [mx.array(2.0)]))[1][0].item()
out["bcast"] = dist.broadcast_scalar(7.0 + r)
out["any"] = [dist.any_rank(r == 1), dist.any_rank(False)]
out["gather"] = dist.gather_scalars([r, 2 * r]).tolist()
dist.barrier()
dist.check_identical(grads["b"][0] * 0 + 5.0)          # equal on all ranks: passes
mx.random.seed(r)                                     # a rank-dependent "initialization"
try:
    dist.check_identical({"layer": {"weight": mx.random.normal((8, 8))}})
    out["mismatch"] = None
except dist.DistributedError as e:
    out["mismatch"] = str(e)
print("RESULT " + json.dumps(out), flush=True)
"""


def test_collectives_on_two_ranks(ring):
    p = check(launch(["-c", COLLECTIVES]))
    res = sorted((json.loads(line[7:]) for line in p.stdout.splitlines() if line.startswith("RESULT ")),
                 key=lambda d: d["rank"])
    assert [d["rank"] for d in res] == [0, 1]
    for d in res:
        g_w, g_b, loss, n = d["reduce"]
        # token-weighted: (10 * 1 + 20 * 2) / 30
        np.testing.assert_allclose(g_w, np.full((3, 2), 5 / 3), rtol=1e-6)
        np.testing.assert_allclose(g_b, [(10 * 0 + 20 * 1) / 30], rtol=1e-6)
        assert loss == pytest.approx(5 / 3, rel=1e-6) and n == 30.0
        assert d["avg"] == 1.5 and d["sum"] == 4.0 and d["bcast"] == 7.0 and d["any"] == [True, False]
        assert d["gather"] == [[0.0, 0.0], [1.0, 2.0]]
        assert "the ranks start from different parameters (first difference in 'layer.weight'; ranks [1]" \
            in d["mismatch"]


# ----------------------------------------------------------------------------- pretraining CLI
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("dp_corpus")
    make_tokenizer(d / "tok", 64)
    (d / "docs").mkdir()
    for i in range(30):
        (d / "docs" / f"doc{i:02d}.txt").write_text(" ".join(_training_text(20, seed=i)))
    (d / "config.json").write_text(json.dumps(TRAIN_ARGS))
    return d


def train_argv(c, out, batch, *extra, iters=6):
    return ["--config", c / "config.json", "--tokenizer", c / "tok" / "tokenizer.model", "--train", c / "docs",
            "--out", out, "--seq-len", "32", "--batch-size", str(batch), "--warmup", "2", "--lr", "3e-3",
            "--iters", str(iters), "--dtype", "float32", "--no-compile", "--quiet", "--report-every", "1", *extra]


CKPT = ("--save-every", "3", "--keep-checkpoints", "5", "--val-every", "3", "--val-batches", "2")


def log_of(out):
    return json.loads((Path(out) / "train_log.json").read_text())


def losses(log):
    return np.array([l for _, l in log["train_losses"]])


def max_diff(name, a, b):
    d = float(np.abs(losses(a) - losses(b)).max())
    print(f"{name}: max |loss diff| {d:.2e} over {len(losses(a))} steps")
    return d


def drop_after(out, step):
    for p in list_checkpoints(Path(out) / "checkpoints"):
        if int(p.name.split("-")[1]) > step:
            shutil.rmtree(p)


def test_train_two_ranks_equal_one_and_checkpoints_cross_rank_counts(ring, corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main([str(a) for a in train_argv(corpus, one, 4, *CKPT)]) == 0
    check(launch(["-m", "mlx_megalodon.train", *train_argv(corpus, two, 2, *CKPT)]))
    a, b = log_of(one), log_of(two)
    assert len(a["train_losses"]) == len(b["train_losses"]) == 6
    np.testing.assert_allclose(losses(b), losses(a), rtol=0, atol=TOL)
    max_diff("train 2 ranks x 2 rows vs 1 x 4", a, b)
    np.testing.assert_allclose([v for _, v in b["val_history"]], [v for _, v in a["val_history"]], rtol=0, atol=TOL)
    assert [s for s, _ in b["val_history"]] == [3, 6] and b["tokens"] == a["tokens"] == 6 * 4 * 32
    assert (b["world_size"], b["global_batch_size"]) == (2, 4)
    assert [p.name for p in list_checkpoints(two / "checkpoints")] == ["step-00000003", "step-00000006"]
    state = json.loads((two / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["data"]["position"] == 3 * 4 and state["world_size"] == 2   # global rows

    # 2-rank checkpoint -> 1 rank (with the same global batch): the same continuation
    two_one = tmp_path / "two_one"
    shutil.copytree(two, two_one)
    drop_after(two_one, 3)
    assert train_main([str(a) for a in train_argv(corpus, two_one, 4, *CKPT, "--resume")]) == 0
    c = log_of(two_one)
    assert c["train_losses"][:3] == b["train_losses"][:3]          # history restored as saved
    np.testing.assert_allclose(losses(c), losses(b), rtol=0, atol=TOL)
    max_diff("train resumed 2 ranks -> 1", b, c)
    np.testing.assert_allclose(c["final_val_loss"], b["final_val_loss"], rtol=0, atol=TOL)

    # 1-rank checkpoint -> 2 ranks
    one_two = tmp_path / "one_two"
    shutil.copytree(one, one_two)
    drop_after(one_two, 3)
    check(launch(["-m", "mlx_megalodon.train", *train_argv(corpus, one_two, 2, *CKPT, "--resume")]))
    d = log_of(one_two)
    assert d["train_losses"][:3] == a["train_losses"][:3]
    np.testing.assert_allclose(losses(d), losses(a), rtol=0, atol=TOL)
    max_diff("train resumed 1 rank -> 2", a, d)
    np.testing.assert_allclose(d["final_val_loss"], a["final_val_loss"], rtol=0, atol=TOL)

    # a different global batch is refused, naming both
    other = tmp_path / "other"
    shutil.copytree(two, other)
    drop_after(other, 3)
    argv = [str(x) for x in train_argv(corpus, other, 2, *CKPT, "--resume")]
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert train_main(argv) == 1
    assert "global batch (batch_size x ranks) was 2 x 2 = 4 rows" in err.getvalue()
    assert "now 2 x 1 = 2" in err.getvalue()


def test_train_two_ranks_with_grad_accumulation(ring, corpus, tmp_path):
    """2 ranks x 1 row x 2 micro-batches = 1 rank x 4 rows: the accumulation path's all_sum."""
    ref, acc = tmp_path / "ref", tmp_path / "acc"
    assert train_main([str(a) for a in train_argv(corpus, ref, 4, "--save-every", "0", iters=4)]) == 0
    check(launch(["-m", "mlx_megalodon.train",
                  *train_argv(corpus, acc, 1, "--grad-accum", "2", "--save-every", "0", iters=4)]))
    a, b = log_of(ref), log_of(acc)
    np.testing.assert_allclose(losses(b), losses(a), rtol=0, atol=TOL)
    max_diff("train 2 ranks x 1 row x 2 micro-batches vs 1 x 4", a, b)
    np.testing.assert_allclose(b["final_val_loss"], a["final_val_loss"], rtol=0, atol=TOL)
    assert not (acc / "checkpoints").exists()


def test_train_two_ranks_compiled(ring, corpus, tmp_path):
    """The default path: the all_sum inside the mx.compile'd train step."""
    ref, two = tmp_path / "ref", tmp_path / "two"
    common = ("--save-every", "0", "--val-fraction", "0")
    ref_argv = [str(a) for a in train_argv(corpus, ref, 4, *common, iters=3)]
    ref_argv.remove("--no-compile")
    assert train_main(ref_argv) == 0
    argv = train_argv(corpus, two, 2, *common, iters=3)
    argv.remove("--no-compile")
    check(launch(["-m", "mlx_megalodon.train", *argv], timeout=240))
    a, b = log_of(ref), log_of(two)
    assert a["train_config"]["compile"] and b["world_size"] == 2
    np.testing.assert_allclose(losses(b), losses(a), rtol=0, atol=TOL)
    max_diff("train compiled 2 ranks vs 1", a, b)


# ----------------------------------------------------------------------------- LoRA
DRIVER = '''
import json, sys
from mlx_megalodon import distributed as dist, lora
for out, *argv in json.loads(open(sys.argv[1]).read()):
    lines = []
    history = lora.run(lora.resolve_options(argv), lines.append)
    if dist.is_main():
        open(out, "w").write(json.dumps({"history": history, "lines": lines}))
'''


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    from mlx_megalodon.checkpoint import convert
    root = tmp_path_factory.mktemp("dp_lora")
    args = tiny_args(**LORA_ARGS)
    convert(make_upstream_dir(root / "upstream", args, random_upstream_state_dict(args, seed=0)), root / "model")
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world"]
    rows = [{"text": " ".join(rng.choice(words, size=int(rng.integers(3, 30))))} for _ in range(30)]
    data = root / "data"
    data.mkdir()
    for name, part in (("train", rows[:20]), ("valid", rows[20:27]), ("test", rows[20:])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (root / "driver.py").write_text(DRIVER)
    return root


def lora_job(root, name, batch, *extra):
    return [str(root / f"{name}.json"), "--model", str(root / "model"), "--data", str(root / "data"),
            "--adapter-path", str(root / name), "--train", "--test", "--iters", "4", "--batch-size", str(batch),
            "--steps-per-report", "1", "--steps-per-eval", "2", "--val-batches", "-1", "--num-layers", "-1",
            "--save-every", "0", *extra]


def test_lora_two_ranks_equal_one(ring, lora_setup):
    """Examples of different lengths: the ranks' shards hold different token counts, so only a
    token-weighted combination reproduces the single-process step."""
    from mlx_megalodon import lora
    root = lora_setup
    adam = ("--learning-rate", "1e-3", "--compile", "on")   # the compiled update, all_sum inside
    sgd = ("--optimizer", "sgd", "--learning-rate", "0.2", "--grad-accumulation-steps", "2")
    jobs = {"one": lora_job(root, "one", 4, *adam), "two": lora_job(root, "two", 2, *adam),
            "one_acc": lora_job(root, "one_acc", 2, *sgd), "two_acc": lora_job(root, "two_acc", 1, *sgd)}
    (root / "jobs2.json").write_text(json.dumps([jobs["two"], jobs["two_acc"]]))
    check(launch([root / "driver.py", root / "jobs2.json"]))
    for name in ("one", "one_acc"):
        out, *argv = jobs[name]
        history = lora.run(lora.resolve_options(argv), lambda m: None)
        Path(out).write_text(json.dumps({"history": history}))
    # Adam: g / sqrt(v) turns float32 rounding differences of near-zero gradient entries into
    # weight differences of up to ~lr, so its weights are compared loosely; plain SGD shows the
    # gradients themselves agree to float32 rounding.
    for one, two, weight_tol in (("one", "two", 2e-3), ("one_acc", "two_acc", TOL)):
        a, b = (json.loads((root / f"{n}.json").read_text())["history"] for n in (one, two))
        assert [i for i, _ in b["train"]] == [1, 2, 3, 4] and [i for i, _ in b["val"]] == [0, 2, 4]
        for key in ("train", "val"):
            np.testing.assert_allclose([v for _, v in b[key]], [v for _, v in a[key]], rtol=0, atol=TOL,
                                       err_msg=f"{two} vs {one}: {key}")
        np.testing.assert_allclose(b["test"], a["test"], rtol=0, atol=TOL)
        wa, wb = (mx.load(str(root / n / "adapters.safetensors")) for n in (one, two))
        assert wa.keys() == wb.keys()
        moved = max(np.abs(np.array(wa[k])).max() for k in wa if k.endswith("lora_b"))
        assert moved > 1e-3
        for k in wa:
            np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), rtol=0, atol=weight_tol, err_msg=k)
        print(f"{two} vs {one}: max |loss diff| "
              f"{max(abs(x - y) for (_, x), (_, y) in zip(a['train'] + a['val'], b['train'] + b['val'])):.2e}, "
              f"max |weight diff| {max(np.abs(np.array(wb[k]) - np.array(wa[k])).max() for k in wa):.2e} "
              f"(lora_b up to {moved:.2e})")
    lines = json.loads((root / "two.json").read_text())["lines"]
    assert any("Data parallel over 2 ranks: global batch 4 (2 per rank)" in ln for ln in lines)
    assert json.loads((root / "two" / "adapter_config.json").read_text())["world_size"] == 2
