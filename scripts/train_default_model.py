#!/usr/bin/env python3
"""Reproduce the package's default model end to end: a small Megalodon trained on the CPython
standard library's own ``.py`` source (every fresh machine has it).

    python3 scripts/train_default_model.py --out mlx_megalodon/default_model --time-budget-s 420
    python3 scripts/train_default_model.py --out /tmp/smoke --time-budget-s 60 --tiny    # CPU check

Steps, all inside ``--time-budget-s`` (wall time from the start of this script):

1. corpus: every ``*.py`` under ``sysconfig.get_paths()["stdlib"]`` (no site-packages), read as UTF-8,
   empty and undecodable files skipped; a file is held out for validation when the first 8 hex
   digits of sha1(its path relative to the stdlib) mod 1000 < ``--val-permille`` (deterministic);
2. a SentencePiece BPE tokenizer (vocab 8000, byte fallback) trained on the training files;
3. tokenization in batches on all cores, cached as .npz under ``--work-dir``;
4. training (mlx_megalodon.train: AdamW, warmup + cosine planned from the measured speed so the
   schedule ends when the budget does, bf16 compute, compiled step);
5. final validation over every held-out file, then ``--out`` gets config.json, the weights in
   bfloat16 (full-precision keys in float32), tokenizer.model, MODEL_CARD.md and loss.png.

``--max-file-mib N`` splits the weights into shards no larger than N MiB (model.safetensors.index.json;
``mlx_megalodon.load`` reads both layouts); ``--join-shards DIR`` turns such a directory back into a
single model.safetensors.
"""
from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
try:
    import mlx_megalodon  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT))

# The shipped model: ~11.9M parameters, 24.1 MB in bfloat16 with a shared embedding/output matrix.
DEFAULT_CONFIG = dict(num_layers=6, model_dim=384, z_dim=96, value_dim=576, num_heads=1, ffn_hidden_dim=768,
                      cema_ndim=16, chunk_size=256, norm_num_groups=16, share_emb=True)
TINY_CONFIG = dict(num_layers=2, model_dim=64, z_dim=32, value_dim=128, num_heads=1, ffn_hidden_dim=128,
                   cema_ndim=8, chunk_size=64, norm_num_groups=8, share_emb=True)
RECIPES = {
    # vocab, seq_len, batch, lr, warmup, file subsampling (keep 1 in N training files)
    "default": dict(vocab_size=8000, seq_len=1024, batch_size=32, learning_rate=1.5e-3, warmup=200, keep_every=1),
    "tiny": dict(vocab_size=1000, seq_len=128, batch_size=8, learning_rate=3e-3, warmup=20, keep_every=12),
}
WRITE_RESERVE_S = 4.0   # writing the model, card and plot after the final validation


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- corpus
def stdlib_files(root: Path):
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.relative_to(root).parts))


def is_validation(rel: str, permille: int) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 1000 < permille


def read_corpus(root: Path, permille: int, keep_every: int):
    train, valid, skipped = [], [], 0
    seen = {"train": 0, "valid": 0}
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped += 1
            continue
        if not text.strip():
            continue
        split = "valid" if is_validation(rel, permille) else "train"
        if seen[split] % keep_every == 0:
            (valid if split == "valid" else train).append((rel, text))
        seen[split] += 1
    return train, valid, skipped


