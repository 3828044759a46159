"""Tiny Megalodon configurations, random upstream weights, a tiny SentencePiece model and upstream
checkpoint directories, shared by the test suites of the MLX model, the PyTorch reference and the
converter. Imports torch, sentencepiece and mlx_megalodon's framework-free modules; never MLX."""
from __future__ import annotations

import io
import json
import math
import random
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

try:
    import mlx_megalodon  # noqa: F401  (only checks that the package is importable)
except ImportError:  # used outside pytest (conftest puts the repo root on sys.path)
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_megalodon.config import ModelArgs, model_parallel_split_dim, upstream_shapes

TINY = dict(num_layers=2, model_dim=16, z_dim=8, value_dim=24, num_heads=2, ffn_hidden_dim=20,
            cema_ndim=4, chunk_size=8, norm_num_groups=4, vocab_size=64)


def tiny_args(**overrides) -> ModelArgs:
    """A validated tiny ModelArgs; vocab_size 64 matches :func:`make_tokenizer`'s default."""
    return ModelArgs.from_dict({**TINY, **overrides})


def derived_rope_freqs(args: ModelArgs) -> torch.Tensor:
    dz = args.z_head_dim
    freqs = torch.tensor([args.rope_theta ** (j / dz) for j in range(0, dz, 2)], dtype=torch.float32)
    return 1.0 / freqs


def random_upstream_state_dict(args: ModelArgs, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A state dict with upstream's exact keys, shapes and dtypes and non-trivial values: every norm
    scale and Q/K affine non-zero, linears N(0, 0.5/sqrt(fan_in)), CEMA parameters in the ranges a
    trained model has. With share_emb, ``output.output.weight`` is the ``embed.weight`` object."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std + mean

    D = args.model_dim
    sd: Dict[str, torch.Tensor] = {}
    for key, shape in upstream_shapes(args).items():
        name = key.rsplit(".", 1)[-1]
        if key == "rope.freqs":
            t = derived_rope_freqs(args)
        elif name == "prior_count":
            t = torch.tensor(0, dtype=torch.int64)
        elif name in ("prior_mean", "prior_logv"):
            t = torch.zeros(shape, dtype=torch.float32)
        elif key == "output.output.weight" and args.share_emb:
            t = sd["embed.weight"]
        elif key == "embed.weight":
            t = normal(shape, 1.0 / math.sqrt(D))
        elif ".cema." in key:
            if name in ("alpha", "delta"):
                t = normal(shape, 0.5)
            elif name == "theta":
                k = torch.arange(1, D + 1, dtype=torch.float32)
                f = torch.exp(-k * math.log(D) / D)[torch.randperm(D, generator=g)]
                t = (torch.log(f / (1.0 - f)) + normal((D,), 0.1)).view(D, 1, 1)
            elif name == "gamma":
                t = normal(shape, 1.0)
            else:  # omega
                t = normal(shape, 0.25).clamp(-1.0, 1.0)
        elif len(shape) == 2 and name == "weight":          # linear [out, in]
            t = normal(shape, 0.5 / math.sqrt(shape[1]))
        elif key.endswith("mega.gamma") or key.endswith("mega.beta"):
            t = normal(shape, 0.3)
        elif name == "bias":
            t = normal(shape, 0.1)
        else:                                               # norm scales (stored minus one), nffn.alpha
            t = normal(shape, 0.2)
        sd[key] = t
    return sd


# --------------------------------------------------------------------------- tokenizer
_TOKENIZER_CACHE: Dict[int, bytes] = {}


def _training_text(n_lines: int = 1200, seed: int = 0):
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnpqrstvwxyz", "aeiou"
    sylls = [c + v for c in consonants for v in vowels]
    words = ["".join(rng.choice(sylls) for _ in range(rng.randint(1, 3))) for _ in range(1500)]
    words += ["the", "hello", "world", "megalodon", "model", "quick", "brown", "fox"]
    for _ in range(n_lines):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(4, 16)))


def tokenizer_bytes(vocab_size: int = 64) -> bytes:
    """A serialized BPE SentencePiece model of exactly ``vocab_size`` pieces (unk 0, bos 1, eos 2,
    no pad), trained once per session on generated lowercase text."""
    if vocab_size not in _TOKENIZER_CACHE:
        import sentencepiece as spm
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_text(), model_writer=buf, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, normalization_rule_name="identity",
            minloglevel=2, num_threads=1)
        _TOKENIZER_CACHE[vocab_size] = buf.getvalue()
    return _TOKENIZER_CACHE[vocab_size]


