"""The weight conversion (mlx_megalodon.checkpoint), the tokenizer wrapper and convert.py. CPU only."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from factory import (make_tokenizer, make_upstream_dir, random_upstream_state_dict, tiny_args,
                     tokenizer_bytes)
from mlx_megalodon import checkpoint as ck
from mlx_megalodon.checkpoint import CheckpointError
from mlx_megalodon.config import ConfigError, ModelArgs, is_full_precision_key, upstream_shapes
from mlx_megalodon.tokenizer import Tokenizer, TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONVERT = ROOT / "convert.py"

CONFIGS = {
    "plain": {},
    "swiglu": dict(swiglu=True),
    "share_emb": dict(share_emb=True, scale_emb=True),
    "rescale_nffn": dict(rescale_nffn=True),
    "all_on": dict(swiglu=True, share_emb=True, rescale_nffn=True, rope_base=100000.0, num_heads=1),
}


def assert_same_state(expected: dict, found: dict, args: ModelArgs) -> None:
    assert list(found) == list(upstream_shapes(args))
    assert set(found) == set(expected)
    for k in expected:
        assert found[k].dtype == expected[k].dtype, k
        assert found[k].shape == expected[k].shape, k
        assert torch.equal(found[k], expected[k]), k
    if args.share_emb:
        assert found["output.output.weight"] is found["embed.weight"]
    else:
        assert found["output.output.weight"] is not found["embed.weight"]


def run_cli(*argv, env=None):
    e = dict(os.environ)
    e["HF_HUB_OFFLINE"] = "1"
    e.update(env or {})
    return subprocess.run([sys.executable, str(CONVERT), *map(str, argv)], capture_output=True, text=True,
                          env=e, cwd=str(ROOT), timeout=120)


def assert_cli_error(res, *names):
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    for n in names:
        assert str(n) in lines[0], (n, lines[0])


def assert_nothing_left(dst: Path):
    assert not dst.exists()
    leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.tmp")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def tiny_upstream(tmp_path_factory):
    args = tiny_args()
    sd = random_upstream_state_dict(args, seed=1)
    d = make_upstream_dir(tmp_path_factory.mktemp("up") / "ckpt", args, sd)
    return args, sd, d


@pytest.fixture(scope="module")
def tiny_mlx(tmp_path_factory, tiny_upstream):
    args, sd, up = tiny_upstream
    d = tmp_path_factory.mktemp("mlx") / "model"
    ck.convert(up, d)
    return args, sd, d


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(CONFIGS))
def test_roundtrip_upstream_mlx_upstream_bit_exact(tmp_path, name):
    args = tiny_args(**CONFIGS[name])
    sd = random_upstream_state_dict(args, seed=3)
    up = make_upstream_dir(tmp_path / "up", args, sd)

    mlx_dir = ck.convert(up, tmp_path / "mlx")
    assert json.loads((mlx_dir / "config.json").read_text()) == args.to_dict()
    assert json.loads((mlx_dir / "config.json").read_text())["model_type"] == "megalodon"
    assert (mlx_dir / "tokenizer.model").read_bytes() == (up / "tokenizer.model").read_bytes()
    with safe_open(str(mlx_dir / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "mlx"}
        keys = set(f.keys())
    assert "rope.freqs" not in keys
    assert ("output.output.weight" in keys) == (not args.share_emb)
    stored = load_file(str(mlx_dir / "model.safetensors"))
    assert stored["layers.0.mega.timenorm.prior_count"].dtype == torch.int64
    for k, t in stored.items():
        assert torch.equal(t, sd[k]) and t.dtype == sd[k].dtype, k

    back = ck.convert(mlx_dir, tmp_path / "up2", to="upstream")
    assert json.loads((back / "consolidate_config.json").read_text()) == {"model_parallel_size": 1,
                                                                          "dtype": "fp32"}
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["tokenizer"]["path"] == "tokenizer.model"
    args2, sd2, tok = ck.read_upstream(back)
    assert args2 == args
    assert tok == back / "tokenizer.model"
    assert_same_state(sd, sd2, args)
    # torch.save kept upstream's tying inside the file too
    raw = torch.load(back / "consolidated.pth", weights_only=True)
    if args.share_emb:
        assert raw["output.output.weight"].untyped_storage().data_ptr() == \
            raw["embed.weight"].untyped_storage().data_ptr()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_in_memory_conversion_is_inverse(name):
    args = tiny_args(**CONFIGS[name])
    sd = random_upstream_state_dict(args, seed=5)
    w = ck.upstream_to_mlx(args, sd)
    assert set(w) == set(ck.mlx_shapes(args))
    assert_same_state(sd, ck.mlx_to_upstream(args, w), args)


def test_rope_freqs_bit_exact_with_upstream_formula():
    for rope_base, upstream_base in ((None, 10000), (100000.0, 100000.0), (5e5, 5e5)):
        for heads, z in ((1, 8), (2, 8), (4, 64), (1, 256)):
            args = tiny_args(rope_base=rope_base, num_heads=heads, z_dim=z)
            dz = z // heads
            # upstream RotaryEmbedding._precompute_freqs, with upstream's int default base
            ref = 1.0 / torch.tensor([upstream_base ** (j / dz) for j in range(0, dz, 2)], dtype=torch.float32)
            got = ck.rope_freqs(args)
            assert got.dtype == torch.float32 and torch.equal(got, ref)


def test_wrong_rope_freqs_and_untied_share_emb_are_rejected():
    args = tiny_args(share_emb=True)
    sd = random_upstream_state_dict(args)
    bad = dict(sd, **{"rope.freqs": sd["rope.freqs"] * 1.0001})
    with pytest.raises(CheckpointError, match="rope.freqs"):
        ck.upstream_to_mlx(args, bad)
    untied = dict(sd, **{"output.output.weight": sd["embed.weight"] + 1})
    with pytest.raises(CheckpointError, match="output.output.weight"):
        ck.upstream_to_mlx(args, untied)
    # an equal copy (e.g. after merging shards) is accepted
    copy = dict(sd, **{"output.output.weight": sd["embed.weight"].clone()})
    assert "output.output.weight" not in ck.upstream_to_mlx(args, copy)


def test_validate_names_missing_unexpected_misshaped_and_non_tensor_keys():
    args = tiny_args()
    sd = random_upstream_state_dict(args)
    cases = {
        "missing key 'layers.1.mega.wz.bias'": {k: v for k, v in sd.items() if k != "layers.1.mega.wz.bias"},
        "unexpected key 'layers.0.mega.extra'": dict(sd, **{"layers.0.mega.extra": torch.zeros(1)}),
        "'layers.0.nffn.fc1.weight'.*shape \\[20, 15\\], expected \\[20, 16\\]":
            dict(sd, **{"layers.0.nffn.fc1.weight": torch.zeros(20, 15)}),
        "'embed.weight'.*not a tensor": dict(sd, **{"embed.weight": [1.0]}),
        "'layers.0.mega.wv.weight'.*floating": dict(sd, **{"layers.0.mega.wv.weight": torch.zeros(24, 16,
                                                                                           dtype=torch.int32)}),
    }
    for pattern, bad in cases.items():
        with pytest.raises(CheckpointError, match=pattern):
            ck.validate_upstream_state_dict(args, bad)
    ck.validate_upstream_state_dict(args, sd)
    with pytest.raises(CheckpointError, match="layers.2"):      # absurd layer count named fast
        ck.validate_upstream_state_dict(tiny_args(num_layers=10 ** 12), sd)


# --------------------------------------------------------------------------- model-parallel shards
@pytest.mark.parametrize("mp", [2, 4])
@pytest.mark.parametrize("share_emb", [False, True])
def test_model_parallel_shards_merge_exactly(tmp_path, mp, share_emb):
    args = tiny_args(share_emb=share_emb, swiglu=True, rescale_nffn=True, num_heads=4, z_dim=16)
    sd = random_upstream_state_dict(args, seed=mp)
    d = make_upstream_dir(tmp_path / "up", args, sd, model_parallel_size=mp)
    assert sorted(p.name for p in d.glob("consolidated*.pth")) == [f"consolidated.{r:02d}.pth" for r in range(mp)]
    shard0 = torch.load(d / "consolidated.00.pth", weights_only=True)
    assert shard0["embed.weight"].shape == (args.vocab_size, args.model_dim // mp)
    assert shard0["layers.0.mega.wv.weight"].shape == (args.value_dim // mp, args.model_dim)
    args2, sd2, _ = ck.read_upstream(d)
    assert_same_state(sd, sd2, args)
    # and on through the MLX format
    args3, sd3, _ = ck.load_upstream_state(ck.convert(d, tmp_path / "mlx"))
    assert_same_state(sd, sd3, args)


def test_model_parallel_replicated_mismatch_and_missing_shard(tmp_path):
    args = tiny_args()
    sd = random_upstream_state_dict(args)
    d = make_upstream_dir(tmp_path / "up", args, sd, model_parallel_size=2)
    s1 = torch.load(d / "consolidated.01.pth", weights_only=True)
    s1["layers.0.nffn.norm.weight"] = s1["layers.0.nffn.norm.weight"] + 1
    torch.save(s1, d / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth.*layers\.0\.nffn\.norm\.weight"):
        ck.read_upstream(d)
    (d / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth"):
        ck.read_upstream(d)


# --------------------------------------------------------------------------- sharded MLX output
def test_sharded_mlx_write_roundtrips(tmp_path, tiny_upstream, monkeypatch):
    args, sd, up = tiny_upstream
    monkeypatch.setattr(ck, "MAX_SHARD_BYTES", 4096)
    d = ck.convert(up, tmp_path / "mlx")
    assert not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in d.glob("model-*.safetensors"))
    n = len(files)
    assert n > 2
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weights = ck.upstream_to_mlx(args, sd)
    assert set(index["weight_map"]) == set(weights)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    for f in files:
        with safe_open(str(d / f), "pt") as h:
            assert h.metadata() == {"format": "mlx"}
            assert set(h.keys()) == {k for k, v in index["weight_map"].items() if v == f}
            assert sum(h.get_tensor(k).numel() * h.get_tensor(k).element_size() for k in h.keys()) <= 4096
    args2, w2, tok = ck.read_mlx_dir(d)
    assert args2 == args and tok == d / "tokenizer.model"
    for k in weights:
        assert torch.equal(w2[k], weights[k]) and w2[k].dtype == weights[k].dtype
    assert_same_state(sd, ck.load_upstream_state(d)[1], args)

    # a shard that lost a key, or an index naming a missing file, is reported
    index["weight_map"]["embed.weight"] = "model-99999-of-99999.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-99999-of-99999.safetensors"):
        ck.read_mlx_dir(d)


def test_single_file_below_threshold(tmp_path, tiny_upstream):
    args, sd, up = tiny_upstream
    w = ck.upstream_to_mlx(args, sd)
    d = ck.write_mlx_dir(tmp_path / "m", args, w, up / "tokenizer.model", max_shard_bytes=10 ** 9)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype,tdtype,up_name", [("bfloat16", torch.bfloat16, "bf16"),
                                                   ("float16", torch.float16, "fp16")])
def test_dtype_cast_keeps_full_precision_keys(tmp_path, tiny_upstream, dtype, tdtype, up_name):
    args, sd, up = tiny_upstream
    res = run_cli(up, tmp_path / "m", "--dtype", dtype)
    assert res.returncode == 0, res.stderr
    w = load_file(str(tmp_path / "m" / "model.safetensors"))
    for k, t in w.items():
        if k.endswith("prior_count"):
            assert t.dtype == torch.int64
        elif is_full_precision_key(k):
            assert t.dtype == torch.float32, k
            assert torch.equal(t, sd[k]), k
        else:
            assert t.dtype == tdtype, k
            assert torch.equal(t, sd[k].to(tdtype)), k
    assert w["layers.1.mega.wv.weight"].dtype == tdtype
    assert w["layers.1.mega.cema.gamma"].dtype == torch.float32
    assert w["layers.1.mega.gamma"].dtype == torch.float32
    assert w["output.final_norm.weight"].dtype == torch.float32

    # and back to an upstream directory in that dtype
    back = ck.convert(tmp_path / "m", tmp_path / "up", to="upstream", dtype=dtype)
    assert json.loads((back / "consolidate_config.json").read_text())["dtype"] == up_name
    args2, sd2, _ = ck.read_upstream(back)
    assert sd2["layers.0.nffn.fc2.weight"].dtype == tdtype
    assert sd2["rope.freqs"].dtype == torch.float32
    assert torch.equal(sd2["embed.weight"], sd["embed.weight"].to(tdtype))


def test_half_precision_upstream_checkpoint_reads(tmp_path):
    """upstream's model.to(bf16) also casts rope.freqs and CEMA; both read back (CEMA as float32)."""
    args = tiny_args(share_emb=True)
    sd = random_upstream_state_dict(args)
    up = make_upstream_dir(tmp_path / "up", args, sd, dtype="bf16")
    a, w, _ = ck.load_mlx_weights(up)
    assert w["embed.weight"].dtype == torch.bfloat16
    assert w["layers.0.mega.cema.alpha"].dtype == torch.float32
    assert torch.equal(w["layers.0.mega.cema.alpha"], sd["layers.0.mega.cema.alpha"].bfloat16().float())
    a, w, _ = ck.load_mlx_weights(up, dtype="float32")
    assert w["embed.weight"].dtype == torch.float32


