"""The shipped default model: loads with no --model, writes Python-like text, knows Python."""
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_megalodon.utils import DEFAULT_MODEL_DIR, default_model_path, load

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)
'''


def test_default_model_is_shipped_small_and_documented():
    assert default_model_path() == DEFAULT_MODEL_DIR
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.glob("*.safetensors"))
    assert size <= 25 * 1024 * 1024
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert "perplexity" in card.lower() and "Long-context perplexity" in card


def test_default_model_knows_python():
    """Perplexity on unseen Python far below a uniform guess over its 8,000-piece vocabulary."""
    model, tok = load(DEFAULT_MODEL_DIR, dtype=mx.float32)
    ids = tok.encode(SNIPPET)
    logits = model(mx.array([ids[:-1]]))
    nll = nn.losses.cross_entropy(logits[0], mx.array(ids[1:]), reduction="mean").item()
    assert math.exp(nll) < 60, math.exp(nll)      # uniform would be 8000


def test_generate_without_model_flag_uses_the_default():
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--prompt", "def fibonacci(",
                        "--max-tokens", "40"], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stderr
    text = r.stdout.split("==========")[0]
    assert text.strip() and "\n" in text
    assert "Generation:" in r.stdout
