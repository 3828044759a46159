"""LoRA / DoRA / full fine-tuning, fusing, adapters in generation, data errors (CPU, tiny models)."""
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from factory import make_upstream_dir, random_upstream_state_dict, tiny_args
from mlx_megalodon.checkpoint import convert
from mlx_megalodon.fuse import fuse
from mlx_megalodon.fuse import main as fuse_main
from mlx_megalodon.generate import generate
from mlx_megalodon.generate import main as generate_main
from mlx_megalodon.lora import (ADAPTER_FILE, AdapterError, DoRALinear, LoRALinear, enable_grad_checkpoint,
                                evaluate, load_adapter_weights, load_adapters, load_jsonl, main,
                                make_batch, masked_loss, prepare_model, resolve_options, run,
                                save_adapter_config, save_adapters)
from mlx_megalodon.quantize import quantize_directory
from mlx_megalodon.utils import load

ROOT = Path(__file__).resolve().parent.parent
# Dimensions divisible by 32 (quantizable with group size 32); chunk 16 so examples span chunks.
ARGS = dict(model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=96, cema_ndim=4,
            chunk_size=16, norm_num_groups=4)
PATTERN = "the quick brown fox"
TOKS = mx.array(np.random.default_rng(2).integers(3, 64, size=(2, 40)), dtype=mx.int32)