def test_either_format_loads(tiny_upstream, tiny_mlx):
    args, sd, up = tiny_upstream
    _, _, mlx_dir = tiny_mlx
    for src in (up, mlx_dir, str(up), str(mlx_dir)):
        a, sd2, tok = ck.load_upstream_state(src)
        assert a == args and tok is not None
        assert_same_state(sd, sd2, args)
        a, w, tok = ck.load_mlx_weights(src)
        assert a == args and set(w) == set(ck.mlx_shapes(args))
        for k in w:
            assert torch.equal(w[k], sd[k])
    with pytest.raises(CheckpointError, match="not a Megalodon checkpoint"):
        ck.load_upstream_state(up.parent)


def test_single_pth_with_config_file(tmp_path, tiny_upstream):
    args, sd, up = tiny_upstream
    pth = tmp_path / "weights.pth"
    shutil.copyfile(up / "consolidated.pth", pth)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(args.upstream_dict()))
    a, sd2, tok = ck.read_upstream(pth, config=bare, tokenizer=up / "tokenizer.model")
    assert a == args and tok == up / "tokenizer.model"
    assert_same_state(sd, sd2, args)
    # upstream-style config.json next to the file, vocab_size -1 resolved from the tokenizer
    cfg = json.loads((up / "config.json").read_text())
    cfg["model"]["vocab_size"] = -1
    cfg["tokenizer"]["path"] = "/nonexistent/cluster/path/tokenizer.model"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    make_tokenizer(tmp_path, name="spm.model")                 # fallback: the only *.model file
    a, sd2, tok = ck.read_upstream(pth)
    assert a.vocab_size == 64 and tok == tmp_path / "spm.model"
    res = run_cli(pth, tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 64


def test_vocab_resolution_and_tokenizer_larger_than_model(tmp_path):
    args = tiny_args()
    sd = random_upstream_state_dict(args)
    up = make_upstream_dir(tmp_path / "up", args, sd, vocab_in_config=-1)
    assert ck.read_upstream(up)[0].vocab_size == 64
    (up / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="vocab_size is -1"):
        ck.read_upstream(up)
    make_tokenizer(up, vocab_size=128)
    cfg = json.loads((up / "config.json").read_text())
    cfg["model"]["vocab_size"] = 64
    (up / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="tokenizer.model.*128"):
        ck.read_upstream(up)


def test_write_upstream_dir_is_atomic(tmp_path, tiny_upstream):
    args, sd, up = tiny_upstream
    dst = tmp_path / "up"
    bad = {k: v for k, v in sd.items() if k != "embed.weight"}
    with pytest.raises(CheckpointError, match="embed.weight"):
        ck.write_upstream_dir(dst, args, bad, up / "tokenizer.model")
    assert_nothing_left(dst)
    with pytest.raises(TokenizerError, match="nope.model"):
        ck.write_mlx_dir(dst, args, ck.upstream_to_mlx(args, sd), tmp_path / "nope.model")
    assert_nothing_left(dst)
    ck.write_upstream_dir(dst, args, sd, up / "tokenizer.model")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "consolidate_config.json",
                                                     "consolidated.pth", "tokenizer.model"]
    with pytest.raises(CheckpointError, match="already exists"):
        ck.write_upstream_dir(dst, args, sd, None)


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer(tmp_path):
    p = make_tokenizer(tmp_path)
    tok = Tokenizer(p)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.path) == (64, 1, 2, -1, p)
    ids = tok.encode("hello world the quick brown fox")
    assert ids[0] == tok.bos_id and tok.eos_id not in ids
    assert all(0 <= i < 64 for i in ids)
    assert tok.decode(ids) == "hello world the quick brown fox"
    assert tok.encode("the", bos=False, eos=True)[-1] == tok.eos_id
    assert tok.decode(tok.encode("the fox", eos=True) + [tok.encode("model", bos=False)[0]],
                      cut_at_eos=True) == "the fox"
    big = Tokenizer(p, additional_vocab_size=256)
    assert big.vocab_size == 320 and big.decode(ids + [300]) == tok.decode(ids)
    assert load_tokenizer(tmp_path).vocab_size == 64
    assert load_tokenizer(p).vocab_size == 64


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="missing.model"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01not a sentencepiece model" * 10)
    with pytest.raises(TokenizerError, match="bad.model") as e:
        Tokenizer(bad)
    assert "\n" not in str(e.value)
    trunc = tmp_path / "trunc.model"
    trunc.write_bytes(tokenizer_bytes()[:100])
    with pytest.raises(TokenizerError, match="trunc.model"):
        Tokenizer(trunc)
    with pytest.raises(TokenizerError):
        load_tokenizer(tmp_path / "empty_dir_does_not_exist")
    assert issubclass(TokenizerError, ValueError)