def make_tokenizer(directory, vocab_size: int = 64, name: str = "tokenizer.model") -> Path:
    """Write the tiny tokenizer into ``directory`` and return its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / name
    path.write_bytes(tokenizer_bytes(vocab_size))
    return path


# --------------------------------------------------------------------------- upstream checkpoint dirs
def shard_state_dict(sd: Dict[str, torch.Tensor], model_parallel_size: int):
    """Split a state dict like upstream's model-parallel layers do (shared tensors stay shared)."""
    shards = [{} for _ in range(model_parallel_size)]
    done: Dict[int, list] = {}
    for key, t in sd.items():
        if id(t) in done:
            parts = done[id(t)]
        else:
            dim = model_parallel_split_dim(key)
            if dim is None:
                parts = [t.clone() for _ in range(model_parallel_size)]
            else:
                if t.shape[dim] % model_parallel_size:
                    raise ValueError(f"{key}: dim {dim} of {list(t.shape)} not divisible by "
                                     f"{model_parallel_size}")
                parts = [p.clone() for p in torch.chunk(t, model_parallel_size, dim=dim)]
            done[id(t)] = parts
        for shard, part in zip(shards, parts):
            shard[key] = part
    return shards


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_upstream_dir(directory, args: ModelArgs, sd: Dict[str, torch.Tensor], model_parallel_size: int = 1,
                      dtype: str = "fp32", tokenizer: Optional[Path] = None,
                      vocab_in_config: Optional[int] = None, tokenizer_path_in_config: str = "tokenizer.model",
                      ) -> Path:
    """Write an upstream checkpoint directory: config.json, consolidate_config.json,
    consolidated.pth / consolidated.NN.pth and tokenizer.model (the tiny one unless ``tokenizer``
    is given). ``dtype`` casts floating tensors as upstream's ``model.to(dtype)`` would (all of them).
    ``vocab_in_config`` overrides the config's vocab_size (e.g. -1, upstream's "from tokenizer")."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    target = _TORCH_DTYPES[dtype]
    cast: Dict[str, torch.Tensor] = {}
    by_id: Dict[int, torch.Tensor] = {}
    for k, t in sd.items():
        if id(t) not in by_id:
            by_id[id(t)] = t.to(target) if t.is_floating_point() else t
        cast[k] = by_id[id(t)]
    model = args.upstream_dict()
    model.update(dropout=0.0, attention_dropout=0.0, hidden_dropout=0.0, init_mode="he", efficient_attn=None,
                 layerwise_ckpt=False)
    if vocab_in_config is not None:
        model["vocab_size"] = vocab_in_config
    cfg = {"model": model,
           "tokenizer": {"path": tokenizer_path_in_config, "additional_vocab_size": 0, "data_tokenized": False},
           "seed": 0}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    (d / "consolidate_config.json").write_text(json.dumps({"model_parallel_size": model_parallel_size,
                                                           "dtype": dtype}))
    if model_parallel_size == 1:
        torch.save(cast, d / "consolidated.pth")
    else:
        for r, shard in enumerate(shard_state_dict(cast, model_parallel_size)):
            torch.save(shard, d / f"consolidated.{r:02d}.pth")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, d / "tokenizer.model")
    else:
        make_tokenizer(d, vocab_size=args.vocab_size)
    return d


# Packed-row layouts the reset kernels of every family are tested on: (document lengths per row,
# chunk length; None = the automatic plan).
PACKED_LAYOUTS = [
    ([[40], [40]], 8),                                       # one document a row: the start at t = 0 only
    ([[8, 16, 16], [3, 5, 1, 7, 24]], 8),                    # starts on chunk boundaries / mid-chunk
    # L = 37, short last chunk: starts at the last step of a chunk (7), 1-token documents on a
    # boundary (8) and at t = 0, 1, a start at the last chunk's first step (32) and its last (36)
    ([[1, 1, 9, 1, 16, 1, 7, 1], [7, 1, 8, 16, 4, 1]], 8),
    ([[70, 3, 77, 50], [1, 64, 85, 50]], 8),                 # 25 chunks, documents across many of them
    ([[3, 5, 1, 7, 4], [1, 19]], 1),                         # every step its own chunk
    ([[3, 5, 1, 7, 24], [8, 16, 16]], None),                 # the automatic plan
]


def starts_from_lengths(layout):
    """B x L int32 document starts from each row's document lengths (every row the same total)."""
    rows = []
    for lengths in layout:
        firsts = np.cumsum([0, *lengths[:-1]])
        rows.append(np.concatenate([np.full(n, s) for s, n in zip(firsts, lengths)]))
    assert len({len(r) for r in rows}) == 1, "rows of different lengths"
    return np.stack(rows).astype(np.int32)


def record_launches(family, launched: list, **defaults) -> None:
    """Route one kernel family's launches (a *_kernels module with _launcher and set_launcher)
    through its current launcher, noting each kernel's name in `launched`. `defaults`: launcher
    attributes the family reads (lanes=..., max_group=...), taken from the current launcher where
    it has them."""
    inner = family._launcher()

    def recording(name, *args):
        launched.append(name)
        return inner(name, *args)
    for attr, default in defaults.items():
        setattr(recording, attr, getattr(inner, attr, default))
    family.set_launcher(recording)
