"""Make an MLX model directory loadable by mlx-lm's own ``load`` and CLIs.

    python -m mlx_megalodon.mlx_lm_compat MLX_DIR NEW_DIR
    python convert.py SRC NEW_DIR --mlx-lm            (the same, straight from a conversion)

mlx-lm builds a model from ``mlx_lm.models.<model_type>``, and has no Megalodon module. It also
accepts a ``model_file`` in config.json: a Python file in the directory that defines ``Model`` and
``ModelArgs``, run only with ``trust_remote_code=True``. Its tokenizer comes from transformers. So
NEW_DIR gets, next to our files:
- ``megalodon_mlx_lm.py``: two imports from this package (mlx-megalodon must be installed);
- ``"model_file"`` in config.json (our own loader ignores it);
- ``tokenizer_config.json``: transformers' LlamaTokenizer over the same SentencePiece model, with
  its prefix-space setting taken from the model's own normalizer.

Before NEW_DIR appears, the copy is loaded with ``mlx_lm.load(..., trust_remote_code=True)``: the
token ids of a set of probe texts must equal our tokenizer's, and the logits on a short prompt must
equal our model's, or nothing is written. Then, for example:

    mlx_lm.generate --model NEW_DIR --trust-remote-code --prompt "def fib(" --max-tokens 50
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import uuid
from pathlib import Path
from typing import List, Optional

MODEL_FILE = "megalodon_mlx_lm.py"
MODEL_FILE_TEXT = '''"""Lets mlx-lm build this Megalodon model: mlx_lm.load(path, trust_remote_code=True).
Needs the mlx-megalodon package installed; written by mlx_megalodon.mlx_lm_compat."""
from mlx_megalodon.config import ModelArgs  # noqa: F401
from mlx_megalodon.mega import Model  # noqa: F401
'''

# Texts whose token ids must agree between our tokenizer and transformers' (code, leading and
# repeated whitespace, tabs and newlines, non-ASCII and byte-fallback characters, the empty text).
PROBE_TEXTS = (
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "  leading spaces\tand tabs\n\n\ntrailing  ",
    "héllo wörld, naïve café ✓ 你好 😀",
    "x=1;y = 2  # comment\r\n",
    " a",
    "",
)


class CompatError(ValueError):
    """The directory cannot be made loadable by mlx-lm (one line, names the cause)."""


def hf_tokenizer_config(tokenizer_model: Path) -> dict:
    """tokenizer_config.json for transformers' LlamaTokenizer over this SentencePiece model."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # pragma: no cover - sentencepiece and protobuf are dependencies
        raise CompatError(f"reading {tokenizer_model} needs sentencepiece's protobuf module ({e})") from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(tokenizer_model).read_bytes())
    except Exception as e:
        raise CompatError(f"{tokenizer_model}: not a readable SentencePiece model ({type(e).__name__})") from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        kind = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise CompatError(f"{tokenizer_model}: a {kind} SentencePiece model; the transformers route "
                          "(LlamaTokenizer) reproduces BPE models only")
    pieces = [p.piece for p in proto.pieces]

    def piece(i):
        return pieces[i] if 0 <= i < len(pieces) else None

    spec = proto.trainer_spec
    return {"tokenizer_class": "LlamaTokenizer", "legacy": False,
            "add_prefix_space": bool(proto.normalizer_spec.add_dummy_prefix),
            "add_bos_token": spec.bos_id >= 0, "add_eos_token": False,
            "bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id), "unk_token": piece(spec.unk_id),
            "pad_token": piece(spec.pad_id)}


def _check_with_mlx_lm(directory: Path) -> None:
    """Load ``directory`` through mlx-lm and compare tokens and logits with our own loader."""
    try:
        import mlx_lm
    except ImportError:
        raise CompatError("mlx-lm is not installed (pip install mlx-lm)") from None
    import mlx.core as mx

    from .utils import load
    ours, our_tok = load(directory)
    from transformers.utils import logging as hf_logging   # mlx-lm depends on transformers
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # it warns that "megalodon" is no transformers model type
    try:
        theirs, their_tok = mlx_lm.load(str(directory), trust_remote_code=True)
    except Exception as e:
        raise CompatError(f"mlx_lm.load failed on the prepared directory: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for text in PROBE_TEXTS:
        want, got = our_tok.encode(text, bos=True), list(their_tok.encode(text))
        if want != got:
            raise CompatError(f"transformers tokenizes {text[:30]!r} as {got[:8]}..., ours as {want[:8]}...")
        if text and their_tok.decode(got, skip_special_tokens=True) != our_tok.decode(want):
            raise CompatError(f"transformers decodes {text[:30]!r} differently from ours")
    if their_tok.eos_token_id != our_tok.eos_id:
        raise CompatError(f"end-of-sequence id {their_tok.eos_token_id} under transformers, {our_tok.eos_id} ours")
    ids = mx.array([our_tok.encode(PROBE_TEXTS[0], bos=True)[:32]])
    if not mx.array_equal(theirs(ids), ours(ids)).item():
        raise CompatError("the model mlx-lm builds gives other logits than ours")


def make_mlx_lm_loadable(src, dst, check: bool = True) -> Path:
    """Copy the MLX model directory ``src`` to the new directory ``dst`` with the files mlx-lm
    needs; with ``check``, load the copy through mlx-lm first. Atomic: ``dst`` appears complete or
    not at all."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file() or not any(src.glob("model*.safetensors")):
        raise CompatError(f"{src}: not an MLX model directory (config.json and model*.safetensors)")
    if not (src / "tokenizer.model").is_file():
        raise CompatError(f"{src}: no tokenizer.model")
    if dst.exists() or dst.is_symlink():
        raise CompatError(f"destination already exists: {dst}")
    tokenizer_config = hf_tokenizer_config(src / "tokenizer.model")
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["model_file"] = MODEL_FILE
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / MODEL_FILE).write_text(MODEL_FILE_TEXT)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        if check:
            _check_with_mlx_lm(tmp)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_megalodon.mlx_lm_compat",
                                description=__doc__.split("\n")[0])
    p.add_argument("src", help="an MLX model directory (ours: config.json, model*.safetensors, tokenizer.model)")
    p.add_argument("dst", help="new output directory (must not exist)")
    a = p.parse_args(argv)
    try:
        dst = make_mlx_lm_loadable(a.src, a.dst)
    except (CompatError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst}; load it with mlx_lm.load('{dst}', trust_remote_code=True) "
          "or the mlx_lm CLIs with --trust-remote-code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
