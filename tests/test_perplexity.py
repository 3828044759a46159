"""mlx_megalodon.perplexity: the streamed perplexity CLI."""
import json
import math

import mlx.core as mx
import numpy as np
import pytest

from factory import make_upstream_dir, random_upstream_state_dict, tiny_args
from mlx_megalodon.checkpoint import convert
from mlx_megalodon.data import TokenStream, load_documents
from mlx_megalodon.perplexity import main
from mlx_megalodon.utils import load

TEXT = ("The quick brown fox jumps over the lazy dog. " * 12 + "\n") * 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl")
    args = tiny_args(chunk_size=32)
    up = make_upstream_dir(root / "up", args, random_upstream_state_dict(args, seed=3))
    convert(up, root / "model")
    (root / "a.txt").write_text(TEXT)
    (root / "b.jsonl").write_text(json.dumps({"text": TEXT[:300]}) + "\n" + json.dumps({"text": TEXT[100:500]}) + "\n")
    return root


def test_cli_matches_a_one_call_forward(setup, capsys):
    root = setup
    data = [str(root / "a.txt"), str(root / "b.jsonl")]
    out = root / "ppl.json"
    # 24 tokens per call: pieces straddle the 32-token chunks
    assert main(["--model", str(root / "model"), "--data", *data, "--step", "24", "--json", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["documents"] == 3 and f"perplexity {result['ppl']:.3f}" in printed

    # the same tokens through one full forward call
    model, tok = load(root / "model", dtype=mx.float32)
    tokens = TokenStream.from_texts(tok, [d.text for d in load_documents(data)]).tokens.astype(np.int64)
    assert result["tokens"] == tokens.shape[0] and result["scored_tokens"] == tokens.shape[0] - 1
    logits = model(mx.array(tokens[None], dtype=mx.int32))[0, :-1]
    t = mx.array(tokens[1:, None], dtype=mx.int32)
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t, axis=-1)[:, 0]
    assert result["nll"] == pytest.approx(float(nll.mean()), abs=1e-4)
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]))
    assert sum(b["tokens"] for b in result["by_position"]) == result["scored_tokens"]

    # --max-tokens scores a prefix only (and the progress bar, on stderr, changes nothing)
    assert main(["--model", str(root / "model"), "--data", *data, "--max-tokens", "50", "--step", "24",
                 "--json", str(out)]) == 0
    prefix = json.loads(out.read_text())
    assert prefix["tokens"] == 50
    assert prefix["nll"] == pytest.approx(float(nll[:49].mean()), abs=1e-4)


@pytest.mark.parametrize("argv,pattern", [
    (["--data", "MISSING.txt"], "MISSING.txt"),
    (["--data", "a.txt", "--max-tokens", "1"], "perplexity needs at least 2"),
    (["--data", "a.txt", "--model", "NO_MODEL_DIR"], "NO_MODEL_DIR"),
])
def test_bad_input_is_one_line_and_writes_nothing(setup, capsys, monkeypatch, argv, pattern):
    monkeypatch.chdir(setup)
    argv = (["--model", str(setup / "model")] if "--model" not in argv else []) + argv
    assert main([*argv, "--json", "out.json", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pattern in err and err.startswith("perplexity: error:")
    assert not (setup / "out.json").exists()


def test_bad_flag_values_exit_2(setup, capsys):
    for argv in (["--step", "0"], ["--max-tokens", "lots"]):
        with pytest.raises(SystemExit) as e:
            main(["--data", str(setup / "a.txt"), *argv])
        assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
