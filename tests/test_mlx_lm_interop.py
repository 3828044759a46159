"""mlx-lm's own tooling drives our Model (the contract of mlx_lm/models/*.py: `Model(inputs,
cache=None)`, `make_cache()`, `layers`, caches with `state` / `offset`): its generation loop, its
prompt caches, its LoRA conversion, its quantization and its loader, each checked against our own
path; and mlx_lm_compat's directories, which mlx-lm's own load() and CLIs open."""
import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("mlx_lm")
from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.models import cache as lm_cache  # noqa: E402
from mlx_lm.sample_utils import make_sampler  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import quantize_model  # noqa: E402

from mlx_megalodon import load  # noqa: E402
from mlx_megalodon.cache import MegalodonCache, TimestepNormCache  # noqa: E402
from mlx_megalodon.generate import stream_generate  # noqa: E402
from mlx_megalodon.quantize import quantize_model as our_quantize_model  # noqa: E402

PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def default_model():
    return load("mlx_megalodon/default_model")


def greedy_with_mlx_lm(model, ids, n, **kwargs):
    prompt = mx.array(ids, dtype=mx.int32)
    return [int(t) for t, _ in generate_step(prompt, model, max_tokens=n, sampler=make_sampler(0.0), **kwargs)]


def test_prompt_cache_is_the_models_own(default_model):
    model, _ = default_model
    caches = lm_cache.make_prompt_cache(model)
    assert len(caches) == len(model.layers) + 1
    assert all(type(c) is MegalodonCache for c in caches[:-1]) and type(caches[-1]) is TimestepNormCache


@pytest.mark.parametrize("prefill_step_size", [3, 2048])
def test_mlx_lm_generate_step_gives_our_greedy_tokens(default_model, prefill_step_size):
    """mlx-lm prefills in pieces of prefill_step_size and then decodes one token at a time through
    our caches; greedy decoding must give exactly the tokens of our own generator."""
    model, tok = default_model
    ids = list(tok.encode(PROMPT))
    ours = [r.token for r in stream_generate(model, tok, ids, max_tokens=24)]
    theirs = greedy_with_mlx_lm(model, ids, 24, prefill_step_size=prefill_step_size)
    assert theirs == ours


def test_mlx_lm_lora_layers_train_only_the_adapters():
    model, tok = load("mlx_megalodon/default_model")  # a fresh copy: this test changes the model
    model.freeze()
    keys = ["mega.wz", "mega.wv", "nffn.fc1"]
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": keys})
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.split(".")[-1] in ("lora_a", "lora_b") for k in names)
    assert {".".join(k.split(".")[2:4]) for k in names} == set(keys)
    assert {int(k.split(".")[1]) for k in names} == {len(model.layers) - 2, len(model.layers) - 1}

    x = mx.array([tok.encode("def add(a, b):\n    return a + b\n")])

    def loss(m):
        return nn.losses.cross_entropy(m(x[:, :-1]), x[:, 1:]).mean()

    import mlx.optimizers as optim
    opt = optim.Adam(learning_rate=1e-4)
    step = nn.value_and_grad(model, loss)
    first, _ = step(model)
    for _ in range(5):
        value, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    assert float(loss(model)) < float(first) - 1e-3


def test_mlx_lm_quantize_model_matches_ours(default_model):
    """mlx-lm's quantization converts our linear layers and embedding, leaves the CEMA / norm
    parameters in float32, and gives the same logits as our own quantize_model at the same
    bits and group size; both stay near the unquantized model."""
    model, tok = default_model
    ids = mx.array([tok.encode(PROMPT)])
    ref = np.array(model(ids))
    theirs, _ = load("mlx_megalodon/default_model")
    theirs, config = quantize_model(theirs, {}, group_size=64, bits=8)
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert isinstance(theirs.layers[0].mega.wz, nn.QuantizedLinear)
    params = dict(tree_flatten(theirs.parameters()))
    cema = [k for k in params if ".cema." in k]
    assert cema and all(params[k].dtype == mx.float32 for k in cema)
    ours, _ = load("mlx_megalodon/default_model")
    our_quantize_model(ours, bits=8, group_size=64)
    got = np.array(theirs(ids))
    assert np.array_equal(got, np.array(ours(ids)))
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()
    assert greedy_with_mlx_lm(theirs, list(tok.encode(PROMPT)), 8) == \
        [r.token for r in stream_generate(ours, tok, list(tok.encode(PROMPT)), max_tokens=8)]


