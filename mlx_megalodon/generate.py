"""Text generation with a constant-size cache: chunk-wise prompt ingestion, token-wise decoding.

Mirrors mlx-lm's ``generate`` / ``stream_generate`` API and report lines.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .config import is_full_precision_key

_CONTEXT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_UNITS = {"": 1, "k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def parse_context_length(text: Union[str, int]) -> int:
    """'1M' -> 1,000,000; '256K' -> 256,000; '1000000' -> 1,000,000 (decimal units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _CONTEXT_RE.match(str(text))
        if not m:
            raise ValueError(f"invalid context length {text!r} (use e.g. 4096, 256K, 1M)")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"invalid context length {text!r}: must be positive")
    return value


# ----------------------------------------------------------------------------- sampling
def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
                 ) -> Callable[[mx.array], mx.array]:
    """logits (B x V) -> token ids (B). temp 0 is greedy."""
    if temp < 0:
        raise ValueError(f"temp must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
    if temp == 0:
        return lambda logits: mx.argmax(logits, axis=-1)

    def sample(logits: mx.array) -> mx.array:
        logprobs = logits.astype(mx.float32) / temp
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        neg_inf = mx.array(-float("inf"), mx.float32)
        if top_k > 0 and top_k < logprobs.shape[-1]:
            kth = mx.sort(logprobs, axis=-1)[..., -top_k][..., None]
            logprobs = mx.where(logprobs < kth, neg_inf, logprobs)
        if min_p > 0:
            threshold = logprobs.max(axis=-1, keepdims=True) + np.log(min_p)
            logprobs = mx.where(logprobs < threshold, neg_inf, logprobs)
        if top_p < 1:
            order = mx.argsort(-logprobs, axis=-1)
            sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
            probs = mx.exp(sorted_lp)
            before = mx.cumsum(probs, axis=-1) - probs        # mass strictly above each token
            sorted_lp = mx.where(before >= top_p, neg_inf, sorted_lp)
            logprobs = mx.put_along_axis(logprobs, order, sorted_lp, axis=-1)
        return mx.random.categorical(logprobs, axis=-1)
    return sample


# ----------------------------------------------------------------------------- prompt caches
CACHE_FORMAT = "megalodon-prompt-cache/1"


class PromptCacheError(ValueError):
    pass


def model_fingerprint(model, tokenizer=None) -> str:
    """Identifies weights + tokenizer: the config, every float32 state parameter (CEMA, norms,
    Q/K affine; small but model-specific) and the tokenizer file."""
    h = hashlib.sha256(json.dumps(model.args.to_dict(), sort_keys=True).encode())
    for key, value in sorted(tree_flatten(model.parameters())):
        if is_full_precision_key(key):
            h.update(key.encode())
            h.update(np.array(value.astype(mx.float32)).tobytes())
    if tokenizer is not None and getattr(tokenizer, "path", None):
        h.update(Path(tokenizer.path).read_bytes())
    return h.hexdigest()[:32]


def save_prompt_cache(path: Union[str, Path], cache: List, model, tokenizer=None,
                      last_logits: Optional[mx.array] = None, tokens: Optional[Sequence[int]] = None) -> None:
    """Write the full streaming state as safetensors, atomically."""
    path = Path(path)
    arrays = {}
    for i, c in enumerate(cache):
        for j, a in enumerate(c.state):
            arrays[f"cache.{i}.{j}"] = a
    if last_logits is not None:
        arrays["last_logits"] = last_logits.astype(mx.float32)
    metadata = {
        "format": CACHE_FORMAT,
        "fingerprint": model_fingerprint(model, tokenizer),
        "num_entries": str(len(cache)),
        "offsets": json.dumps([c.offset for c in cache]),
        "num_tokens": str(cache[-1].offset),
    }
    if tokens is not None:
        arrays["tokens"] = mx.array(np.asarray(tokens, dtype=np.int32))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata)
    os.replace(tmp, path)


def load_prompt_cache(path: Union[str, Path], model, tokenizer=None):
    """Returns (cache, last_logits or None, num_tokens). Refuses caches of another model."""
    path = Path(path)
    if not path.is_file():
        raise PromptCacheError(f"{path}: prompt cache file not found")
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise PromptCacheError(f"{path}: not a readable prompt cache ({e})") from None
    if metadata.get("format") != CACHE_FORMAT:
        raise PromptCacheError(f"{path}: not a Megalodon prompt cache (format {metadata.get('format')!r})")
    if metadata.get("fingerprint") != model_fingerprint(model, tokenizer):
        raise PromptCacheError(f"{path}: prompt cache was made with a different model or tokenizer")
    cache = model.make_cache()
    if int(metadata["num_entries"]) != len(cache):
        raise PromptCacheError(f"{path}: prompt cache has {metadata['num_entries']} entries, model needs {len(cache)}")
    offsets = json.loads(metadata["offsets"])
    for i, c in enumerate(cache):
        state = []
        while f"cache.{i}.{len(state)}" in arrays:
            state.append(arrays[f"cache.{i}.{len(state)}"])
        c.state = state
        c.offset = offsets[i]
    return cache, arrays.get("last_logits"), int(metadata["num_tokens"])


