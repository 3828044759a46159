#!/usr/bin/env python3
r"""Perplexity against the context already read, on held-out long text (the paper's Figure 5, small).

    python benchmarks/long_context_ppl.py --model mlx_megalodon/default_model \
        --out benchmarks/results/long_context_ppl.json --plot benchmarks/results/long_context_ppl.png

Corpus: the ``*.py`` files of *this* machine's standard library (``sysconfig.get_paths()["stdlib"]``,
site-packages excluded, empty and undecodable files skipped) whose relative path the training
script's hash rule holds out (``int(sha1(relpath)[:8], 16) % 1000 < --val-permille``); files whose
hash puts them in training are never used. They are sorted by relative path and concatenated as
training builds documents (``<s> text </s>`` per file, ``TokenStream.from_texts``).

Two measurements, both with the model's constant-size streaming cache (``--step`` tokens per call):

1. one pass over the whole sequence, recording the NLL of every token; perplexity of the tokens whose
   position (= number of tokens already read) lies in each bucket [0,1K), [1K,4K), [4K,16K),
   [16K,64K), [64K,128K), [128K,end) (K = 1024);
2. the last ``--target`` tokens scored with only the preceding C tokens as context, one fresh run per
   C in ``--contexts``: the scored tokens are the same for every C, so this isolates context length
   from where in the corpus a token sits.

The model runs in float32 by default (the bf16-stored weights upcast): streamed and one-call NLL then
agree to ~1e-5. Speed: MLX's Linux CPU wheel multiplies with a bundled reference BLAS (~30x slower
than OpenBLAS here, ~100 tokens/s for the default model); preloading OpenBLAS changes only the speed:

    apt-get download libopenblas0-pthread libgfortran5 && for f in *.deb; do dpkg -x $f /tmp/ob; done
    L=/tmp/ob/usr/lib/x86_64-linux-gnu; OPENBLAS_NUM_THREADS=1 LD_LIBRARY_PATH=$L \
        LD_PRELOAD=$L/openblas-pthread/libopenblas.so.0 python benchmarks/long_context_ppl.py ...
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)
from mlx_megalodon.data import TokenStream  # noqa: E402
from mlx_megalodon.perplexity import bucket_ppl, size_label, stream_nll  # noqa: E402,F401
from train_default_model import is_validation, stdlib_files  # noqa: E402  (the training split, verbatim)

K = 1024
DEFAULT_EDGES = (0, 1 * K, 4 * K, 16 * K, 64 * K, 128 * K)
DEFAULT_CONTEXTS = (1 * K, 4 * K, 16 * K, 64 * K, 128 * K)


# ----------------------------------------------------------------------------- corpus
def heldout_documents(stdlib: Optional[Path] = None, permille: int = 30) -> Tuple[List[Tuple[str, str]], dict]:
    """(relpath, text) of the held-out stdlib files, sorted by relpath, plus counts of what was seen."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    docs, n_train, n_skipped, n_empty = [], 0, 0, 0
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        if not is_validation(rel, permille):
            n_train += 1                      # in training by the hash rule: never used here
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            n_skipped += 1
            continue
        if not text.strip():
            n_empty += 1
            continue
        docs.append((rel, text))
    docs.sort(key=lambda d: d[0])
    return docs, dict(stdlib=str(root), n_files_total=n_train + len(docs) + n_skipped + n_empty,
                      n_train_excluded=n_train, n_heldout_used=len(docs), n_heldout_undecodable=n_skipped,
                      n_heldout_empty=n_empty)


def build_sequence(tokenizer, docs: Sequence[Tuple[str, str]]) -> TokenStream:
    """One flat token stream, ``<s> text </s>`` per document, exactly as training packs them."""
    return TokenStream.from_texts(tokenizer, [t for _, t in docs])


# ----------------------------------------------------------------------------- scoring
# stream_nll and bucket_ppl are the package's (mlx_megalodon.perplexity, the user-facing CLI).


def context_ppl(model, tokens, contexts: Sequence[int] = DEFAULT_CONTEXTS, target: int = 2 * K,
                step: int = 2048, log=None) -> List[dict]:
    """The last ``target`` tokens scored after a fresh cache has read only the C tokens before them."""
    toks = np.asarray(tokens)
    n = toks.shape[0]
    out = []
    for c in contexts:
        start = n - target - c
        if start < 0:
            out.append(dict(context=int(c), available=False))
            continue
        tic = time.perf_counter()
        nll = stream_nll(model, toks[start:], step=step, score_from=c)
        assert nll.shape[0] == target
        mean = float(nll.mean())
        out.append(dict(context=int(c), available=True, start=int(start), tokens=int(target), nll=mean,
                        ppl=math.exp(mean), seconds=time.perf_counter() - tic))
        if log:
            log(f"context {size_label(c)}: ppl {math.exp(mean):.3f} ({time.perf_counter() - tic:.1f}s)")
    return out


def parse_sizes(text: str) -> List[int]:
    out = []
    for s in text.split(","):
        s = s.strip()
        out.append(int(float(s[:-1]) * K) if s[-1:].lower() == "k" else int(s))
    return out