@pytest.mark.parametrize("quantized", [False, True])
def test_mlx_lm_load_model_reads_our_directories(default_model, tmp_path, quantized):
    """mlx-lm's loader, given our classes (`get_model_classes`), builds the same model from one of
    our MLX directories (config.json + model.safetensors), also a quantized one: its config's
    `quantization` entry is the one mlx-lm reads."""
    from pathlib import Path

    from mlx_lm.utils import load_model

    from mlx_megalodon.config import ModelArgs
    from mlx_megalodon.mega import Model
    from mlx_megalodon.quantize import quantize_directory
    src = Path("mlx_megalodon/default_model")
    if quantized:
        src = quantize_directory(src, tmp_path / "q8", bits=8, group_size=64)
    theirs, config = load_model(src, get_model_classes=lambda config: (Model, ModelArgs))
    ours, tok = load(str(src))
    assert config["model_type"] == "megalodon"
    assert isinstance(theirs.layers[0].mega.wz, nn.QuantizedLinear) == quantized
    ids = mx.array([tok.encode(PROMPT)])
    assert np.array_equal(np.array(theirs(ids)), np.array(ours(ids)))


# ------------------------------------------------------------------------------------------------
# mlx_lm_compat: directories that mlx-lm's own load() and CLIs open (trust_remote_code)

def test_mlx_lm_loadable_directory_generates_our_tokens(default_model, tmp_path):
    import mlx_lm

    from mlx_megalodon.mlx_lm_compat import MODEL_FILE, make_mlx_lm_loadable
    dst = make_mlx_lm_loadable("mlx_megalodon/default_model", tmp_path / "for_mlx_lm")
    assert (dst / MODEL_FILE).is_file() and (dst / "tokenizer_config.json").is_file()
    assert json.loads((dst / "config.json").read_text())["model_file"] == MODEL_FILE
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(dst))                      # mlx-lm runs the model file only when asked to
    theirs, their_tok = mlx_lm.load(str(dst), trust_remote_code=True)
    model, tok = default_model
    ids = list(tok.encode(PROMPT))
    assert list(their_tok.encode(PROMPT)) == ids
    assert greedy_with_mlx_lm(theirs, ids, 16) == [r.token for r in stream_generate(model, tok, ids, max_tokens=16)]
    ours_again, _ = load(str(dst))                 # our loader ignores the extra files and key
    x = mx.array([ids])
    assert np.array_equal(np.array(ours_again(x)), np.array(model(x)))


def test_mlx_lm_loadable_refuses_a_unigram_tokenizer(tmp_path):
    import sentencepiece as spm

    from mlx_megalodon.mlx_lm_compat import CompatError, make_mlx_lm_loadable
    src = tmp_path / "src"
    shutil.copytree("mlx_megalodon/default_model", src)
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"line {i} of some text with words {i * 7 % 13}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "uni"), vocab_size=40,
                                   model_type="unigram", minloglevel=2)
    shutil.copyfile(tmp_path / "uni.model", src / "tokenizer.model")
    with pytest.raises(CompatError, match="UNIGRAM"):
        make_mlx_lm_loadable(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_mlx_lm_loadable_writes_nothing_when_the_check_fails(tmp_path, monkeypatch):
    """A tokenizer setting that transformers reproduces differently (a prefix space our model does
    not add) is caught by the check, and no directory (final or temporary) is left behind."""
    from mlx_megalodon import mlx_lm_compat as C
    real = C.hf_tokenizer_config
    monkeypatch.setattr(C, "hf_tokenizer_config", lambda path: {**real(path), "add_prefix_space": True})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(C.CompatError, match="tokenizes"):
        C.make_mlx_lm_loadable("mlx_megalodon/default_model", out / "dst")
    assert list(out.iterdir()) == []


def test_convert_cli_mlx_lm(tmp_path, capsys):
    import mlx_lm

    from mlx_megalodon.checkpoint import main
    dst = tmp_path / "q8"
    assert main(["mlx_megalodon/default_model", str(dst), "--mlx-lm", "-q", "--q-bits", "8"]) == 0
    model, _ = mlx_lm.load(str(dst), trust_remote_code=True)
    assert isinstance(model.layers[0].mega.wz, nn.QuantizedLinear)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]      # no staging directories left
    capsys.readouterr()
    assert main(["mlx_megalodon/default_model", str(dst), "--mlx-lm"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err
    assert main(["mlx_megalodon/default_model", str(tmp_path / "up"), "--mlx-lm", "--to", "upstream"]) == 1
    assert "MLX directories only" in capsys.readouterr().err
    from mlx_megalodon.mlx_lm_compat import main as compat_main
    assert compat_main([str(tmp_path / "q8" / "config.json"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an MLX model directory" in err and not (tmp_path / "x").exists()