# ----------------------------------------------------------------------------- generation
@dataclass
class GenerationResponse:
    text: str
    token: Optional[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float            # GB
    finish_reason: Optional[str] = None


class StreamingDetokenizer:
    """Turns token ids into text one token at a time, SentencePiece-style: '▁' is a space and
    byte-fallback pieces are held until they form complete UTF-8."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sp = getattr(tokenizer, "sp_model", None)
        self.pending = b""

    def add(self, token: int) -> str:
        sp = self.sp
        if sp is None or token >= sp.get_piece_size():
            return self.tokenizer.decode([token])
        if sp.is_control(token):
            return ""
        if sp.is_byte(token):
            self.pending += bytes([int(sp.id_to_piece(token)[3:5], 16)])
            try:
                text, self.pending = self.pending.decode("utf-8"), b""
                return text
            except UnicodeDecodeError:
                return ""
        flushed = self.pending.decode("utf-8", errors="replace")
        self.pending = b""
        return flushed + sp.id_to_piece(token).replace("\u2581", " ")


def prefill(model, tokens: mx.array, cache: List, step_size: int, progress: Optional[Callable[[int], None]] = None
            ) -> mx.array:
    """Feed a prompt (1-D token ids) through the model in pieces; returns the last logits (1 x V)."""
    n = tokens.shape[0]
    logits = None
    for start in range(0, n, step_size):
        piece = tokens[start:start + step_size]
        logits = model(piece[None], cache=cache, last_only=True)[:, -1]
        mx.eval(logits, [c.state for c in cache])
        mx.clear_cache()
        if progress is not None:
            progress(piece.shape[0])
    return logits


def _default_step(model) -> int:
    return model.args.chunk_size


def stream_generate(model, tokenizer, prompt: Union[str, Sequence[int]], max_tokens: int = 256, *,
                    sampler: Optional[Callable] = None, max_context: Optional[int] = None,
                    prefill_step_size: Optional[int] = None, prompt_cache: Optional[List] = None,
                    cache_logits: Optional[mx.array] = None, cached_tokens: int = 0,
                    progress: bool = False, add_bos: bool = True
                    ) -> Generator[GenerationResponse, None, None]:
    """Yields one GenerationResponse per generated token (text is the new piece of text)."""
    sampler = sampler or make_sampler()
    step = prefill_step_size or _default_step(model)
    if step <= 0:
        raise ValueError(f"prefill_step_size must be positive, got {step}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, bos=add_bos and prompt_cache is None) if prompt else []
    else:
        ids = list(prompt)
    if not ids and cache_logits is None:
        raise ValueError("the prompt is empty")
    total_prompt = cached_tokens + len(ids)
    if max_context is not None and total_prompt > max_context:
        raise ValueError(f"the prompt has {total_prompt} tokens, more than --max-context {max_context}")
    if max_context is not None:
        max_tokens = min(max_tokens, max_context - total_prompt)
    cache = prompt_cache if prompt_cache is not None else model.make_cache()

    mx.reset_peak_memory()
    tic = time.perf_counter()
    if ids:
        bar = None
        if progress and len(ids) > step:
            from rich.progress import (BarColumn, Progress, TextColumn, TimeRemainingColumn)
            bar = Progress(TextColumn("prompt"), BarColumn(), TextColumn("{task.completed}/{task.total} tok"),
                           TextColumn("{task.fields[tps]:.0f} tok/s"), TimeRemainingColumn(),
                           transient=True, console=None)
            bar.start()
            task = bar.add_task("prefill", total=len(ids), tps=0.0)
            t0 = time.perf_counter()

            def advance(n, _done=[0]):
                _done[0] += n
                bar.update(task, advance=n, tps=_done[0] / max(time.perf_counter() - t0, 1e-9))
        else:
            advance = None
        try:
            logits = prefill(model, mx.array(ids, dtype=mx.int32), cache, step, advance)
        finally:
            if bar is not None:
                bar.stop()
    else:
        logits = cache_logits
    prompt_time = time.perf_counter() - tic
    prompt_tps = len(ids) / prompt_time if ids else 0.0

    detok = StreamingDetokenizer(tokenizer)
    eos = getattr(tokenizer, "eos_id", None)
    tic = time.perf_counter()
    y = sampler(logits)
    mx.async_eval(y)
    n = 0
    while n < max_tokens:
        next_logits = model(y[:, None], cache=cache)[:, -1] if n + 1 < max_tokens else None
        next_y = sampler(next_logits) if next_logits is not None else None
        if next_y is not None:
            mx.async_eval(next_y)
        token = int(y.item())
        n += 1
        gen_tps = n / max(time.perf_counter() - tic, 1e-9)
        finish = None
        if eos is not None and token == eos:
            finish = "stop"
        elif n >= max_tokens:
            finish = "length"
        text = "" if finish == "stop" else detok.add(token)
        yield GenerationResponse(text, token, total_prompt, prompt_tps, n, gen_tps,
                                 mx.get_peak_memory() / 1e9, finish)
        if finish is not None:
            break
        y = next_y
        if n % 256 == 0:
            mx.clear_cache()


def generate(model, tokenizer, prompt, max_tokens: int = 256, verbose: bool = False, **kwargs) -> str:
    """Generate a completion and return it as a string (printing as it streams if verbose)."""
    text = ""
    last = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        text += response.text
        if verbose:
            print(response.text, end="", flush=True)
        last = response
    if verbose and last is not None:
        print()
        print("=" * 10)
        report(last, file=sys.stdout)
    return text


def report(r: GenerationResponse, file=sys.stderr) -> None:
    print(f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=file)


# ----------------------------------------------------------------------------- command line
class _OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a single line (no usage dump), exit status 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _context(text):
    try:
        return parse_context_length(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def build_parser():
    p = _OneLineParser(prog="generate.py", description="Generate text with a Megalodon model (MLX).")
    p.add_argument("--model", default=None,
                   help="MLX model directory, upstream checkpoint directory or Hub repo id "
                        "(default: the small model shipped with the package)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", "-p", default=None, help="prompt text, or '-' to read standard input")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--max-tokens", "-m", type=int, default=256, help="tokens to generate")
    p.add_argument("--max-context", type=_context, default=None,
                   help="bound on prompt plus generated tokens, e.g. 4096, 256K, 1M")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prefill-step-size", type=_positive_int, default=None,
                   help="prompt tokens per forward pass (default: the model's chunk size)")
    p.add_argument("--adapter-path", default=None, help="directory with LoRA adapters to apply")
    p.add_argument("--save-cache", default=None, help="write the state after the prompt to this file")
    p.add_argument("--load-cache", default=None, help="start from a state saved with --save-cache")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype for the weights (CEMA and norms stay float32)")
    p.add_argument("--verbose", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="print the statistics after the text (default true)")
    return p


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read prompt file {args.prompt_file}: {getattr(e, 'strerror', None) or e}")
    if args.prompt == "-":
        return sys.stdin.read()
    return args.prompt or ""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .cpu_blas import warn_if_slow
    warn_if_slow()
    try:
        sampler = make_sampler(args.temp, args.top_p, args.top_k, args.min_p)
        if args.max_tokens < 0:
            raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
        prompt = _read_prompt(args)
        if not prompt and args.load_cache is None:
            raise ValueError("the prompt is empty (give --prompt, --prompt-file or --prompt -)")
        from .utils import load, default_model_path
        model_path = args.model if args.model is not None else default_model_path()
        dtype = None if args.dtype is None else getattr(mx, args.dtype)
        model, tokenizer = load(model_path, dtype=dtype)
        if args.adapter_path is not None:
            try:
                from .lora import load_adapters
            except ImportError:
                raise ValueError("--adapter-path: LoRA fine-tuning is not part of this version yet") from None
            load_adapters(model, args.adapter_path)
        if args.seed is not None:
            mx.random.seed(args.seed)
        cache, cache_logits, cached = None, None, 0
        if args.load_cache is not None:
            cache, cache_logits, cached = load_prompt_cache(args.load_cache, model, tokenizer)
        ids = tokenizer.encode(prompt, bos=cache is None) if prompt else []
        if args.max_context is not None and cached + len(ids) > args.max_context:
            raise ValueError(f"the prompt has {cached + len(ids)} tokens, more than --max-context "
                             f"{args.max_context}")
        if args.save_cache is not None:
            cache = cache if cache is not None else model.make_cache()
            if ids:
                step = args.prefill_step_size or _default_step(model)
                cache_logits = prefill(model, mx.array(ids, dtype=mx.int32), cache, step)
                cached, ids = cached + len(ids), []
            save_prompt_cache(args.save_cache, cache, model, tokenizer, cache_logits)
        last = None
        for r in stream_generate(model, tokenizer, ids, args.max_tokens, sampler=sampler,
                                 max_context=args.max_context, prefill_step_size=args.prefill_step_size,
                                 prompt_cache=cache, cache_logits=cache_logits, cached_tokens=cached,
                                 progress=sys.stderr.isatty()):
            print(r.text, end="", flush=True)
            last = r
        print()
        if args.verbose and last is not None:
            print("=" * 10)
            report(last, file=sys.stdout)
        return 0
    except (ValueError, OSError, KeyError, CheckpointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1