# --------------------------------------------------------------------------- hub
def _fake_hub_snapshot(cache: Path, repo_id: str, src: Path) -> Path:
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):     # blobs + relative symlinks, as the hub cache does
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_hub_offline_snapshot_and_unknown_repo(tmp_path, tiny_upstream, tiny_mlx):
    args, sd, up = tiny_upstream
    _, _, mlx_dir = tiny_mlx
    cache = tmp_path / "hf" / "hub"
    _fake_hub_snapshot(cache, "someone/megalodon-tiny-upstream", up)
    _fake_hub_snapshot(cache, "someone/megalodon-tiny-mlx", mlx_dir)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    res = run_cli("someone/megalodon-tiny-upstream", tmp_path / "out", env=env)
    assert res.returncode == 0, res.stderr
    assert_same_state(sd, ck.load_upstream_state(tmp_path / "out")[1], args)
    res = run_cli("someone/megalodon-tiny-mlx", tmp_path / "out_up", "--to", "upstream", env=env)
    assert res.returncode == 0, res.stderr
    assert_same_state(sd, ck.read_upstream(tmp_path / "out_up")[1], args)

    res = run_cli("someone/does-not-exist", tmp_path / "out2", env=env)
    assert_cli_error(res, "someone/does-not-exist")
    assert_nothing_left(tmp_path / "out2")


