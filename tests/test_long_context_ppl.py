"""benchmarks/long_context_ppl.py: held-out corpus, streamed NLL, position buckets, context runs."""
import math
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import long_context_ppl as lcp  # noqa: E402

MODEL_DIR = ROOT / "mlx_megalodon" / "default_model"
pytestmark = pytest.mark.skipif(not (MODEL_DIR / "config.json").exists(), reason="no default model shipped")


@pytest.fixture(scope="module")
def model_and_tokens():
    from mlx_megalodon import load
    model, tok = load(MODEL_DIR, dtype=mx.float32)
    docs, counts = lcp.heldout_documents()
    assert docs and counts["n_heldout_used"] == len(docs)
    assert all(lcp.is_validation(rel, 30) for rel, _ in docs)          # held-out files only
    assert [r for r, _ in docs] == sorted(r for r, _ in docs)
    # the first held-out documents; the test uses their first 512 tokens
    stream = lcp.build_sequence(tok, docs[:8])
    tokens = stream.tokens.astype(np.int64)
    assert tokens[0] == tok.bos_id and (tokens == tok.eos_id).sum() == 8
    assert tokens.shape[0] >= 512
    return model, tokens[:512]


def test_stream_buckets_and_context_runs(model_and_tokens):
    """Kept small (~1.5K tokens of forward work): MLX's CPU wheel multiplies with a reference BLAS."""
    model, tokens = model_and_tokens
    n = tokens.shape[0]
    # one pass, 160 tokens per call: pieces straddle the 256-token chunks
    nll = lcp.stream_nll(model, tokens, step=160)
    assert nll.shape == (n - 1,) and np.isfinite(nll).all()
    # streamed == one call (causal: the first 299 predictions depend on tokens[:300] only)
    logits = model(mx.array(tokens[None, :300], dtype=mx.int32))[0, :-1]
    t = mx.array(tokens[1:300, None], dtype=mx.int32)
    ref = np.array(mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t, axis=-1)[:, 0], dtype=np.float64)
    np.testing.assert_allclose(nll[:299], ref, atol=1e-4, rtol=0)

    buckets = lcp.bucket_ppl(nll, (0, 128, 256))
    assert [b["label"] for b in buckets] == ["[0, 128)", "[128, 256)", "[256, end)"]
    assert [b["tokens"] for b in buckets] == [127, 128, n - 256]
    for b in buckets:
        assert math.isfinite(b["ppl"]) and 1.0 < b["ppl"] < 8000
        assert b["ppl"] == pytest.approx(math.exp(nll[max(b["lo"], 1) - 1:b["hi"] - 1].mean()))

    runs = lcp.context_ppl(model, tokens, contexts=(64, n - 128, 4096), target=128, step=192)
    assert [r["available"] for r in runs] == [True, True, False]
    assert runs[0]["start"] == n - 192 and runs[1]["start"] == 0
    assert all(math.isfinite(r["ppl"]) for r in runs[:2])
    # the whole slice as context (ingested with last_only calls): the same predictions as the one pass
    assert runs[1]["nll"] == pytest.approx(nll[-128:].mean(), abs=1e-5)


def test_parse_sizes():
    assert lcp.parse_sizes("0,1K, 4k,100") == [0, 1024, 4096, 100]
