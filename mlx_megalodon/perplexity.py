"""Perplexity of a text under a Megalodon model, read once with the constant-size streaming cache.

    python -m mlx_megalodon.perplexity --model MLX_DIR --data book.txt [--max-tokens 1M] [--step 4096]

``--data`` takes what training takes: plain-text files (one document each), ``.jsonl`` files (a
``"text"`` field per line) and folders of them. Documents are tokenized as training packs them
(``<s> text </s>``), joined into one sequence, and read ``--step`` tokens per call with a fresh
cache, so memory stays the same whatever the length: every token is scored against everything read
before it. It prints the perplexity overall and by position (how many tokens had been read), with
tokens/s and peak memory; ``--json`` also writes them to a file.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

from .generate import _OneLineParser, _context, _positive_int

PROG = "perplexity"
K = 1024
DEFAULT_EDGES = (0, 1 * K, 4 * K, 16 * K, 64 * K, 128 * K, 1024 * K)


def stream_nll(model, tokens, step: int = 2048, score_from: int = 1, progress=None) -> np.ndarray:
    """Feed ``tokens`` (1-D) through the model with a fresh cache, ``step`` tokens per call, and return
    the NLL (float64, nats) of every token at position p >= ``score_from``:
    ``out[p - score_from] = -log P(tokens[p] | tokens[:p])``. The tokens before ``score_from - 1`` are
    only ingested (``last_only`` calls compute no other logits); with the default ``score_from=1``
    every token but the first is scored. ``progress(n)`` is called with the tokens read so far."""
    toks = np.asarray(tokens, dtype=np.int64)
    n = toks.shape[0]
    if not 1 <= score_from < n:
        raise ValueError(f"score_from must be in [1, {n}), got {score_from}")
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    cache = model.make_cache()
    first = score_from - 1                  # the first token whose logits are needed
    for start in range(0, first, step):     # context only
        piece = toks[start:min(start + step, first)]
        last = model(mx.array(piece[None], dtype=mx.int32), cache=cache, last_only=True)
        mx.eval(last, [c.state for c in cache])
        mx.clear_cache()
        if progress:
            progress(start + piece.shape[0])
    out = np.empty(n - score_from, dtype=np.float64)
    prev = None                             # logits (1 x V) of the previous piece's last token
    for start in range(first, n, step):
        piece = toks[start:start + step]
        logits = model(mx.array(piece[None], dtype=mx.int32), cache=cache)[0]          # L x V
        if prev is None:                    # logits[i] predicts piece[i + 1]
            logits_for, targets, lo = logits[:-1], piece[1:], 0
        else:                               # prev predicts piece[0]
            logits_for = mx.concatenate([prev, logits[:-1]], axis=0)
            targets, lo = piece, start - score_from
        prev = logits[-1:]
        if targets.shape[0]:
            t = mx.array(targets, dtype=mx.int32)
            nll = mx.logsumexp(logits_for, axis=-1) - mx.take_along_axis(logits_for, t[:, None], axis=-1)[:, 0]
            mx.eval(nll, prev, [c.state for c in cache])
            out[lo:lo + targets.shape[0]] = np.array(nll, dtype=np.float64)
        else:
            mx.eval(prev, [c.state for c in cache])
        mx.clear_cache()
        if progress:
            progress(start + piece.shape[0])
    return out


def size_label(n: int) -> str:
    return f"{n // K}K" if n and n % K == 0 else str(n)


def bucket_ppl(nll: np.ndarray, edges: Sequence[int] = DEFAULT_EDGES) -> List[dict]:
    """Perplexity of the tokens whose position p (tokens already read; nll index p - 1) lies in
    [edges[i], edges[i+1]), the last bucket running to the end. Empty buckets are left out."""
    n_pos = nll.shape[0] + 1                     # positions 0 .. n_pos-1; position 0 is never predicted
    bounds = list(edges) + [n_pos]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        hi = min(hi, n_pos)
        a, b = max(lo, 1) - 1, hi - 1             # nll indices of positions max(lo,1) .. hi-1
        if b <= a:
            continue
        mean = float(nll[a:b].mean())
        out.append(dict(lo=int(lo), hi=int(hi),
                        label=f"[{size_label(lo)}, {size_label(hi) if hi < n_pos else 'end'})",
                        tokens=int(b - a), nll=mean, ppl=math.exp(mean)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description="Perplexity of a text under a Megalodon model (MLX), streamed.")
    p.add_argument("--model", default=None,
                   help="MLX model directory, upstream checkpoint directory or Hub repo id "
                        "(default: the small model shipped with the package)")
    p.add_argument("--data", nargs="+", required=True,
                   help="text files, .jsonl files ({\"text\": ...} per line) or folders of them")
    p.add_argument("--max-tokens", type=_context, default=None,
                   help="score at most this many tokens of the joined documents, e.g. 100K, 1M")
    p.add_argument("--step", type=_positive_int, default=None,
                   help="tokens per forward call (default: 4 chunks); memory grows with it, not with the text")
    p.add_argument("--adapter-path", default=None, help="directory with LoRA / DoRA adapters to apply")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="compute dtype for the weights (default float32; CEMA and norms stay float32)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(a) -> dict:
    from .data import TokenStream, load_documents
    from .utils import default_model_path, load
    model_path = a.model if a.model is not None else default_model_path()
    model, tokenizer = load(model_path, dtype=getattr(mx, a.dtype))
    if a.adapter_path is not None:
        from .lora import load_adapters
        load_adapters(model, a.adapter_path)
    docs = load_documents(a.data)
    tokens = TokenStream.from_texts(tokenizer, [d.text for d in docs]).tokens
    if a.max_tokens is not None:
        tokens = tokens[:a.max_tokens]
    if tokens.shape[0] < 2:
        raise ValueError(f"--data: {tokens.shape[0]} token(s) after tokenizing; perplexity needs at least 2")
    step = a.step or 4 * model.args.chunk_size
    mx.reset_peak_memory()
    tic = time.perf_counter()
    if a.quiet:
        nll = stream_nll(model, tokens, step=step)
    else:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task("tokens read", total=int(tokens.shape[0]))
            nll = stream_nll(model, tokens, step=step, progress=lambda n: bar.update(task, completed=n))
    seconds = time.perf_counter() - tic
    mean = float(nll.mean())
    return dict(model=str(model_path), adapter_path=a.adapter_path, data=[str(d) for d in a.data], documents=len(docs),
                tokens=int(tokens.shape[0]), scored_tokens=int(nll.shape[0]), nll=mean, ppl=math.exp(mean),
                by_position=bucket_ppl(nll), step=step, dtype=a.dtype, seconds=seconds,
                tokens_per_s=tokens.shape[0] / seconds, peak_memory_gb=mx.get_peak_memory() / 1e9)


def _write_json(path: Path, result: dict) -> None:
    """Atomically: the file is either absent or whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .cpu_blas import warn_if_slow
    from .data import DataError
    from .tokenizer import TokenizerError
    warn_if_slow()
    try:
        result = run(a)
        if a.json:
            _write_json(Path(a.json), result)
    except (ValueError, OSError, CheckpointError, ConfigError, DataError, TokenizerError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(f"{result['documents']} document(s), {result['tokens']:,} tokens: perplexity {result['ppl']:.3f} "
          f"(NLL {result['nll']:.4f} nats/token)")
    for b in result["by_position"]:
        print(f"  position {b['label']:<16s} {b['tokens']:>10,d} tokens  perplexity {b['ppl']:.3f}")
    print(f"{result['tokens_per_s']:,.0f} tokens/s, {result['seconds']:.1f} s, peak memory "
          f"{result['peak_memory_gb']:.3f} GB ({result['step']} tokens per call, {result['dtype']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