# ----------------------------------------------------------------------------- plotting / report
def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    # running curve: perplexity over log-spaced position windows
    curve = result["position_curve"]
    ax1.plot(curve["position"], curve["ppl"], color="0.6", lw=1, label="log-spaced windows")
    b = result["buckets"]
    for i, x in enumerate(b):
        ax1.hlines(x["ppl"], max(x["lo"], 1), x["hi"], color="C0", lw=2.5, label="buckets" if i == 0 else None)
    ax1.set_xscale("log")
    ax1.set_xlabel("position in the stream (tokens already read)")
    ax1.set_ylabel("perplexity")
    ax1.set_title(f"one pass over {result['corpus']['tokens']:,} held-out tokens")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    c = [x for x in result["context_runs"] if x["available"]]
    ax2.plot([x["context"] for x in c], [x["ppl"] for x in c], "o-", color="C1")
    for x in c:
        ax2.annotate(f"{x['ppl']:.2f}", (x["context"], x["ppl"]), textcoords="offset points", xytext=(0, 6),
                     ha="center", fontsize=8)
    if c:                                   # a +-10% range: small differences are not magnified
        lo, hi = min(x["ppl"] for x in c), max(x["ppl"] for x in c)
        ax2.set_ylim(lo * 0.9, hi * 1.1)
    ax2.set_xscale("log")
    ax2.set_xlabel("context tokens before the scored ones")
    ax2.set_ylabel("perplexity")
    ax2.set_title(f"last {result['target']:,} tokens, fresh cache per context")
    ax2.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{result['model']} on held-out stdlib files (Python {result['machine']['python']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def position_curve(nll: np.ndarray, n_windows: int = 40) -> dict:
    n_pos = nll.shape[0] + 1
    edges = np.unique(np.geomspace(1, n_pos, n_windows + 1).astype(np.int64))
    pos, ppl = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        seg = nll[lo - 1:hi - 1]
        if seg.size:
            pos.append(float(math.sqrt(lo * max(hi - 1, lo))))
            ppl.append(math.exp(float(seg.mean())))
    return dict(position=pos, ppl=ppl)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "mlx_megalodon" / "default_model"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "long_context_ppl.json"))
    p.add_argument("--plot", default=None, help="PNG path")
    p.add_argument("--stdlib", default=None, help="default: sysconfig.get_paths()['stdlib']")
    p.add_argument("--val-permille", type=int, default=30)
    p.add_argument("--step", type=int, default=2048, help="tokens per model call")
    p.add_argument("--buckets", default="0,1K,4K,16K,64K,128K", help="bucket lower edges")
    p.add_argument("--contexts", default="1K,4K,16K,64K,128K")
    p.add_argument("--target", type=int, default=2 * K, help="tokens scored in the context runs")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "as-stored"],
                   help="compute dtype (float32: the bf16-stored weights upcast, streaming == one call to ~1e-5)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    from mlx_megalodon import load
    model, tok = load(a.model, dtype=None if a.dtype == "as-stored" else getattr(mx, a.dtype))
    model.eval()
    docs, counts = heldout_documents(Path(a.stdlib) if a.stdlib else None, a.val_permille)
    if not docs:
        sys.exit("no held-out files found")
    stream = build_sequence(tok, docs)
    tokens = stream.tokens.astype(np.int64)
    n = tokens.shape[0]
    log(f"{len(docs)} held-out files -> {n:,} tokens (model {a.model})")

    tic = time.perf_counter()
    nll = stream_nll(model, tokens, step=a.step)
    full_s = time.perf_counter() - tic
    buckets = bucket_ppl(nll, parse_sizes(a.buckets))
    log(f"full pass: {full_s:.1f}s ({n / full_s:,.0f} tok/s); overall ppl {math.exp(nll.mean()):.3f}")
    for b in buckets:
        log(f"  {b['label']:>16}: {b['tokens']:>7,} tokens, ppl {b['ppl']:.3f}")
    runs = context_ppl(model, tokens, parse_sizes(a.contexts), a.target, a.step, log=log)

    starts = stream.doc_starts
    ends = np.append(starts[1:], n)

    def files_in(lo, hi):
        return [docs[i][0] for i in range(len(docs)) if starts[i] < hi and ends[i] > lo]
    for r in runs:
        if r["available"]:
            r["context_starts_in"] = files_in(r["start"], r["start"] + 1)[0]
    result = dict(
        model=str(a.model), command="python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        date=datetime.date.today().isoformat(),
        machine=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                     python=platform.python_version(), mlx=mx.__version__, device=str(mx.default_device()),
                     cpu_count=os.cpu_count(), blas_preload=os.environ.get("LD_PRELOAD"),
                     openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS")),
        corpus=dict(**counts, tokens=int(n), val_permille=a.val_permille, order="sorted by relpath, each <s> text </s>",
                    files=[dict(relpath=r, start=int(s)) for (r, _), s in zip(docs, starts)],
                    target_files=files_in(n - a.target, n)),
        dtype=a.dtype, step=a.step, target=a.target, full_pass_seconds=full_s, overall_nll=float(nll.mean()),
        overall_ppl=math.exp(float(nll.mean())), buckets=buckets, context_runs=runs,
        position_curve=position_curve(nll), total_seconds=time.perf_counter() - t0)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    if a.plot:
        plot(result, Path(a.plot))
        log(f"wrote {a.plot}")
    return result


if __name__ == "__main__":
    main()