def corpus_key(files, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for rel, text in files:
        h.update(rel.encode() + b"\0" + hashlib.sha1(text.encode()).digest())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- shards
def join_shards(directory: Path) -> None:
    import mlx.core as mx
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        sys.exit(f"{directory}: no model.safetensors.index.json")
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    weights = {}
    for n in names:
        weights.update(mx.load(str(directory / n)))
    tmp = directory / ".tmp-join.model.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "mlx"})
    os.replace(tmp, directory / "model.safetensors")
    index.unlink()
    for n in names:
        (directory / n).unlink()
    print(f"{directory}: joined {len(names)} shards into model.safetensors")


# ----------------------------------------------------------------------------- model card
def model_card(info: dict) -> str:
    c, r = info["config"], info["result"]
    cfg_json = json.dumps(c, indent=2)
    val = (f"{r['final_val_loss']:.4f} nats/token (perplexity **{r['final_val_ppl']:.2f}**) over "
           f"{r['final_val_tokens']:,} tokens of {info['n_valid_files']} held-out files") \
        if r["final_val_loss"] is not None else "n/a"
    last = info["last_train_loss"]
    return f"""# Megalodon default model ({info['params'] / 1e6:.1f}M parameters, Python source)

A small [Megalodon](https://arxiv.org/abs/2404.08801) language model trained from scratch on the
CPython {info['python']} standard library's own `.py` files. It is the model `mlx_megalodon` loads
when no `--model` is given: big enough to write plausible-looking Python, small enough to ship in the
package ({info['size_mb']:.1f} MB). It is a demo and test fixture, not a useful code model.

```python
from mlx_megalodon import load
from mlx_megalodon.generate import generate
model, tokenizer = load("mlx_megalodon/default_model")
print(generate(model, tokenizer, "def fibonacci(n):\\n", max_tokens=100))
```

## Data
- Source: every `*.py` file under `sysconfig.get_paths()["stdlib"]` of CPython {info['python']}
  (`{info['stdlib']}`), site-packages excluded; {info['n_skipped']} undecodable and the empty files skipped.
- Split (deterministic): a file is held out for validation when
  `int(sha1(relative_path).hexdigest()[:8], 16) % 1000 < {info['val_permille']}`:
  {info['n_train_files']} training files ({info['train_chars']:,} characters, {info['train_tokens']:,} tokens),
  {info['n_valid_files']} validation files ({info['valid_tokens']:,} tokens).
  {'Files subsampled: 1 in ' + str(info['keep_every']) + ' kept (--tiny).' if info['keep_every'] > 1 else ''}
- Each file is one document, `<s> text </s>`; documents are concatenated and cut into rows of
  {info['seq_len']} tokens (packed, no padding).

## Tokenizer
SentencePiece BPE, {info['vocab_size']} pieces, trained on the training files only: identity
normalization (text round-trips exactly), whitespace kept (runs of indentation are pieces), no dummy
prefix, digits split, byte fallback (any text encodes), unk 0, bos 1, eos 2, no pad.

## Model
`config.json`:
```json
{cfg_json}
```
{info['params']:,} parameters (embedding shared with the output layer). Weights stored in bfloat16
except CEMA, the norms and the Q/K affine (float32).

## Training recipe
- AdamW (β1 0.9, β2 0.95, ε 1e-8, weight decay 0.1 on matrices only), gradient clipping at 1.0.
- Learning rate {info['learning_rate']:g}: linear warmup over {info['warmup']} steps, cosine decay to
  10% at step {r['iters']} (the step count planned from the measured speed to fill the time budget).
- Batch {info['batch_size']} × {info['seq_len']} tokens = {info['batch_size'] * info['seq_len']:,} tokens per step;
  bfloat16 compute with float32 master weights; `mx.compile`d step: {info['compiled']}.
- Trained {r['step']:,} steps, {r['tokens']:,} tokens ({r['tokens'] / max(1, info['train_tokens']):.1f} epochs)
  in {r['train_s']:.0f} s at {r['tokens_per_sec']:,.0f} tokens/s; stopped: {r['stop_reason']}.
- Validation over the whole held-out set every {info['val_every']} steps; the shipped weights are those of
  {('step ' + format(r['best_step'], ',') + ' (best validation; later steps did worse)') if r['best_step'] else 'the last step'}.

## Results
- Final training loss (last step): {last:.4f}
- Validation: {val}

![loss curves](loss.png)

## Reproduce
Hardware: {info['hardware']}; MLX {info['mlx']}, Python {info['python']}, {info['date']}.
Total wall time {info['total_s']:.0f} s (budget {info['budget']:.0f} s).

```
{info['command']}
```
"""


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output MLX model directory (replaced)")
    p.add_argument("--time-budget-s", type=float, default=420.0, help="wall time for the whole script")
    p.add_argument("--tiny", action="store_true", help="tiny model, corpus subset: a CPU smoke test")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mlx_megalodon_default_model"),
                   help="tokenizer / token caches and checkpoints (not part of the output)")
    p.add_argument("--val-permille", type=int, default=30, help="files held out for validation, per mille")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--config-json", default=None,
                   help='JSON object of ModelArgs fields overriding the model config, e.g. \'{"num_layers": 4}\'')
    p.add_argument("--iters", type=int, default=None, help="fixed step count (default: planned from the budget)")
    p.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                   help="mx.compile the step (auto: on a GPU; the CPU build of a compiled step takes minutes)")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--max-file-mib", type=float, default=0, help="shard weights into files of at most this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--join-shards", metavar="DIR", help="only join DIR's weight shards into model.safetensors")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.join_shards:
        join_shards(Path(a.join_shards))
        return 0
    if not a.out:
        sys.exit("train_default_model.py: error: --out is required")
    import mlx.core as mx
    from mlx_megalodon.config import ModelArgs, parameter_count
    from mlx_megalodon.data import PackedDataset, TokenStream
    from mlx_megalodon.tokenizer import Tokenizer
    from mlx_megalodon.train import (TrainConfig, new_model, plot_losses, train, write_model_dir)
    from mlx_megalodon.train_tokenizer import train_tokenizer

    recipe = dict(RECIPES["tiny" if a.tiny else "default"])
    for k in ("batch_size", "seq_len", "learning_rate", "warmup", "vocab_size"):
        if getattr(a, k) is not None:
            recipe[k] = getattr(a, k)
    deadline = T_START + a.time_budget_s - WRITE_RESERVE_S
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    gpu = mx.default_device() == mx.gpu
    compiled = a.compile == "yes" or (a.compile == "auto" and gpu)
    log(f"MLX {mx.__version__} on {mx.default_device()}; Python {platform.python_version()}; work dir {work}")

    # 1. corpus
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_files, valid_files, skipped = read_corpus(stdlib, a.val_permille, recipe["keep_every"])
    train_chars = sum(len(t) for _, t in train_files)
    log(f"corpus {stdlib}: {len(train_files)} training files ({train_chars / 1e6:.1f}M chars), "
        f"{len(valid_files)} validation files, {skipped} undecodable skipped")

    # 2. tokenizer (cached by corpus + settings)
    key = corpus_key(train_files, f"tok-v1\0{recipe['vocab_size']}")
    tok_path = work / f"tokenizer-{key}.model"
    if not tok_path.is_file():
        train_tokenizer([t for _, t in train_files], recipe["vocab_size"], tok_path,
                        input_sentence_size=4_000_000)
        log(f"trained tokenizer ({recipe['vocab_size']} pieces) -> {tok_path}")
    else:
        log(f"tokenizer from cache {tok_path}")
    tokenizer = Tokenizer(tok_path)

    # 3. tokens (cached)
    streams = {}
    for name, files in (("train", train_files), ("valid", valid_files)):
        cache = work / f"tokens-{name}-{corpus_key(files, hashlib.sha1(tok_path.read_bytes()).hexdigest())}.npz"
        if cache.is_file():
            streams[name] = TokenStream.load(cache)
        else:
            streams[name] = TokenStream.from_texts(tokenizer, [t for _, t in files])
            streams[name].save(cache)
    log(f"tokens: {len(streams['train']):,} training, {len(streams['valid']):,} validation "
        f"({train_chars / len(streams['train']):.2f} chars/token)")

    # 4. model and training
    overrides = json.loads(a.config_json) if a.config_json else {}
    args = ModelArgs.from_dict({**(TINY_CONFIG if a.tiny else DEFAULT_CONFIG), **overrides,
                                "vocab_size": tokenizer.vocab_size})
    model = new_model(args, a.seed)
    n_params = parameter_count(args)
    cfg = TrainConfig(seq_len=recipe["seq_len"], batch_size=recipe["batch_size"], iters=a.iters,
                      learning_rate=recipe["learning_rate"], warmup=recipe["warmup"], min_lr_ratio=0.1,
                      beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0, compute_dtype="bfloat16",
                      grad_checkpoint=a.grad_checkpoint, compile=compiled, val_every=250 if not a.tiny else 50,
                      val_batches=0, keep_best=True, save_every=0, report_every=50 if not a.tiny else 10, seed=a.seed,
                      time_budget_s=a.time_budget_s)
    train_set = PackedDataset(streams["train"], cfg.seq_len)
    valid_set = PackedDataset(streams["valid"], cfg.seq_len)
    log(f"model: {n_params:,} parameters; batch {cfg.batch_size} x {cfg.seq_len}; compiled step: {compiled}; "
        f"training until {deadline - T_START:.0f}s")
    t_train = time.perf_counter()
    try:
        result = train(model, train_set, valid_set, cfg, deadline=deadline)
    except Exception as e:  # one shot on the device: fall back to the uncompiled step rather than lose the run
        if not cfg.compile or isinstance(e, (KeyboardInterrupt,)) or "loss became" in str(e):
            raise
        log(f"compiled training failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
            f"restarting without mx.compile")
        compiled = cfg.compile = False
        model = new_model(args, a.seed)
        result = train(model, train_set, valid_set, cfg, deadline=deadline)
    train_s = time.perf_counter() - t_train
    log(f"trained {result.step} steps, {result.tokens:,} tokens, {result.tokens_per_sec:,.0f} tokens/s "
        f"(median step); validation perplexity {result.final_val_ppl:.2f}")

    # 5. output
    out = Path(a.out)
    max_bytes = int(a.max_file_mib * 2 ** 20) if a.max_file_mib else None
    write_model_dir(model, tok_path, out, mx.bfloat16, max_bytes)
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    png = None if a.no_plot else plot_losses(result, out / "loss.png", f"Megalodon {n_params / 1e6:.1f}M on the "
                                                                         f"Python {platform.python_version()} stdlib")
    try:
        info_dev = mx.device_info()
        hardware = f"{info_dev.get('device_name', '?')} ({mx.default_device()})"
    except Exception:
        hardware = str(mx.default_device())
    info = dict(
        config=args.to_dict(), params=n_params, size_mb=size / 1e6, python=platform.python_version(),
        stdlib=str(stdlib), n_skipped=skipped, val_permille=a.val_permille, keep_every=recipe["keep_every"],
        n_train_files=len(train_files), n_valid_files=len(valid_files), train_chars=train_chars,
        train_tokens=len(streams["train"]), valid_tokens=len(streams["valid"]), seq_len=cfg.seq_len,
        vocab_size=tokenizer.vocab_size, learning_rate=cfg.learning_rate, warmup=cfg.warmup,
        batch_size=cfg.batch_size, compiled=compiled, val_every=cfg.val_every, hardware=hardware, mlx=mx.__version__,
        date=datetime.date.today().isoformat(), budget=a.time_budget_s,
        last_train_loss=result.train_losses[-1][1] if result.train_losses else float("nan"),
        command="python3 scripts/train_default_model.py " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:])),
        result=dict(step=result.step, iters=result.iters, tokens=result.tokens, stop_reason=result.stop_reason,
                    tokens_per_sec=result.tokens_per_sec, final_val_loss=result.final_val_loss,
                    final_val_ppl=result.final_val_ppl, final_val_tokens=result.final_val_tokens, train_s=train_s,
                    best_step=result.best_step),
    )
    info["total_s"] = time.perf_counter() - T_START
    card = model_card(info)
    if png is None:
        card = card.replace("![loss curves](loss.png)\n", "")
    (out / "MODEL_CARD.md").write_text(card)
    files = sorted(p.name for p in out.iterdir())
    log(f"wrote {out}: {', '.join(files)} ({size / 1e6:.1f} MB of weights); total {info['total_s']:.0f}s")
    summary = {k: info[k] for k in ("params", "size_mb", "train_tokens", "valid_tokens", "total_s")}
    summary.update(info["result"])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