def test_resolve_path_unknown_repo_in_process(monkeypatch, tmp_path):
    import huggingface_hub

    def fail(**kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline\nand not cached")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(CheckpointError, match="nobody/nothing") as e:
        ck.resolve_path("nobody/nothing")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such file"):
        ck.resolve_path(str(tmp_path / "a" / "b" / "c"))
    assert ck.resolve_path(tmp_path) == tmp_path


# --------------------------------------------------------------------------- CLI errors
def _mutate_pth(d: Path, fn):
    sd = torch.load(d / "consolidated.pth", weights_only=True)
    fn(sd)
    torch.save(sd, d / "consolidated.pth")


def _set_config(d: Path, **model):
    cfg = json.loads((d / "config.json").read_text())
    cfg["model"].update(model)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(f: Path, keep: int):
    f.write_bytes(f.read_bytes()[:keep])


def _make_dst_with_content(d: Path):
    d.mkdir()
    (d / "keep.txt").write_text("precious")


# case: (source "upstream" | "mlx", mutate(src), mutate(dst) | None, extra CLI args, names in the message)
BAD_INPUTS = {
    "missing_key": ("upstream", lambda d: _mutate_pth(d, lambda sd: sd.pop("layers.1.nffn.fc2.weight")),
                    None, [], ["layers.1.nffn.fc2.weight"]),
    "extra_key": ("upstream", lambda d: _mutate_pth(d, lambda sd: sd.update({"layers.0.bogus": torch.zeros(3)})),
                  None, [], ["layers.0.bogus"]),
    "misshaped_key": ("upstream", lambda d: _mutate_pth(
        d, lambda sd: sd.update({"layers.0.mega.wz.weight": torch.zeros(8, 17)})),
        None, [], ["layers.0.mega.wz.weight", "[8, 17]", "[8, 16]"]),
    "bad_json": ("upstream", lambda d: (d / "config.json").write_text('{"model": {"num_layers": 2,'),
                 None, [], ["config.json"]),
    "config_missing": ("upstream", lambda d: (d / "config.json").unlink(), None, [], ["config.json"]),
    "config_invalid_field": ("upstream", lambda d: _set_config(d, num_heads=3), None, [],
                             ["config.json", "num_heads"]),
    "config_wrong_type": ("upstream", lambda d: _set_config(d, model_dim="sixteen"), None, [],
                          ["config.json", "model_dim"]),
    "tokenizer_missing": ("upstream", lambda d: (d / "tokenizer.model").unlink(), None, [], ["tokenizer"]),
    "tokenizer_option_missing": ("upstream", lambda d: None, None, ["--tokenizer", "/no/such/tok.model"],
                                 ["/no/such/tok.model"]),
    "truncated_pth": ("upstream", lambda d: _truncate(d / "consolidated.pth", 3000), None, [],
                      ["consolidated.pth"]),
    "truncated_safetensors": ("mlx", lambda d: _truncate(d / "model.safetensors", -100), None, [],
                              ["model.safetensors"]),
    "truncated_safetensors_to_upstream": ("mlx", lambda d: _truncate(d / "model.safetensors", -100), None,
                                          ["--to", "upstream"], ["model.safetensors"]),
    "unknown_dtype": ("upstream", lambda d: None, None, ["--dtype", "float8"], ["float8"]),
    "unknown_target": ("upstream", lambda d: None, None, ["--to", "gguf"], ["gguf"]),
    "dst_exists": ("upstream", lambda d: None, _make_dst_with_content, [], ["dst", "exists"]),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, tiny_upstream, tiny_mlx):
    """Every bad-input CLI run, started together (each is a fresh interpreter importing torch)."""
    bases = {"upstream": tiny_upstream[2], "mlx": tiny_mlx[2]}
    root = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = {}
    for case, (fmt, mutate, prepare_dst, extra, _) in BAD_INPUTS.items():
        src, dst = root / case / "src", root / case / "dst"
        shutil.copytree(bases[fmt], src)
        mutate(src)
        if prepare_dst:
            prepare_dst(dst)
        procs[case] = (dst, subprocess.Popen([sys.executable, str(CONVERT), str(src), str(dst), *extra],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                             env=env, cwd=str(ROOT)))
    # and a good run, plus a usage error
    procs["ok"] = (root / "ok", subprocess.Popen([sys.executable, str(CONVERT), str(bases["upstream"]),
                                                  str(root / "ok"), "--dtype", "float32"],
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                 env=env, cwd=str(ROOT)))
    procs["usage"] = (None, subprocess.Popen([sys.executable, str(CONVERT)], stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT)))
    results = {}
    for case, (dst, p) in procs.items():
        out, err = p.communicate(timeout=300)
        results[case] = (dst, subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_rejects_bad_input(cli_runs, case):
    dst, res = cli_runs[case]
    assert_cli_error(res, *BAD_INPUTS[case][4])
    if case == "dst_exists":          # untouched
        assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
        assert (dst / "keep.txt").read_text() == "precious"
        assert not [p for p in dst.parent.iterdir() if p.name.startswith(".dst.tmp")]
    else:
        assert_nothing_left(dst)


def test_cli_success_and_usage(cli_runs):
    dst, res = cli_runs["ok"]
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    _, res = cli_runs["usage"]
    assert res.returncode == 2                                   # argparse usage error


# --------------------------------------------------------------------------- fuzz
ALLOWED = (CheckpointError, TokenizerError, ConfigError)
MUTATIONS = ["drop", "rename", "reshape", "config_value", "config_drop", "consolidate", "index",
             "random_bytes", "truncate", "tokenizer_bytes"]
CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 10 ** 12), st.floats(allow_nan=True),
                          st.text(max_size=5), st.lists(st.integers(), max_size=2),
                          st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def _apply(data, d: Path, kind: str) -> bool:
    """Mutate checkpoint dir ``d``; True when the result can't be a valid checkpoint."""
    is_mlx = (d / "model.safetensors").exists() or (d / "model.safetensors.index.json").exists()
    wfile = d / ("model.safetensors" if is_mlx else "consolidated.pth")
    if not wfile.exists():                                       # already split by "index"
        wfile = data.draw(st.sampled_from(sorted(d.glob("model-*.safetensors"))), label="shard")

    def load():
        return load_file(str(wfile)) if is_mlx else torch.load(wfile, weights_only=True)

    def save(sd):
        if is_mlx:
            save_file({k: v.contiguous() for k, v in sd.items()}, str(wfile), metadata={"format": "mlx"})
        else:
            torch.save(sd, wfile)

    if kind in ("drop", "rename", "reshape"):
        sd = load()
        key = data.draw(st.sampled_from(sorted(sd)), label="key")
        t = sd.pop(key)
        if kind == "rename":
            sd[key + data.draw(st.sampled_from(["x", ".weight", "_"]), label="suffix")] = t
        elif kind == "reshape":
            shape = list(t.shape) or [1]
            i = data.draw(st.integers(0, len(shape) - 1), label="dim")
            shape[i] += data.draw(st.sampled_from([1, 2]), label="delta")  # only grows: never undone
            if data.draw(st.booleans(), label="unsqueeze"):
                shape.append(1)
            sd[key] = torch.zeros(shape, dtype=t.dtype)
        save(sd)
        return True
    if kind in ("config_value", "config_drop"):
        cfg = json.loads((d / "config.json").read_text())
        model = cfg["model"] if "model" in cfg else cfg
        field = data.draw(st.sampled_from(sorted(model)), label="field")
        if kind == "config_drop":
            model.pop(field)
        else:
            model[field] = data.draw(CONFIG_VALUES, label="value")
        (d / "config.json").write_text(json.dumps(cfg))
        return False
    if kind == "consolidate":
        if is_mlx:
            (d / "config.json").write_text(data.draw(st.text(max_size=30), label="config_text"))
        else:
            (d / "consolidate_config.json").write_text(json.dumps(
                {"model_parallel_size": data.draw(CONFIG_VALUES, label="mp"), "dtype": "fp32"}))
        return False
    if kind == "index":
        if is_mlx and wfile.name == "model.safetensors":
            w = load()
            keys = sorted(w)
            half = data.draw(st.integers(0, len(keys)), label="split")
            save_file({k: w[k].contiguous() for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
            save_file({k: w[k].contiguous() for k in keys[half:]}, str(d / "model-00002-of-00002.safetensors"))
            wfile.unlink()
            wm = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
                  for i, k in enumerate(keys)}
            if data.draw(st.booleans(), label="corrupt_map"):
                k = data.draw(st.sampled_from(keys), label="map_key")
                wm[k] = data.draw(st.sampled_from(["../x", "", "model-00001-of-00002.safetensors",
                                                   "model-00002-of-00002.safetensors", "nope"]), label="to")
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
        return False
    target = {"random_bytes": wfile, "truncate": wfile, "tokenizer_bytes": d / "tokenizer.model"}[kind]
    raw = bytearray(target.read_bytes())
    if not raw:                                                  # already truncated to nothing
        return False
    if kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")]
    else:
        start = data.draw(st.integers(0, len(raw) - 1), label="at")
        junk = data.draw(st.binary(min_size=1, max_size=64), label="junk")
        raw[start:start + len(junk)] = junk
    target.write_bytes(bytes(raw))
    return False


@pytest.fixture(scope="module")
def fuzz_dirs(tiny_upstream, tiny_mlx):
    return tiny_upstream[2], tiny_mlx[2]          # paths only: hypothesis reprs its arguments


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_loader_raises_only_documented_errors(data, fuzz_dirs):
    up, mlx_dir = fuzz_dirs
    base = data.draw(st.sampled_from([up, mlx_dir]), label="format")
    kinds = data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3), label="mutations")
    kinds.sort(key=MUTATIONS.index)         # edit tensors and configs before corrupting bytes
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "ckpt"
        shutil.copytree(base, d)
        must_fail = False
        for kind in kinds:
            must_fail |= _apply(data, d, kind)
        # a config change can make a dropped key legitimately absent (e.g. share_emb)
        must_fail &= not any(k.startswith("config") or k == "consolidate" for k in kinds)
        loader = data.draw(st.sampled_from([ck.load_upstream_state, ck.load_mlx_weights]), label="loader")
        try:
            a, state, tok = loader(d)
        except ALLOWED as e:
            assert "\n" not in str(e)
            return
        assert not must_fail, f"{kinds} loaded without error"
        expected = upstream_shapes(a) if loader is ck.load_upstream_state else ck.mlx_shapes(a)
        assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(s) for k, s in expected.items()}