def write_jsonl(path: Path, rows, raw_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    args = tiny_args(**ARGS)
    up = make_upstream_dir(root / "upstream", args, random_upstream_state_dict(args, seed=0))
    convert(up, root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A toy task: continue a fixed pattern (repeated 2-4 times per line)."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join([PATTERN] * int(rng.integers(2, 5)))} for _ in range(40)]
    write_jsonl(d / "train.jsonl", rows[:32])
    write_jsonl(d / "valid.jsonl", rows[32:])
    write_jsonl(d / "test.jsonl", rows[32:])
    return d


def options(model_dir, data_dir, adapter_path, *extra):
    return resolve_options(["--model", str(model_dir), "--data", str(data_dir), "--adapter-path", str(adapter_path),
                            "--train", "--learning-rate", "1e-3", "--steps-per-report", "10",
                            "--steps-per-eval", "10", "--num-layers", "-1", *extra])


@pytest.fixture(scope="module")
def trained(model_dir, data_dir, tmp_path_factory):
    """LoRA trained for 30 iterations, snapshots every 20; returns (adapter dir, history, report lines)."""
    ad = tmp_path_factory.mktemp("run") / "adapters"
    lines = []
    history = run(options(model_dir, data_dir, ad, "--iters", "30", "--save-every", "20", "--test"), lines.append)
    return ad, history, lines


def randomize_adapters(model, seed=1, scale=0.05):
    """Make fresh adapters non-trivial (B != 0, DoRA magnitudes off the base norms)."""
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * scale
            if isinstance(m, DoRALinear):
                m.m = m.m * (1.0 + 0.1 * mx.random.normal(m.m.shape))
    mx.eval(model.parameters())


def write_random_adapters(model_dir, dst: Path, fine_tune_type: str, num_layers=-1, **lora):
    model, _ = load(model_dir)
    n, params = prepare_model(model, fine_tune_type, num_layers, {"rank": 4, **lora})
    randomize_adapters(model)
    dst.mkdir(parents=True)
    save_adapters(model, dst / ADAPTER_FILE)
    save_adapter_config({"fine_tune_type": fine_tune_type, "num_layers": n, "lora_parameters": params}, dst)
    return dst


# ------------------------------------------------------------------------------------- training
def test_lora_lowers_validation_loss_and_reports(trained):
    ad, history, lines = trained
    val = dict(history["val"])
    assert val[0] > 2.0 and val[30] < 0.5 * val[0], history["val"]
    train_losses = [loss for _, loss in history["train"]]
    assert train_losses[-1] < train_losses[0]
    assert history["test"] == pytest.approx(val[30], rel=1e-4)      # test set == valid set here
    report = [ln for ln in lines if ln.startswith("Iter 10: Train loss")]
    assert report and all(k in report[0] for k in ("Learning Rate", "It/sec", "Tokens/sec", "Peak mem", "GB"))
    assert any(ln.startswith("Trainable parameters:") for ln in lines)
    assert any(ln.startswith("Test loss") and "Test ppl" in ln for ln in lines)


def test_saved_files_exist_and_load(trained, model_dir, data_dir):
    ad, history, _ = trained
    assert {p.name for p in ad.iterdir()} == {ADAPTER_FILE, "adapter_config.json", "0000020_adapters.safetensors"}
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["lora_parameters"]["rank"] == 8 and cfg["lora_parameters"]["scale"] == 20.0
    assert "mega.wz" in cfg["lora_parameters"]["keys"] and "nffn.fc3" not in cfg["lora_parameters"]["keys"]
    assert cfg["learning_rate"] == 1e-3 and cfg["iters"] == 30            # the flags are recorded
    weights = mx.load(str(ad / ADAPTER_FILE))
    assert "layers.1.mega.wz.lora_a" in weights and "layers.0.nffn.fc2.lora_b" in weights
    assert all(".lora_" in k for k in weights)
    model, tok = load(model_dir)
    load_adapters(model, ad)
    valid = load_jsonl(data_dir / "valid.jsonl", tok)
    assert evaluate(model, valid, 4) == pytest.approx(dict(history["val"])[30], abs=1e-5)
    # the snapshot is the state after 20 iterations: it loads into the same adapters
    load_adapter_weights(model, ad / "0000020_adapters.safetensors")
    assert evaluate(model, valid, 4) == pytest.approx(dict(history["val"])[20], abs=1e-5)


def test_resume_adapter_file_continues(trained, model_dir, data_dir, tmp_path):
    ad, first, _ = trained
    lines = []
    second = run(options(model_dir, data_dir, tmp_path / "more", "--iters", "10", "--learning-rate", "1e-4",
                         "--resume-adapter-file", str(ad / ADAPTER_FILE)), lines.append)
    val = dict(second["val"])
    assert val[0] == pytest.approx(dict(first["val"])[30], abs=1e-5)     # starts where the first run ended
    assert val[10] < val[0]                                              # and keeps improving
    assert any("Loading fine-tuned weights" in ln for ln in lines)
    with pytest.raises(AdapterError, match="0000020_adapters.safetensors"):    # LoRA file into a DoRA run
        run(options(model_dir, data_dir, tmp_path / "dora", "--iters", "1", "--fine-tune-type", "dora",
                    "--resume-adapter-file", str(ad / "0000020_adapters.safetensors")), lambda s: None)


@pytest.mark.parametrize("fine_tune_type", ["dora", "full"])
def test_dora_and_full_fine_tuning_train(model_dir, data_dir, tmp_path, fine_tune_type):
    ad = tmp_path / "ad"
    history = run(options(model_dir, data_dir, ad, "--iters", "10", "--fine-tune-type", fine_tune_type,
                          "--num-layers", "1", "--grad-checkpoint"), lambda s: None)
    val = dict(history["val"])
    assert val[10] < val[0]
    weights = mx.load(str(ad / ADAPTER_FILE))
    assert all(k.startswith("layers.1.") for k in weights)
    if fine_tune_type == "dora":
        assert "layers.1.mega.wz.m" in weights
    else:
        assert "layers.1.mega.wz.weight" in weights and "layers.1.mega.cema.alpha" in weights
        assert not any("prior_" in k for k in weights)            # TimestepNorm buffers stay frozen
    model, tok = load(model_dir)
    load_adapters(model, ad)
    assert evaluate(model, load_jsonl(data_dir / "valid.jsonl", tok), 4) == pytest.approx(val[10], abs=1e-5)


def test_grad_checkpoint_gives_the_same_gradients(model_dir):
    model, _ = load(model_dir)
    prepare_model(model, "lora", -1, {"rank": 4})
    randomize_adapters(model)
    model.train()
    x, y = TOKS[:, :-1], TOKS[:, 1:]
    mask = mx.ones(y.shape)
    grad_fn = nn.value_and_grad(model, masked_loss)
    (l1, _), g1 = grad_fn(model, x, y, mask)
    enable_grad_checkpoint(model)
    (l2, _), g2 = grad_fn(model, x, y, mask)
    enable_grad_checkpoint(model, False)
    assert abs(l1.item() - l2.item()) < 1e-6
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert np.allclose(np.array(a), np.array(b), atol=1e-6), k


# ------------------------------------------------------------------------------------- fusing
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_fused_model_equals_base_plus_adapter(model_dir, tmp_path, fine_tune_type):
    ad = write_random_adapters(model_dir, tmp_path / "ad", fine_tune_type)
    base, _ = load(model_dir)
    base_logits = np.array(base(TOKS))
    adapted, _ = load(model_dir)
    load_adapters(adapted, ad)
    want = np.array(adapted(TOKS))
    assert np.abs(want - base_logits).max() > 1e-2                     # the adapter is not trivial
    dst = fuse(model_dir, ad, tmp_path / "fused")
    fused, tok = load(dst)
    assert isinstance(fused.layers[0].mega.wz, nn.Linear)             # a plain layer again, no adapter
    assert set(dict(tree_flatten(fused.parameters()))) == set(dict(tree_flatten(base.parameters())))
    got = np.array(fused(TOKS))
    assert np.abs(got - want).max() < 1e-5
    assert tok.encode("hello") == load(model_dir)[1].encode("hello")


def test_qlora_fuse_requantizes_or_dequantizes(model_dir, tmp_path, capsys):
    qdir = quantize_directory(model_dir, tmp_path / "q4", bits=4, group_size=32)
    ad = write_random_adapters(qdir, tmp_path / "ad", "lora")
    adapted, _ = load(qdir)
    load_adapters(adapted, ad)
    assert isinstance(adapted.layers[0].mega.wz.linear, nn.QuantizedLinear)
    want = np.array(adapted(TOKS))

    assert fuse_main(["--model", str(qdir), "--adapter-path", str(ad), "--save-path", str(tmp_path / "deq"),
                      "--de-quantize"]) == 0
    deq, _ = load(tmp_path / "deq")
    assert deq.args.quantization is None and isinstance(deq.layers[0].mega.wz, nn.Linear)
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    assert np.abs(np.array(deq(TOKS)) - want).max() < 1e-4

    assert fuse_main(["--model", str(qdir), "--adapter-path", str(ad), "--save-path", str(tmp_path / "req")]) == 0
    req, _ = load(tmp_path / "req")
    assert req.args.quantization == {"group_size": 32, "bits": 4}
    assert isinstance(req.layers[0].mega.wz, nn.QuantizedLinear)
    rel = np.abs(np.array(req(TOKS)) - want).max() / (want.max() - want.min())
    assert rel < 0.5, rel                                     # 4-bit re-quantization error only
    assert fuse_main(["--model", str(qdir), "--adapter-path", str(ad), "--save-path", str(tmp_path / "req")]) == 1
    assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- data and masks
def test_mask_prompt_counts_only_completion_and_assistant_tokens(model_dir, tmp_path):
    _, tok = load(model_dir)
    f = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hello world", "completion": "the quick brown fox"}])
    p_len = len(tok.encode("hello world", bos=True))
    c_len = len(tok.encode("the quick brown fox", bos=False, eos=True))
    ex = load_jsonl(f, tok, mask_prompt=True)
    assert ex.kind == "completions" and len(ex.examples[0].tokens) == p_len + c_len
    _, targets, full = make_batch(ex.examples, 2048, mask_prompt=False)
    _, _, masked = make_batch(ex.examples, 2048, mask_prompt=True)
    full, masked = np.array(full)[0], np.array(masked)[0]
    assert full.sum() == p_len + c_len - 1
    # target j is token j+1: the completion starts at token p_len, i.e. target p_len-1
    assert masked.tolist() == [0.0] * (p_len - 1) + [1.0] * c_len
    assert np.array(targets)[0, -1] == tok.eos_id

    model, _ = load(model_dir)
    x, y, _ = make_batch(ex.examples, 2048)
    assert masked_loss(model, x, y, mx.array(full[None]))[0].item() != \
        pytest.approx(masked_loss(model, x, y, mx.array(masked[None]))[0].item(), abs=1e-4)

    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "the fox"}, {"role": "user", "content": "more"},
        {"role": "assistant", "content": "brown fox"}]}])
    e = load_jsonl(chat, tok, mask_prompt=True).examples[0]
    counted = [t for t, c in zip(e.tokens, e.counts) if c]
    want = tok.encode("the fox\n", bos=False, eos=True) + tok.encode("brown fox\n", bos=False, eos=True)
    assert counted == want
    # rendered as "<role>: <content>\n" lines, each message tokenized on its own, EOS after assistant turns
    lines = [("system", "be brief"), ("user", "hello"), ("assistant", "the fox"), ("user", "more"),
             ("assistant", "brown fox")]
    rendered = []
    for i, (role, content) in enumerate(lines):
        rendered += tok.encode(f"{role}:", bos=i == 0) + tok.encode(f"{content}\n", bos=False, eos=role == "assistant")
    assert e.tokens == rendered


