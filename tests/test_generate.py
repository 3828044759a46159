"""Generation: constant memory over long streams, prompt caches, quantized models, CLI errors."""
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from factory import make_upstream_dir, random_upstream_state_dict, tiny_args
from mlx_megalodon.checkpoint import convert
from mlx_megalodon.generate import (PromptCacheError, generate, load_prompt_cache, make_sampler,
                                    parse_context_length, prefill, save_prompt_cache, stream_generate)
from mlx_megalodon.quantize import quantize_directory
from mlx_megalodon.utils import load

ROOT = Path(__file__).resolve().parent.parent
# Dimensions divisible by 32 so every linear/embedding layer can be quantized with group size 32.
GEN_ARGS = dict(model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=96, cema_ndim=4,
                chunk_size=64, norm_num_groups=4)


def make_model_dir(root: Path, name="model", seed=0, **overrides) -> Path:
    args = tiny_args(**{**GEN_ARGS, **overrides})
    up = make_upstream_dir(root / f"{name}-upstream", args, random_upstream_state_dict(args, seed=seed))
    dst = root / name
    convert(up, dst)
    return dst


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("gen"))


def run_cli(*argv, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *argv], capture_output=True,
                          text=True, input=stdin, cwd=ROOT, timeout=120)


def test_parse_context_length():
    assert parse_context_length("1M") == 1_000_000
    assert parse_context_length("256K") == 256_000
    assert parse_context_length("1000000") == 1_000_000
    assert parse_context_length("1.5k") == 1500
    for bad in ("", "abc", "-5", "0", "1T", "1MM"):
        with pytest.raises(ValueError):
            parse_context_length(bad)


def test_memory_is_constant_over_100k_tokens(model_dir):
    model, _ = load(model_dir)
    rng = np.random.default_rng(0)
    step = 1024

    def peak_after(n_tokens):
        cache = model.make_cache()
        prefill(model, mx.array(rng.integers(0, 64, size=1024), dtype=mx.int32), cache, step)  # warm-up
        mx.reset_peak_memory()
        for _ in range(n_tokens // step - 1):
            prefill(model, mx.array(rng.integers(0, 64, size=step), dtype=mx.int32), cache, step)
        y = mx.array([[3]])
        for _ in range(8):
            y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[:, None]
            mx.eval(y)
        assert cache[-1].offset == n_tokens + 8
        return mx.get_peak_memory()

    short, long = peak_after(4096), peak_after(102_400)
    assert long <= 1.10 * short, f"peak at 100K tokens {long} vs {short} at 4K"


def test_prompt_cache_mid_document_gives_same_logits(model_dir, tmp_path):
    model, tok = load(model_dir)
    doc = np.random.default_rng(1).integers(0, 64, size=150)
    cache = model.make_cache()
    prefill(model, mx.array(doc[:100], dtype=mx.int32), cache, 64)
    reference = prefill(model, mx.array(doc[100:], dtype=mx.int32), cache, 64)

    first = model.make_cache()
    logits = prefill(model, mx.array(doc[:100], dtype=mx.int32), first, 64)
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(path, first, model, tok, logits)
    model2, tok2 = load(model_dir)
    restored, saved_logits, n = load_prompt_cache(path, model2, tok2)
    assert n == 100
    assert np.allclose(np.array(saved_logits), np.array(logits))
    resumed = prefill(model2, mx.array(doc[100:], dtype=mx.int32), restored, 64)
    assert np.abs(np.array(resumed) - np.array(reference)).max() < 1e-5


def test_prompt_cache_of_another_model_is_refused(model_dir, tmp_path):
    model, tok = load(model_dir)
    cache = model.make_cache()
    logits = prefill(model, mx.array([1, 2, 3], dtype=mx.int32), cache, 64)
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, cache, model, tok, logits)
    other, other_tok = load(make_model_dir(tmp_path, "other", seed=5))
    with pytest.raises(PromptCacheError, match="different model"):
        load_prompt_cache(path, other, other_tok)


@pytest.mark.parametrize("bits,bound", [(8, 0.05), (4, 0.5)])
def test_quantized_models_stay_close_and_generate(model_dir, tmp_path, bits, bound):
    """Bound: max |logit difference| relative to the float logits' range (8-bit 5%, 4-bit 50%)."""
    qdir = quantize_directory(model_dir, tmp_path / f"q{bits}", bits=bits, group_size=32)
    model, tok = load(model_dir)
    qmodel, _ = load(qdir)
    assert qmodel.args.quantization == {"group_size": 32, "bits": bits}
    toks = mx.array(np.random.default_rng(2).integers(0, 64, size=(1, 40)))
    ref, got = np.array(model(toks)), np.array(qmodel(toks))
    rel = np.abs(got - ref).max() / (ref.max() - ref.min())
    assert rel < bound, rel
    assert "QuantizedLinear" in str(type(qmodel.layers[0].mega.wz))
    text = generate(qmodel, tok, "hello world", max_tokens=5)
    assert isinstance(text, str)
    assert (qdir / "model.safetensors").stat().st_size < (model_dir / "model.safetensors").stat().st_size