# --------------------------------------------------------------------------- helpers for the MLX side
def test_numpy_view_keeps_bfloat16_bits():
    t = torch.randn(3, 5).bfloat16()
    a, name = ck.numpy_view(t)
    assert name == "bfloat16" and a.dtype.name == "uint16" and a.shape == (3, 5)
    assert torch.equal(torch.from_numpy(a.view("int16")).view(torch.bfloat16), t)
    a, name = ck.numpy_view(torch.tensor(7, dtype=torch.int64))
    assert name == "int64" and a.shape == () and int(a) == 7


def test_quantized_mlx_dir_reads_but_does_not_convert_to_upstream(tmp_path, tiny_upstream):
    args, sd, up = tiny_upstream
    qargs = ModelArgs.from_dict({**args.to_dict(), "quantization": {"group_size": 8, "bits": 4}})
    w = ck.upstream_to_mlx(args, sd)
    k = "layers.0.mega.wv.weight"
    w[k] = torch.zeros(24, 2, dtype=torch.int32)            # packed stand-in: shape not checked
    w["layers.0.mega.wv.scales"] = torch.ones(24, 2)
    w["layers.0.mega.wv.biases"] = torch.zeros(24, 2)
    d = ck.write_mlx_dir(tmp_path / "q", qargs, w, up / "tokenizer.model")
    a, w2, _ = ck.read_mlx_dir(d)
    assert a.quantization == {"group_size": 8, "bits": 4} and torch.equal(w2[k], w[k])
    with pytest.raises(CheckpointError, match="quantized"):
        ck.load_upstream_state(d)
    w["layers.0.mega.wz.scales"] = torch.ones(8, 2)          # scales without biases are fine,
    w["layers.0.mega.bogus.scales"] = torch.ones(1)          # but not for a non-existent module
    with pytest.raises(CheckpointError, match="layers.0.mega.bogus.scales"):
        ck.validate_mlx_weights(qargs, w)