def test_long_examples_are_truncated_with_a_warning(model_dir, tmp_path):
    _, tok = load(model_dir)
    ds = load_jsonl(write_jsonl(tmp_path / "t.jsonl", [{"text": PATTERN * 20}, {"text": "hi"}]), tok)
    warnings = []
    x, y, m = make_batch(ds.examples, 16, warn=warnings.append)
    assert x.shape == (2, 15) and len(warnings) == 1 and "truncated to 16" in warnings[0]
    assert np.array(m)[1].sum() == len(ds.examples[1].tokens) - 1        # padding is masked
    assert np.array(x)[1, len(ds.examples[1].tokens):].tolist() == [0] * (15 - len(ds.examples[1].tokens))


@pytest.mark.parametrize("setup,needle", [
    ("empty", "train.jsonl: no examples"),
    ("malformed", "train.jsonl:3: malformed JSON"),
    ("missing", "train.jsonl: not found"),
    ("wrong_type", "train.jsonl:2: 'text' must be a string"),
    ("unknown", "train.jsonl:1: expected a JSON object"),
    ("few", "fewer than --batch-size 4"),
    ("mask_text", "train.jsonl:1: --mask-prompt needs prompt/completion or chat examples"),
])
def test_bad_data_is_a_one_line_error(model_dir, data_dir, tmp_path, capsys, setup, needle):
    d = tmp_path / "data"
    d.mkdir()
    (d / "valid.jsonl").write_text((data_dir / "valid.jsonl").read_text())
    good = [{"text": PATTERN}] * 4
    if setup == "empty":
        (d / "train.jsonl").write_text("\n  \n")
    elif setup == "malformed":
        write_jsonl(d / "train.jsonl", good[:2], ['{"text": "unterminated'])
        needle += " (Unterminated string starting at, column 10)"
    elif setup == "wrong_type":
        write_jsonl(d / "train.jsonl", [good[0], {"text": 5}])
    elif setup == "unknown":
        write_jsonl(d / "train.jsonl", [{"foo": "bar"}])
    elif setup == "few":
        write_jsonl(d / "train.jsonl", good[:2])
    elif setup == "mask_text":
        write_jsonl(d / "train.jsonl", good)
    rc = main(["--model", str(model_dir), "--data", str(d), "--train", "--iters", "1",
               "--adapter-path", str(tmp_path / "ad")] + (["--mask-prompt"] if setup == "mask_text" else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert str(d) in err[0]


def test_cli_trains_from_a_yaml_config(model_dir, data_dir, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain: true\ndata: {data_dir}\niters: 2\nbatch_size: 2\n"
                   f"steps_per_report: 1\nlora_parameters:\n  rank: 2\n  scale: 10.0\n  dropout: 0.1\n"
                   f"  keys: [mega.wv, nffn.fc1]\n")
    ad = tmp_path / "ad"
    r = subprocess.run([sys.executable, "-m", "mlx_megalodon.lora", "-c", str(cfg), "--adapter-path", str(ad),
                        "--num-layers", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Iter 2: Train loss" in r.stdout and "Saved final weights" in r.stdout
    weights = mx.load(str(ad / ADAPTER_FILE))
    assert sorted(weights) == ["layers.1.mega.wv.lora_a", "layers.1.mega.wv.lora_b",
                               "layers.1.nffn.fc1.lora_a", "layers.1.nffn.fc1.lora_b"]
    assert weights["layers.1.mega.wv.lora_a"].shape == (64, 2)
    cfg_saved = json.loads((ad / "adapter_config.json").read_text())
    assert cfg_saved["lora_parameters"] == {"rank": 2, "scale": 10.0, "dropout": 0.1,
                                            "keys": ["mega.wv", "nffn.fc1"]}


# ------------------------------------------------------------------------------------- generation with adapters
def run_generate(*argv):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_generate_with_adapter_path_differs_from_base(trained, model_dir):
    ad = trained[0]
    tuned = run_generate("--model", str(model_dir), "--adapter-path", str(ad), "--prompt", "the quick",
                         "--max-tokens", "10")
    assert tuned.returncode == 0, tuned.stderr
    tuned_text = tuned.stdout.split("=" * 10)[0].rstrip("\n")
    model, tok = load(model_dir)
    base_text = generate(model, tok, "the quick", max_tokens=10)         # what generate.py prints without it
    assert tuned_text != base_text
    assert "brown fox" in tuned_text                                    # it learned the pattern
    load_adapters(model, ad)
    assert generate(model, tok, "the quick", max_tokens=10) == tuned_text


def test_bad_adapter_dir_is_an_error_naming_the_file(trained, model_dir, tmp_path, capsys):
    model, _ = load(model_dir)
    with pytest.raises(ValueError, match="nowhere"):
        load_adapters(model, tmp_path / "nowhere")
    d = tmp_path / "ad"
    d.mkdir()
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapters(model, d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_adapters(model, d)
    (d / "adapter_config.json").write_text((trained[0] / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="adapters.safetensors"):
        load_adapters(model, d)
    (d / ADAPTER_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="adapters.safetensors"):
        load_adapters(load(model_dir)[0], d)
    cfg = json.loads((trained[0] / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 4                         # weights of rank 8 do not fit
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / ADAPTER_FILE).write_bytes((trained[0] / ADAPTER_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"adapters.safetensors: weight .* has shape"):
        load_adapters(load(model_dir)[0], d)
    assert generate_main(["--model", str(model_dir), "--adapter-path", str(d), "--prompt", "hi"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "adapters.safetensors" in lines[0], lines


def test_perplexity_cli_applies_adapters(trained, model_dir, data_dir, tmp_path):
    """The streamed perplexity of the validation text falls with the trained adapters applied."""
    from mlx_megalodon.perplexity import main as perplexity_main
    ad = trained[0]
    base, tuned = tmp_path / "base.json", tmp_path / "tuned.json"
    data = str(data_dir / "valid.jsonl")
    assert perplexity_main(["--model", str(model_dir), "--data", data, "--json", str(base), "--quiet"]) == 0
    assert perplexity_main(["--model", str(model_dir), "--data", data, "--adapter-path", str(ad),
                            "--json", str(tuned), "--quiet"]) == 0
    base, tuned = json.loads(base.read_text()), json.loads(tuned.read_text())
    assert base["tokens"] == tuned["tokens"] and tuned["adapter_path"] == str(ad)
    assert tuned["ppl"] < 0.5 * base["ppl"], (base["ppl"], tuned["ppl"])



@pytest.mark.parametrize("fine_tune_type,extra", [("lora", ()), ("dora", ("--grad-checkpoint",)), ("full", ())])
def test_the_compiled_update_trains_as_the_eager_one(model_dir, data_dir, tmp_path, monkeypatch, fine_tune_type,
                                                     extra):
    """With one micro-batch per update and --compile on (a GPU backend's default) the whole update
    runs through mx.compile (--compile off: eagerly): the same losses and adapters either way; with
    gradient accumulation it stays eager."""
    compiled = []
    plain_compile = mx.compile

    def counting_compile(fun, *args, **kwargs):
        compiled.append(getattr(fun, "__name__", ""))
        return plain_compile(fun, *args, **kwargs)
    monkeypatch.setattr(mx, "compile", counting_compile)
    runs = {}
    for mode in ("compiled", "eager"):
        flags = ("--compile", "off" if mode == "eager" else "on")
        compiled.clear()
        runs[mode] = run(options(model_dir, data_dir, tmp_path / mode, "--iters", "10", "--num-layers", "1",
                                 "--fine-tune-type", fine_tune_type, *extra, *flags), lambda s: None)
        assert compiled.count("one_update") == (mode == "compiled"), compiled
    a, b = runs["compiled"], runs["eager"]
    assert [it for it, _ in a["train"]] == [it for it, _ in b["train"]] == [10]
    assert a["train"][0][1] == pytest.approx(b["train"][0][1], rel=1e-4)
    assert [v for _, v in a["val"]] == pytest.approx([v for _, v in b["val"]], rel=1e-4)
    assert a["val"][-1][1] < a["val"][0][1]
    wa, wb = mx.load(str(tmp_path / "compiled" / ADAPTER_FILE)), mx.load(str(tmp_path / "eager" / ADAPTER_FILE))
    assert wa.keys() == wb.keys()
    assert all(np.allclose(np.array(wa[k].astype(mx.float32)), np.array(wb[k].astype(mx.float32)), rtol=1e-3, atol=1e-5)
               for k in wa)
    if fine_tune_type == "lora":   # two micro-batches per update: eager, whatever the flag
        compiled.clear()
        run(options(model_dir, data_dir, tmp_path / "accum", "--iters", "2", "--num-layers", "1",
                    "--grad-accumulation-steps", "2", "--compile", "on"), lambda s: None)
        assert "one_update" not in compiled


def test_the_update_is_eager_on_the_cpu_backend_and_compiled_batches_pad_to_32(model_dir, data_dir, tmp_path,
                                                                             monkeypatch):
    """--compile auto: compiled on a GPU backend, eager on MLX's CPU backend (it was slower compiled
    on this CPU). A compiled update's training batches are padded to a multiple of COMPILED_PAD_TO
    (at most --max-seq-length); the padding is masked out. (gpu_backend is not patched here: kernel
    dispatch caches its answer.)"""
    from mlx_megalodon import kernels
    from mlx_megalodon.lora import COMPILED_PAD_TO, load_jsonl
    compiled = []
    plain_compile = mx.compile
    monkeypatch.setattr(mx, "compile", lambda fun, *a, **k: compiled.append(fun.__name__) or plain_compile(fun, *a, **k))
    run(options(model_dir, data_dir, tmp_path / "cpu", "--iters", "2", "--num-layers", "1"), lambda s: None)
    assert compiled.count("one_update") == (kernels.gpu_backend() is not None)
    run(options(model_dir, data_dir, tmp_path / "on", "--iters", "2", "--num-layers", "1", "--compile", "on"),
        lambda s: None)
    assert compiled.count("one_update") == 1
    cfg = tmp_path / "c.yaml"
    for text, want in (("compile: false\n", "off"), ("compile: true\n", "on"), ("compile: auto\n", "auto")):
        cfg.write_text(text)
        assert resolve_options(["--model", str(model_dir), "--train", "-c", str(cfg)])["compile"] == want
    cfg.write_text("compile: sometimes\n")
    with pytest.raises(ValueError, match="compile must be one of auto, on, off, got 'sometimes'"):
        resolve_options(["--model", str(model_dir), "--train", "-c", str(cfg)])
    _, tok = load(model_dir)
    examples = load_jsonl(data_dir / "train.jsonl", tok).examples[:3]
    longest = max(len(e.tokens) for e in examples)
    x, y, m = make_batch(examples, 2048)
    xp, yp, mp = make_batch(examples, 2048, pad_to=COMPILED_PAD_TO)
    assert x.shape[1] == longest - 1 and (xp.shape[1] + 1) % COMPILED_PAD_TO == 0 and xp.shape[1] >= x.shape[1]
    n = x.shape[1]
    assert np.array_equal(np.array(xp[:, :n]), np.array(x)) and np.array_equal(np.array(mp[:, :n]), np.array(m))
    assert float(mp[:, n:].sum()) == 0.0
    rounded = -(-longest // COMPILED_PAD_TO) * COMPILED_PAD_TO
    assert rounded > longest + 1                                       # (so the cap below bites)
    assert make_batch(examples, longest + 1, pad_to=COMPILED_PAD_TO)[0].shape[1] == longest   # capped