def test_greedy_generation_matches_torch_ref(model_dir):
    import torch
    from torch_ref import load as load_ref
    model, tok = load(model_dir)
    ref, _ = load_ref(model_dir)
    prompt = tok.encode("the quick brown fox")
    got = [r.token for r in stream_generate(model, tok, prompt, max_tokens=20, sampler=make_sampler(0.0))
           if r.finish_reason != "stop"]
    cache = ref.make_cache()
    with torch.no_grad():
        logits = ref(torch.tensor([prompt]), cache=cache)[:, -1]
        want = []
        for _ in range(len(got)):
            t = int(logits.argmax(-1))
            want.append(t)
            logits = ref(torch.tensor([[t]]), cache=cache)[:, -1]
    assert got == want


def test_max_context_is_enforced(model_dir):
    model, tok = load(model_dir)
    out = list(stream_generate(model, tok, [1] * 10, max_tokens=100, max_context=15))
    assert len(out) <= 5
    with pytest.raises(ValueError, match="max-context"):
        list(stream_generate(model, tok, [1] * 20, max_tokens=5, max_context=15))


def test_sampler_options():
    logits = mx.array([[0.0, 1.0, 5.0, 2.0]])
    assert make_sampler(0.0)(logits).item() == 2
    mx.random.seed(0)
    picks = {make_sampler(1.0, top_k=1)(logits).item() for _ in range(20)}
    assert picks == {2}
    picks = {make_sampler(1.0, top_p=0.5)(logits).item() for _ in range(20)}
    assert picks == {2}
    picks = {make_sampler(5.0, min_p=0.5)(logits).item() for _ in range(50)}
    assert picks <= {2, 3}


def test_cli_generates_and_reports(model_dir, tmp_path):
    r = run_cli("--model", str(model_dir), "--prompt", "hello", "--max-tokens", "8", "--max-context", "1M")
    assert r.returncode == 0, r.stderr
    assert "Prompt:" in r.stdout and "Generation:" in r.stdout and "Peak memory:" in r.stdout
    cache = tmp_path / "p.safetensors"
    r = run_cli("--model", str(model_dir), "--prompt", "a long document", "--save-cache", str(cache),
                "--max-tokens", "3")
    assert r.returncode == 0 and cache.exists(), r.stderr
    r = run_cli("--model", str(model_dir), "--load-cache", str(cache), "--prompt", "question",
                "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    r = run_cli("--model", str(model_dir), "--prompt", "-", "--max-tokens", "2", stdin="from stdin")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--max-context", "12Q"], "invalid context length"),
    (["--max-context", "0"], "invalid context length"),
    (["--temp", "-1"], "temp"),
    (["--top-p", "0"], "top_p"),
    (["--prefill-step-size", "0"], "positive integer"),
    (["--max-tokens", "abc"], "invalid int"),
    (["--prompt", ""], "prompt is empty"),
    (["--prompt-file", "/nonexistent/prompt.txt"], "prompt.txt"),
    (["--prompt", "one two three four five six seven", "--max-context", "3"], "max-context"),
    (["--load-cache", "/nonexistent/cache.safetensors", "--prompt", "x"], "cache.safetensors"),
])
def test_cli_bad_input_is_one_line_error(model_dir, argv, needle):
    if "--prompt" not in argv and "--prompt-file" not in argv:
        argv = argv + ["--prompt", "hi"]
    r = run_cli("--model", str(model_dir), *argv)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_cli_missing_model_is_one_line_error(tmp_path):
    r = run_cli("--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0], r.stderr


def test_convert_cli_quantizes(tmp_path):
    args = tiny_args(**GEN_ARGS)
    up = make_upstream_dir(tmp_path / "up", args, random_upstream_state_dict(args))
    dst = tmp_path / "q8"
    r = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(up), str(dst), "-q", "--q-bits", "8",
                        "--q-group-size", "32"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    model, _ = load(dst)
    assert model.args.quantization == {"group_size": 32, "bits": 8}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())   # no staging left behind
    for flags, needle in ((["--q-bits", "7"], "--q-bits"), (["--q-group-size", "48"], "--q-group-size")):
        bad = tmp_path / "bad"
        r = subprocess.run([sys.executable, str(ROOT / "convert.py"), str(up), str(bad), "-q", *flags],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and needle in lines[0], r.stderr
        assert not bad.exists()
