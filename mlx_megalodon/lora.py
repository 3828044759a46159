"""LoRA, DoRA and full fine-tuning of Megalodon models: ``python -m mlx_megalodon.lora``.

Follows ``mlx_lm.lora``: the same flags, YAML config (``-c``; keys mirror the flags plus
``lora_parameters``, ``optimizer_config`` and ``lr_schedule``), data layout, adapter files and
report lines.

Data: ``--data DIR`` holds ``train.jsonl``, ``valid.jsonl`` and ``test.jsonl``, one JSON object a
line, all lines of a file in one of three forms:

* ``{"text": "..."}``: BOS + text + EOS, every token is trained on (``--mask-prompt`` is refused,
  as in mlx-lm: a text example has no prompt).
* ``{"prompt": "...", "completion": "..."}``: BOS + prompt, then the completion tokenized on its
  own + EOS (SentencePiece puts its word-boundary marker, i.e. a space, at the completion's
  start). With ``--mask-prompt`` only the completion and its EOS count in the loss.
* ``{"messages": [{"role": "...", "content": "..."}, ...]}``: SentencePiece has no chat template,
  so a conversation is rendered as plain lines ``"<role>: <content>\\n"``, one per message, each
  message tokenized on its own (``"<role>:"``, then ``"<content>\\n"``), BOS before the first and
  an EOS after every assistant message (so a tuned model ends its turn). With ``--mask-prompt``
  only the assistant messages' content, newline and EOS count. :func:`chat_prompt` builds the
  matching prompt for generation.

Batches are sorted by length, padded with token 0 on the right and the padding is masked out of
the loss (Megalodon is causal, so right padding never reaches a real token). Sequences longer
than ``--max-seq-length`` are truncated with a warning.

Adapters: ``ADAPTER_PATH/adapters.safetensors`` (the trainable parameters, named like the model's
parameters, e.g. ``layers.3.mega.wz.lora_a``), ``adapter_config.json`` (every flag, with
``fine_tune_type``, ``num_layers`` and ``lora_parameters`` resolved) and, with ``--save-every N``,
``NNNNNNN_adapters.safetensors`` snapshots. All files are written atomically (temp + rename).
:func:`load_adapters` applies them unfused; ``python -m mlx_megalodon.fuse`` folds them in.

Data parallelism: under ``mlx.launch`` (see docs/distributed.md) ``--batch-size`` is per rank;
each rank takes examples ``rank::ranks`` of every global batch, gradients are token-weighted over
the ranks (so the update equals one process's on the combined batch), reported losses are global,
and only rank 0 writes the adapter files.

Differences from mlx-lm worth knowing: the validation loss before training is reported as
``Iter 0`` and later ones are taken after that iteration's update; one iteration is one optimizer
update (``--grad-accumulation-steps`` micro-batches); the final partial batch of the validation
and test sets is used rather than dropped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import distributed as dist
from . import kernels
from .linear import Linear

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FINE_TUNE_TYPES = ("lora", "dora", "full")
#: The attention block's projections and the FFN's linears (fc3 exists only with SwiGLU).
DEFAULT_KEYS = ("mega.wz", "mega.wv", "mega.wr", "mega.wh1", "mega.wh2", "nffn.fc1", "nffn.fc2", "nffn.fc3")
DEFAULT_LORA_PARAMETERS = {"rank": 8, "scale": 20.0, "dropout": 0.0}

CONFIG_DEFAULTS = {
    "model": None,
    "train": False,
    "data": "data",
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {},
    "seed": 0,
    "num_layers": None,            # None: min(16, number of layers), mlx-lm's 16 where it fits
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "compile": "auto",
    "grad_accumulation_steps": 1,
    "lr_schedule": None,
    "lora_parameters": dict(DEFAULT_LORA_PARAMETERS),
    "mask_prompt": False,
    "config": None,
}


class DataError(ValueError):
    """A data set that cannot be used; the message names the file (and line)."""


class AdapterError(ValueError):
    """Adapter files that cannot be applied to this model; the message names the file."""


# =============================================================================== layers
def _is_quantized(layer) -> bool:
    return isinstance(layer, nn.QuantizedLinear)


def _linear_dims(layer) -> Tuple[int, int]:
    """(input_dims, output_dims) of an nn.Linear or nn.QuantizedLinear."""
    out_dims, packed = layer.weight.shape
    if _is_quantized(layer):
        return packed * 32 // layer.bits, out_dims
    return packed, out_dims


def dequantized_weight(layer) -> mx.array:
    """The dense (output x input) weight of an nn.Linear or nn.QuantizedLinear."""
    if _is_quantized(layer):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                             bits=layer.bits, mode=getattr(layer, "mode", "affine"))
    return layer.weight


def _base_dtype(layer) -> mx.Dtype:
    return layer.scales.dtype if _is_quantized(layer) else layer.weight.dtype


def _rebuild(layer, weight: mx.array, dequantize: bool) -> nn.Module:
    """A fresh linear layer with ``weight`` (and the base's bias), re-quantized like ``layer`` was
    unless ``dequantize``."""
    out_dims, in_dims = weight.shape
    has_bias = "bias" in layer
    fused = Linear(in_dims, out_dims, bias=has_bias)
    fused.weight = weight.astype(_base_dtype(layer))
    if has_bias:
        fused.bias = layer.bias
    if _is_quantized(layer) and not dequantize:
        fused = nn.QuantizedLinear.from_linear(fused, layer.group_size, layer.bits,
                                               mode=getattr(layer, "mode", "affine"))
    return fused


class LoRALinear(nn.Module):
    """``y = base(x) + scale · (dropout(x) A) B`` around a frozen nn.Linear or nn.QuantizedLinear
    (QLoRA). A is input x rank (uniform ±1/sqrt(input)), B is rank x output (zeros), so a fresh
    adapter changes nothing."""

    @classmethod
    def from_base(cls, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        return cls(linear, rank, scale, dropout)

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
            raise TypeError(f"LoRA wraps nn.Linear or nn.QuantizedLinear, got {type(linear).__name__}")
        linear.freeze()
        self.linear = linear
        in_dims, out_dims = _linear_dims(linear)
        self.scale = float(scale)
        self.rank = int(rank)
        self.dropout = nn.Dropout(p=dropout)
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    # The model reads ``.weight`` / ``.scales`` of its projections (e.g. for the decoding cache's
    # dtype); an adapted projection answers for its base layer.
    @property
    def weight(self) -> mx.array:
        return self.linear.weight

    @property
    def scales(self) -> mx.array:
        return self.linear.scales

    def delta(self) -> mx.array:
        """The low-rank update as a dense (output x input) float32 matrix."""
        return (self.scale * self.lora_b.T.astype(mx.float32)) @ self.lora_a.T.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        w = dequantized_weight(self.linear).astype(mx.float32) + self.delta()
        return _rebuild(self.linear, w, dequantize)


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA: ``y = m / ||W + ΔW||_row · x (W + ΔW)ᵀ + b`` with the learned
    magnitude ``m`` (one per output row, initialized to the base rows' norms). The row norm is
    treated as a constant in the backward pass (the DoRA paper's memory-saving choice)."""

    def __init__(self, linear: nn.Module, rank: int = 8, scale: float = 20.0, dropout: float = 0.0):
        super().__init__(linear, rank, scale, dropout)
        self.m = mx.linalg.norm(dequantized_weight(linear).astype(mx.float32), axis=1)

    def _matmul(self, x: mx.array) -> mx.array:
        lin = self.linear
        if _is_quantized(lin):
            return mx.quantized_matmul(x, lin.weight, lin.scales, lin.get("biases"), transpose=True,
                                       group_size=lin.group_size, bits=lin.bits,
                                       mode=getattr(lin, "mode", "affine"))
        return x @ lin.weight.T

    def _row_norm(self) -> mx.array:
        w = dequantized_weight(self.linear).astype(mx.float32) + self.delta()
        return mx.stop_gradient(mx.linalg.norm(w, axis=1))

    def __call__(self, x: mx.array) -> mx.array:
        y = self._matmul(x)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        y = y + (self.scale * z).astype(x.dtype)
        y = (self.m / self._row_norm()).astype(x.dtype) * y
        if "bias" in self.linear:
            y = y + self.linear.bias
        return y

    def fuse(self, dequantize: bool = False) -> nn.Module:
        w = dequantized_weight(self.linear).astype(mx.float32) + self.delta()
        w = (self.m / mx.linalg.norm(w, axis=1))[:, None] * w
        return _rebuild(self.linear, w, dequantize)


ADAPTER_LAYERS = (LoRALinear, DoRALinear)


# =============================================================================== applying adapters
def resolve_num_layers(model, num_layers: Optional[int]) -> int:
    n = len(model.layers)
    if num_layers is None:
        return min(16, n)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < -1 or num_layers == 0:
        raise ValueError(f"--num-layers must be a positive number of layers or -1 (all), got {num_layers!r}")
    if num_layers == -1:
        return n
    if num_layers > n:
        raise ValueError(f"requested to fine-tune {num_layers} layers but the model has only {n}")
    return num_layers


def check_lora_parameters(params: Optional[dict]) -> dict:
    """Defaults filled in and values checked; ``keys`` stays None for "the default keys"."""
    params = dict(params or {})
    unknown = set(params) - {"rank", "scale", "dropout", "keys"}
    if unknown:
        raise ValueError(f"lora_parameters: unknown key(s) {sorted(unknown)} (known: rank, scale, dropout, keys)")
    out = {**DEFAULT_LORA_PARAMETERS, **{k: v for k, v in params.items() if v is not None}}
    rank = out["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora_parameters.rank must be a positive integer, got {rank!r}")
    if isinstance(out["scale"], bool) or not isinstance(out["scale"], (int, float)):
        raise ValueError(f"lora_parameters.scale must be a number, got {out['scale']!r}")
    d = out["dropout"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
        raise ValueError(f"lora_parameters.dropout must be in [0, 1), got {d!r}")
    keys = params.get("keys")
    if keys is not None:
        if isinstance(keys, str) or not all(isinstance(k, str) and k for k in keys) or not keys:
            raise ValueError(f"lora_parameters.keys must be a non-empty list of module paths, got {keys!r}")
        keys = list(keys)
    out["keys"] = keys
    out["scale"], out["dropout"] = float(out["scale"]), float(d)
    return out


def default_lora_keys(model) -> List[str]:
    """The default keys this model has (``nffn.fc3`` only with SwiGLU)."""
    present = {name for name, _ in model.layers[0].named_modules()}
    return [k for k in DEFAULT_KEYS if k in present]


def linear_to_lora_layers(model, num_layers: int, lora_parameters: dict, use_dora: bool = False) -> dict:
    """Wrap the ``keys`` linears of the last ``num_layers`` layers (keys relative to a layer, e.g.
    ``mega.wz``; a key naming a model-level module such as ``output.output`` wraps that one).
    Returns the resolved lora_parameters (keys filled in)."""
    params = check_lora_parameters(lora_parameters)
    n = resolve_num_layers(model, num_layers)
    keys = params["keys"] if params["keys"] is not None else default_lora_keys(model)
    cls = DoRALinear if use_dora else LoRALinear

    def wrap(path, module):
        if isinstance(module, ADAPTER_LAYERS):
            raise ValueError(f"'{path}' already has an adapter")
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            raise ValueError(f"lora key '{path}' is a {type(module).__name__}, not a linear layer")
        return cls.from_base(module, rank=params["rank"], scale=params["scale"], dropout=params["dropout"])

    layer_paths = {name for name, _ in model.layers[0].named_modules()}
    model_paths = {name: m for name, m in model.named_modules()}
    for key in keys:
        if key not in layer_paths and key not in model_paths:
            raise ValueError(f"lora key '{key}' names no module of this model "
                             f"(layer linears: {', '.join(default_lora_keys(model))})")
    for layer in model.layers[len(model.layers) - n:]:
        modules = dict(layer.named_modules())
        updates = [(k, wrap(k, modules[k])) for k in keys if k in modules]
        if updates:
            layer.update_modules(tree_unflatten(updates))
    top = [(k, wrap(k, model_paths[k])) for k in keys if k not in layer_paths and k in model_paths]
    if top:
        model.update_modules(tree_unflatten(top))
    return {**params, "keys": keys}


_BUFFERS = ("prior_count", "prior_mean", "prior_logv")


def unfreeze_layers(model, num_layers: int) -> None:
    """Full fine-tuning: every parameter of the last ``num_layers`` layers becomes trainable, except
    TimestepNorm's prior buffers (upstream buffers, not parameters)."""
    n = resolve_num_layers(model, num_layers)
    for layer in model.layers[len(model.layers) - n:]:
        layer.unfreeze()
        for _, m in layer.named_modules():
            if all(k in m for k in _BUFFERS):
                m.freeze(recurse=False, keys=list(_BUFFERS))


def prepare_model(model, fine_tune_type: str, num_layers: Optional[int], lora_parameters: Optional[dict]
                  ) -> Tuple[int, Optional[dict]]:
    """Freeze the model and add adapters (lora/dora) or unfreeze layers (full). Returns the resolved
    (num_layers, lora_parameters) as they go into adapter_config.json."""
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"unknown fine-tune type {fine_tune_type!r} (choose from {', '.join(FINE_TUNE_TYPES)})")
    n = resolve_num_layers(model, num_layers)
    model.freeze()
    if fine_tune_type == "full":
        if getattr(model.args, "quantization", None):
            raise ValueError("full fine-tuning needs a float model; use --fine-tune-type lora (QLoRA) "
                             "on a quantized model")
        unfreeze_layers(model, n)
        params = None
    else:
        params = linear_to_lora_layers(model, n, lora_parameters, use_dora=fine_tune_type == "dora")
    if hasattr(model, "_compiled_step"):
        model._compiled_step = None           # a compiled decoding step holds the old layers
    return n, params


def _check_weights(model, weights: Dict[str, mx.array], file: Path, need_all: bool) -> None:
    expected = dict(tree_flatten(model.trainable_parameters())) if need_all else \
        dict(tree_flatten(model.parameters()))
    for k, v in weights.items():
        if k not in expected:
            raise AdapterError(f"{file}: weight '{k}' does not belong to this model with these adapters")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise AdapterError(f"{file}: weight '{k}' has shape {tuple(v.shape)}, expected "
                               f"{tuple(expected[k].shape)}")
    if need_all:
        missing = [k for k in expected if k not in weights]
        if missing:
            raise AdapterError(f"{file}: missing weight '{missing[0]}'"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _read_safetensors(file: Path) -> Dict[str, mx.array]:
    if not file.is_file():
        raise AdapterError(f"{file}: adapter weights not found")
    try:
        return mx.load(str(file))
    except Exception as e:
        raise AdapterError(f"{file}: unreadable safetensors file ({' '.join(str(e).split())})") from None


def load_adapter_weights(model, file, strict: bool = True) -> None:
    """Load an adapters.safetensors (or snapshot) into a model already prepared for it. ``strict``:
    the file must hold exactly the model's trainable parameters."""
    file = Path(file)
    weights = _read_safetensors(file)
    _check_weights(model, weights, file, need_all=strict)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())


def read_adapter_config(adapter_path) -> dict:
    path = Path(adapter_path)
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter directory not found")
    cfg_file = path / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file}: adapter config not found")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file}: unreadable adapter config ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file}: adapter config must be a JSON object")
    ftt = cfg.get("fine_tune_type", "lora")
    if ftt not in FINE_TUNE_TYPES:
        raise AdapterError(f"{cfg_file}: unknown fine_tune_type {ftt!r}")
    if "num_layers" not in cfg:
        raise AdapterError(f"{cfg_file}: no 'num_layers'")
    if ftt != "full" and not isinstance(cfg.get("lora_parameters"), dict):
        raise AdapterError(f"{cfg_file}: no 'lora_parameters' object")
    return cfg


def load_adapters(model, adapter_path):
    """Apply the adapters in ``adapter_path`` (adapter_config.json + adapters.safetensors) to
    ``model`` unfused, in place; returns the model (in eval mode). Raises AdapterError (a
    ValueError) naming the offending file."""
    path = Path(adapter_path)
    cfg = read_adapter_config(path)
    cfg_file = path / ADAPTER_CONFIG
    weights_file = path / ADAPTER_FILE
    weights = _read_safetensors(weights_file)
    try:
        prepare_model(model, cfg.get("fine_tune_type", "lora"), cfg["num_layers"], cfg.get("lora_parameters"))
    except ValueError as e:
        raise AdapterError(f"{cfg_file}: {e}") from None
    _check_weights(model, weights, weights_file, need_all=True)
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def fuse_model(model, dequantize: bool = False):
    """Fold every LoRA/DoRA layer into its base linear, in place. With ``dequantize`` every quantized
    layer (adapted or not) becomes a float layer and the config loses its quantization entry."""
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules()
             if isinstance(m, ADAPTER_LAYERS)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        dequantize_model(model)
    if hasattr(model, "_compiled_step"):
        model._compiled_step = None
    model.unfreeze()
    for _, m in model.named_modules():
        if all(k in m for k in _BUFFERS):
            m.freeze(recurse=False, keys=list(_BUFFERS))
    mx.eval(model.parameters())
    return model


def dequantize_model(model):
    """Replace every nn.QuantizedLinear / nn.QuantizedEmbedding by its float counterpart."""
    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            swaps.append((name, _rebuild(m, dequantized_weight(m), dequantize=True)))
        elif isinstance(m, nn.QuantizedEmbedding):
            w = mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits,
                              mode=getattr(m, "mode", "affine"))
            emb = nn.Embedding(*w.shape)
            emb.weight = w.astype(m.scales.dtype)
            swaps.append((name, emb))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    if getattr(model, "args", None) is not None:
        model.args.quantization = None
    return model


def count_parameters(module) -> int:
    """Parameters as the float model has them (a quantized weight counts its unpacked size)."""
    total = 0
    for name, m in module.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            total += m.weight.size * 32 // m.bits
            total += sum(v.size for k, v in m.items() if isinstance(v, mx.array) and k == "bias")
        else:
            total += sum(v.size for k, v in m.items() if isinstance(v, mx.array) and not k.startswith("_"))
    return total


def trainable_parameter_line(model) -> str:
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = count_parameters(model)
    return (f"Trainable parameters: {100 * trainable / max(total, 1):.3f}% "
            f"({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")


# =============================================================================== gradient checkpointing
def enable_grad_checkpoint(model, enabled: bool = True) -> None:
    """Recompute each layer's activations in the backward pass (``mx.checkpoint``): training memory
    holds only the layer inputs. Per model instance (the layer class is swapped, not patched)."""
    from .train import set_grad_checkpoint
    set_grad_checkpoint(model, enabled)


# =============================================================================== data
@dataclass
class Example:
    tokens: List[int]
    counts: List[bool]      # per token: does predicting it count under --mask-prompt
    line: int


@dataclass
class Dataset:
    path: Path
    kind: str               # text | completions | chat
    examples: List[Example]

    def __len__(self):
        return len(self.examples)


def _kind(obj) -> Optional[str]:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "chat"
    if "prompt" in obj and "completion" in obj:
        return "completions"
    if "text" in obj:
        return "text"
    return None


def _encode(tokenizer, text: str, bos: bool = False, eos: bool = False) -> List[int]:
    return list(tokenizer.encode(text, bos=bos, eos=eos))


def encode_chat(tokenizer, messages, add_generation_prompt: bool = False) -> Tuple[List[int], List[bool]]:
    """Token ids and assistant flags of a conversation rendered as ``"<role>: <content>\\n"`` lines
    (see the module docstring). ``add_generation_prompt`` appends ``"assistant:"``."""
    ids: List[int] = []
    counts: List[bool] = []
    for i, msg in enumerate(messages):
        head = _encode(tokenizer, f"{msg['role']}:", bos=i == 0)
        assistant = msg["role"] == "assistant"
        body = _encode(tokenizer, f"{msg['content']}\n", eos=assistant)
        ids += head + body
        counts += [False] * len(head) + [assistant] * len(body)
    if add_generation_prompt:
        head = _encode(tokenizer, "assistant:", bos=not messages)
        ids += head
        counts += [False] * len(head)
    return ids, counts


def chat_prompt(tokenizer, messages) -> List[int]:
    """Prompt token ids for generating the next assistant message with a chat-tuned model."""
    return encode_chat(tokenizer, messages, add_generation_prompt=True)[0]


def _example(obj, kind: str, tokenizer, where: str, mask_prompt: bool) -> Tuple[List[int], List[bool]]:
    def need_str(key, value):
        if not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")

    if kind == "text":
        need_str("text", obj["text"])
        if mask_prompt:
            raise DataError(f"{where}: --mask-prompt needs prompt/completion or chat examples, not text")
        ids = _encode(tokenizer, obj["text"], bos=True, eos=True)
        counts = [True] * len(ids)
    elif kind == "completions":
        need_str("prompt", obj["prompt"])
        need_str("completion", obj["completion"])
        p = _encode(tokenizer, obj["prompt"], bos=True)
        c = _encode(tokenizer, obj["completion"], eos=True)
        ids, counts = p + c, [False] * len(p) + [True] * len(c)
    else:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {j} must be an object with string 'role' and 'content'")
        ids, counts = encode_chat(tokenizer, msgs)
        if mask_prompt and not any(counts):
            raise DataError(f"{where}: no assistant message to train on with --mask-prompt")
    if len(ids) < 2:
        raise DataError(f"{where}: example has {len(ids)} token(s); at least 2 are needed")
    return ids, counts


def load_jsonl(path, tokenizer, mask_prompt: bool = False) -> Dataset:
    """Read and tokenize one jsonl file. Blank lines are skipped; every other line must be a JSON
    object of the file's form (taken from its first example)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    kind = None
    examples = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg}, column {e.colno})") from None
        k = _kind(obj)
        if k is None:
            raise DataError(f"{where}: expected a JSON object with 'text', 'prompt' and 'completion', "
                            f"or 'messages'")
        if kind is None:
            kind = k
        elif k != kind:
            raise DataError(f"{where}: a {k} example in a file of {kind} examples")
        ids, counts = _example(obj, k, tokenizer, where, mask_prompt)
        examples.append(Example(ids, counts, lineno))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return Dataset(path, kind, examples)


def load_datasets(data_dir, tokenizer, train: bool, test: bool, mask_prompt: bool = False
                  ) -> Tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """(train, valid, test) from ``data_dir``; train and valid are required with ``train``, test
    with ``test``."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"{d}: data directory not found")
    train_set = valid_set = test_set = None
    if train:
        train_set = load_jsonl(d / "train.jsonl", tokenizer, mask_prompt)
        valid_set = load_jsonl(d / "valid.jsonl", tokenizer, mask_prompt)
    if test:
        test_set = load_jsonl(d / "test.jsonl", tokenizer, mask_prompt)
    return train_set, valid_set, test_set


def make_batch(examples: Sequence[Example], max_seq_length: int, mask_prompt: bool = False,
               warn: Optional[Callable[[str], None]] = None, pad_to: int = 1):
    """(inputs, targets, mask) arrays of shape B x (L-1): right-padded with 0, mask 1.0 where a
    target is a real token that counts (only completion/assistant tokens with ``mask_prompt``).
    ``pad_to``: L rounded up to a multiple of it (at most ``max_seq_length``), so that a compiled
    step sees few distinct shapes; the extra positions are masked out and, the model being causal,
    change no loss."""
    lengths = [len(e.tokens) for e in examples]
    if max(lengths) > max_seq_length and warn is not None:
        warn(f"[WARNING] Some sequences are longer than {max_seq_length} tokens. The longest sentence "
             f"{max(lengths)} will be truncated to {max_seq_length}. Consider pre-splitting your data "
             f"to save memory.")
    L = min(max(lengths), max_seq_length)
    L = min(-(-L // pad_to) * pad_to, max_seq_length)
    tokens = np.zeros((len(examples), L), dtype=np.int32)
    mask = np.zeros((len(examples), L), dtype=np.float32)
    for i, e in enumerate(examples):
        n = min(len(e.tokens), L)
        tokens[i, :n] = e.tokens[:n]
        mask[i, :n] = e.counts[:n] if mask_prompt else 1.0
    return mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:]), mx.array(mask[:, 1:])


def iterate_batches(dataset: Dataset, batch_size: int, max_seq_length: int, mask_prompt: bool = False,
                    train: bool = False, rng: Optional[np.random.Generator] = None,
                    warn: Optional[Callable[[str], None]] = None, rank: int = 0, world_size: int = 1,
                    pad_to: int = 1) -> Iterator[Optional[Tuple[mx.array, mx.array, mx.array]]]:
    """Batches of similar lengths. Training: full batches in random order, forever. Evaluation:
    every example once, in order of length (the last batch may be smaller).

    Data parallelism: with ``world_size`` > 1 ``batch_size`` is the global batch (every rank draws
    the same ones from the same ``rng`` state) and each yielded batch is rank ``rank``'s examples
    ``rank::world_size`` of it, padded to their own longest; in evaluation a rank's share of the
    short last batch may be empty, yielded as None."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.examples[i].tokens))
    if train:
        if len(dataset) < batch_size:
            raise DataError(f"{dataset.path}: {len(dataset)} examples, fewer than --batch-size {batch_size}")
        batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    else:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    warned = [False]

    def warn_once(msg):
        if warn is not None and not warned[0]:
            warned[0] = True
            warn(msg)

    rng = rng if rng is not None else np.random.default_rng(0)
    while True:
        seq = rng.permutation(len(batches)) if train else range(len(batches))
        for b in seq:
            rows = dist.shard(batches[b], rank, world_size)
            if not rows:
                yield None
                continue
            yield make_batch([dataset.examples[j] for j in rows], max_seq_length, mask_prompt, warn_once, pad_to)
        if not train:
            return


# =============================================================================== loss, evaluation, training
COMPILED_PAD_TO = 32   # training batches of a compiled update: lengths rounded up to a multiple of this
COMPILE_CHOICES = ("auto", "on", "off")


def masked_loss(model, inputs: mx.array, targets: mx.array, mask: mx.array):
    """Mean cross-entropy over the counted targets; returns (loss, number of counted targets)."""
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits, targets) * mask
    ntoks = mask.sum()
    return ce.sum() / mx.maximum(ntoks, 1.0), ntoks


def evaluate(model, dataset: Dataset, batch_size: int, num_batches: int = -1, max_seq_length: int = 2048,
             mask_prompt: bool = False, group=None) -> float:
    """Token-weighted mean loss over ``num_batches`` batches (-1: the whole set). With a ``group``
    of several ranks (default: the global group) ``batch_size`` is the global batch: each rank
    evaluates its examples of every batch and the sums are combined, so every rank returns the
    value one process gets with the same ``batch_size``."""
    wd = dist.world(group)
    was_training = model.training
    model.eval()
    total, ntoks = mx.array(0.0), mx.array(0.0)
    try:
        for i, batch in enumerate(iterate_batches(dataset, batch_size, max_seq_length, mask_prompt,
                                                  rank=wd.rank, world_size=wd.size)):
            if num_batches != -1 and i >= num_batches:
                break
            if batch is None:
                continue
            loss, n = masked_loss(model, *batch)
            total, ntoks = total + loss * n, ntoks + n
            mx.eval(total, ntoks)
    finally:
        model.train(was_training)
    if wd.distributed:
        total, ntoks = dist.all_sum_tree([total, ntoks], dist.get_group(group))
    return (total / mx.maximum(ntoks, 1.0)).item()


@dataclass
class TrainingArgs:
    batch_size: int = 4
    iters: int = 100
    val_batches: int = 25
    steps_per_report: int = 10
    steps_per_eval: int = 200
    steps_per_save: int = 100
    max_seq_length: int = 2048
    adapter_file: Optional[Path] = None
    grad_checkpoint: bool = False
    grad_accumulation_steps: int = 1
    mask_prompt: bool = False
    seed: int = 0
    # One micro-batch per update: the whole update through mx.compile. None: on a GPU backend only;
    # on MLX's CPU backend it was about 8% slower (benchmarks/LORA.md): new shapes recompile.
    compile: Optional[bool] = None


def _atomic_save_safetensors(path: Path, weights: Dict[str, mx.array], metadata: Optional[dict] = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.safetensors")
    try:
        mx.save_safetensors(str(tmp), weights, metadata=metadata or {})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_adapters(model, path) -> None:
    """Write the trainable parameters (the adapters) to ``path`` atomically."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.eval(weights)
    _atomic_save_safetensors(Path(path), weights, {"format": "mlx"})


def save_adapter_config(config: dict, adapter_path) -> Path:
    path = Path(adapter_path) / ADAPTER_CONFIG
    _atomic_write_text(path, json.dumps(config, indent=4, default=str) + "\n")
    return path


def _lr(optimizer) -> float:
    lr = optimizer.learning_rate
    return float(lr.item() if isinstance(lr, mx.array) else lr)


def train(model, optimizer, train_set: Dataset, valid_set: Optional[Dataset], args: TrainingArgs,
          report: Callable[[str], None] = print, group=None) -> dict:
    """The training loop. Returns the history: {"train": [(iter, loss)], "val": [(iter, loss)],
    "tokens_per_sec": [...], "peak_memory_gb": [...]}; "val" starts with (0, loss before training).

    Data parallelism: with a ``group`` of several ranks (default: the global group, a group of one
    without a launcher) every rank calls ``train`` alike; the global batch is ``args.batch_size``
    examples per rank, each rank computes its share, the gradients are token-weighted over all
    ranks (one fused all_sum per update) so the update equals the single-process update on the
    combined batch; losses and token counts are global, only rank 0 reports and saves."""
    group = dist.get_group(group)
    wd = dist.world(group)
    if not wd.is_main:
        report = lambda msg: None  # noqa: E731
    history = {"train": [], "val": [], "tokens_per_sec": [], "peak_memory_gb": []}
    warn = (lambda msg: print(msg, file=sys.stderr)) if wd.is_main else (lambda msg: None)  # noqa: E731
    rng = np.random.default_rng(args.seed)
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    accum = max(1, int(args.grad_accumulation_steps))
    global_batch = args.batch_size * wd.size
    if wd.distributed:
        dist.check_identical(model.trainable_parameters(), group, "trainable weights")
        mx.random.seed(args.seed * 1_000_003 + wd.rank)   # each rank its own dropout masks
    model.train()
    if args.grad_checkpoint:
        enable_grad_checkpoint(model)
    # Everything an update reads and writes, for mx.compile (and one mx.eval per update).
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]

    def one_update(inputs, targets, mask):
        """One micro-batch per update: forward, backward (summed over ranks) and the optimizer step;
        returns (loss x tokens, tokens)."""
        (loss, ntoks), g = loss_and_grad(model, inputs, targets, mask)
        if wd.distributed:                # one fused all_sum: gradients, loss, tokens
            g, loss, ntoks = dist.reduce_step(g, loss, ntoks, group)
        optimizer.update(model, g)
        return loss * ntoks, ntoks

    compiled = accum == 1 and (args.compile if args.compile is not None else kernels.gpu_backend() is not None)
    if compiled:
        one_update = mx.compile(one_update, inputs=state, outputs=state)

    def validate(it):
        if valid_set is None or args.val_batches == 0:
            return
        tic = time.perf_counter()
        val = evaluate(model, valid_set, global_batch, args.val_batches, args.max_seq_length, args.mask_prompt,
                       group)
        history["val"].append((it, val))
        report(f"Iter {it}: Val loss {val:.3f}, Val took {time.perf_counter() - tic:.3f}s")

    try:
        validate(0)
        batches = iterate_batches(train_set, global_batch, args.max_seq_length, args.mask_prompt,
                                  train=True, rng=rng, warn=warn, rank=wd.rank, world_size=wd.size,
                                  pad_to=COMPILED_PAD_TO if compiled else 1)
        mx.reset_peak_memory()
        losses, window_tokens, window_steps, window_time, trained = 0.0, 0.0, 0, 0.0, 0
        for it in range(1, args.iters + 1):
            tic = time.perf_counter()
            if accum == 1:
                step_loss, step_tokens = one_update(*next(batches))
            else:   # eager: each micro-batch's gradients are evaluated before the next one's graph
                grads, step_loss, step_tokens = None, mx.array(0.0), mx.array(0.0)
                for _ in range(accum):
                    inputs, targets, mask = next(batches)
                    (loss, ntoks), g = loss_and_grad(model, inputs, targets, mask)
                    if wd.distributed:
                        # this micro-batch's global gradient is sum_r n_r g_r / N: weigh the local one by
                        # n_r / N now (N: a scalar all_sum), sum over ranks once after the last micro-batch
                        share = ntoks / mx.distributed.all_sum(ntoks, group=group)
                        g = tree_map(lambda a: a * share.astype(a.dtype), g)
                    grads = g if grads is None else tree_map(lambda a, b: a + b, grads, g)
                    step_loss, step_tokens = step_loss + loss * ntoks, step_tokens + ntoks
                    mx.eval(grads, step_loss, step_tokens)
                if wd.distributed:
                    grads, (step_loss, step_tokens) = dist.all_sum_tree((grads, [step_loss, step_tokens]), group)
                optimizer.update(model, tree_map(lambda a: a / accum, grads))
            mx.eval(state, step_loss, step_tokens)
            window_time += time.perf_counter() - tic
            n = step_tokens.item()
            losses += step_loss.item()
            window_tokens += n
            window_steps += 1
            if it % args.steps_per_report == 0 or it == args.iters:
                trained += int(window_tokens)
                train_loss = losses / max(window_tokens, 1.0)
                tps = window_tokens / max(window_time, 1e-9)
                peak = mx.get_peak_memory() / 1e9
                history["train"].append((it, train_loss))
                history["tokens_per_sec"].append(tps)
                history["peak_memory_gb"].append(peak)
                report(f"Iter {it}: Train loss {train_loss:.3f}, Learning Rate {_lr(optimizer):.3e}, "
                       f"It/sec {window_steps / max(window_time, 1e-9):.3f}, Tokens/sec {tps:.3f}, "
                       f"Trained Tokens {trained}, Peak mem {peak:.3f} GB")
                losses, window_tokens, window_steps, window_time = 0.0, 0.0, 0, 0.0
            if it % args.steps_per_eval == 0 or it == args.iters:
                validate(it)
            if args.adapter_file is not None and args.steps_per_save and it % args.steps_per_save == 0:
                snapshot = Path(args.adapter_file).parent / f"{it:07d}_{ADAPTER_FILE}"
                mx.eval(model.trainable_parameters())
                if wd.is_main:
                    save_adapters(model, args.adapter_file)
                    save_adapters(model, snapshot)
                dist.barrier(group)
                report(f"Iter {it}: Saved adapter weights to {args.adapter_file} and {snapshot}.")
        if args.adapter_file is not None:
            mx.eval(model.trainable_parameters())
            if wd.is_main:
                save_adapters(model, args.adapter_file)
            dist.barrier(group)
            report(f"Saved final weights to {args.adapter_file}.")
    finally:
        if args.grad_checkpoint:
            enable_grad_checkpoint(model, False)
    return history


# =============================================================================== optimizer
def build_schedule(cfg: dict):
    """mlx-lm's ``lr_schedule``: {name, arguments, warmup?, warmup_init?}."""
    if not isinstance(cfg, dict) or "name" not in cfg or "arguments" not in cfg:
        raise ValueError("lr_schedule needs 'name' and 'arguments' (e.g. name: cosine_decay, "
                         "arguments: [1e-5, 1000, 1e-7])")
    fn = getattr(optim.schedulers, str(cfg["name"]), None)
    if fn is None or str(cfg["name"]).startswith("_"):
        raise ValueError(f"lr_schedule: unknown schedule {cfg['name']!r}")
    arguments = cfg["arguments"]
    if not isinstance(arguments, list) or not arguments or \
            not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in arguments):
        raise ValueError(f"lr_schedule.arguments must be a list of numbers, got {arguments!r}")
    try:
        schedule = fn(*arguments)
        warmup = int(cfg.get("warmup", 0) or 0)
        if warmup:
            ramp = optim.schedulers.linear_schedule(float(cfg.get("warmup_init", 0.0)), arguments[0], warmup)
            schedule = optim.schedulers.join_schedules([ramp, schedule], [warmup + 1])
        schedule(0)
    except (TypeError, ValueError) as e:
        raise ValueError(f"lr_schedule: {e}") from None
    return schedule


OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD, "adafactor": optim.Adafactor}


def build_optimizer(name: str, learning_rate, optimizer_config: Optional[dict] = None):
    name = name.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    if not isinstance(optimizer_config or {}, dict):
        raise ValueError(f"optimizer_config must be a mapping of optimizer names to options, got {optimizer_config!r}")
    extra = (optimizer_config or {}).get(name, {}) or {}
    try:
        return OPTIMIZERS[name](learning_rate=learning_rate, **extra)
    except TypeError as e:
        raise ValueError(f"optimizer_config.{name}: {e}") from None


# =============================================================================== command line
class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m mlx_megalodon.lora",
                       description="LoRA, DoRA (and QLoRA on quantized models) or full fine-tuning of "
                                   "a Megalodon model.")
    p.add_argument("--model", help="MLX model directory, upstream checkpoint directory or Hub repo id")
    p.add_argument("--train", action="store_true", default=None, help="do training")
    p.add_argument("--data", help="directory with train.jsonl, valid.jsonl, test.jsonl (default: data)")
    p.add_argument("--fine-tune-type", choices=FINE_TUNE_TYPES, help="lora (default), dora or full")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), help="optimizer (default adam)")
    p.add_argument("--mask-prompt", action="store_true", default=None,
                   help="loss only on completion / assistant tokens")
    p.add_argument("--num-layers", type=int, help="fine-tune the last N layers (default 16 or all if "
                                                  "fewer; -1 for all)")
    p.add_argument("--batch-size", type=int, help="minibatch size (default 4)")
    p.add_argument("--iters", type=int, help="iterations (optimizer updates) to train for (default 1000)")
    p.add_argument("--val-batches", type=int, help="validation batches, -1 for the whole set (default 25)")
    p.add_argument("--learning-rate", type=float, help="learning rate (default 1e-5)")
    p.add_argument("--steps-per-report", type=int, help="steps between loss reports (default 10)")
    p.add_argument("--steps-per-eval", type=int, help="steps between validations (default 200)")
    p.add_argument("--grad-accumulation-steps", type=int, help="micro-batches per update (default 1)")
    p.add_argument("--resume-adapter-file", help="start from these adapter weights")
    p.add_argument("--adapter-path", help="where adapters are saved / loaded (default: adapters)")
    p.add_argument("--save-every", type=int, help="save adapters every N iterations (default 100)")
    p.add_argument("--test", action="store_true", default=None, help="evaluate on test.jsonl")
    p.add_argument("--test-batches", type=int, help="test batches, -1 for the whole set (default 500)")
    p.add_argument("--max-seq-length", type=int, help="longer examples are truncated (default 2048)")
    p.add_argument("-c", "--config", help="YAML file with the options (keys mirror the flags, plus "
                                          "lora_parameters, optimizer_config, lr_schedule)")
    p.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="recompute layer activations in the backward pass to save memory")
    p.add_argument("--compile", choices=COMPILE_CHOICES,
                   help="run each update through mx.compile: auto (default) on a GPU backend only, on, off")
    p.add_argument("--seed", type=int, help="PRNG seed (default 0)")
    return p


def _yaml_loader():
    """A SafeLoader that reads ``1e-5`` as a float (plain YAML 1.1 wants ``1.0e-5``)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
        [-+]?\d[\d_]*\.[\d_]*(?:[eE][-+]?\d+)?
       |[-+]?\d[\d_]*[eE][-+]?\d+
       |[-+]?\.\d[\d_]*(?:[eE][-+]?\d+)?
       |[-+]?\.(?:inf|Inf|INF)
       |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
    return Loader


def _read_yaml(path) -> dict:
    import yaml
    p = Path(path)
    try:
        cfg = yaml.load(p.read_text(), Loader=_yaml_loader())
    except OSError as e:
        raise ValueError(f"{p}: cannot read config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: malformed YAML ({' '.join(str(e).split())})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{p}: the config must be a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in cfg.items()}


def resolve_options(argv=None) -> dict:
    """Command line over YAML config over defaults (mlx-lm's precedence)."""
    args = vars(build_parser().parse_args(argv))
    if args.get("config"):
        cfg = _read_yaml(args["config"])
        for k, v in cfg.items():
            if k not in CONFIG_DEFAULTS:
                print(f"warning: {args['config']}: unknown option '{k}' ignored", file=sys.stderr)
                continue
            if args.get(k) is None:
                args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    lr = args["lora_parameters"]
    if not isinstance(lr, dict):
        raise ValueError(f"lora_parameters must be a mapping, got {lr!r}")
    args["lora_parameters"] = check_lora_parameters(lr)
    for name in ("batch_size", "iters", "max_seq_length", "steps_per_report", "steps_per_eval",
                 "grad_accumulation_steps"):
        v = args[name]
        if isinstance(v, bool) or not isinstance(v, int) or (v <= 0 and name != "iters") or v < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if args["max_seq_length"] < 2:
        raise ValueError(f"--max-seq-length must be at least 2, got {args['max_seq_length']}")
    for name in ("val_batches", "test_batches"):
        if isinstance(args[name], bool) or not isinstance(args[name], int) or args[name] < -1:
            raise ValueError(f"--{name.replace('_', '-')} must be -1 or a non-negative integer, got {args[name]!r}")
    if isinstance(args["save_every"], bool) or not isinstance(args["save_every"], int) or args["save_every"] < 0:
        raise ValueError(f"--save-every must be a non-negative integer, got {args['save_every']!r}")
    if isinstance(args["compile"], bool):        # YAML's true / false
        args["compile"] = "on" if args["compile"] else "off"
    if args["compile"] not in COMPILE_CHOICES:   # (a YAML config's value; the flag is checked by argparse)
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {args['compile']!r}")
    if args["fine_tune_type"] not in FINE_TUNE_TYPES:
        raise ValueError(f"fine_tune_type must be one of {', '.join(FINE_TUNE_TYPES)}, got {args['fine_tune_type']!r}")
    if not isinstance(args["learning_rate"], (int, float)) or isinstance(args["learning_rate"], bool):
        raise ValueError(f"--learning-rate must be a number, got {args['learning_rate']!r}")
    return args


def run(args: dict, report: Callable[[str], None] = print) -> dict:
    """Train and/or test as ``args`` (resolved options) say; returns the training history (if any)
    and the test loss under "test"."""
    from .utils import default_model_path, load
    if not args["train"] and not args["test"]:
        raise ValueError("nothing to do: give --train and/or --test")
    group = dist.init()       # under mlx.launch: data parallel over the launched ranks
    wd = dist.world(group)
    if not wd.is_main:
        report = lambda msg: None  # noqa: E731
    mx.random.seed(args["seed"])
    np.random.seed(args["seed"])
    report("Loading pretrained model")
    model, tokenizer = load(args["model"] if args["model"] is not None else default_model_path())
    report("Loading datasets")
    train_set, valid_set, test_set = load_datasets(args["data"], tokenizer, bool(args["train"]),
                                                   bool(args["test"]), bool(args["mask_prompt"]))
    result: dict = {}
    adapter_path = Path(args["adapter_path"])
    global_batch = args["batch_size"] * wd.size
    if wd.distributed:
        report(f"Data parallel over {wd.size} ranks: global batch {global_batch} "
               f"({args['batch_size']} per rank)")
    if args["train"]:
        if len(train_set) < global_batch:
            raise DataError(f"{train_set.path}: {len(train_set)} examples, fewer than --batch-size "
                            f"{args['batch_size']}" + (f" x {wd.size} ranks" if wd.distributed else ""))
        report("Training")
        n, params = prepare_model(model, args["fine_tune_type"], args["num_layers"], args["lora_parameters"])
        if args["resume_adapter_file"] is not None:
            report(f"Loading fine-tuned weights from {args['resume_adapter_file']}")
            load_adapter_weights(model, args["resume_adapter_file"], strict=True)
        report(trainable_parameter_line(model))
        config = {k: v for k, v in args.items()}
        config.update(num_layers=n, lora_parameters=params, model=str(config["model"]) if config["model"] else None)
        if wd.distributed:
            config.update(world_size=wd.size, global_batch_size=global_batch)
        if wd.is_main:
            adapter_path.mkdir(parents=True, exist_ok=True)
            save_adapter_config(config, adapter_path)
        lr = build_schedule(args["lr_schedule"]) if args["lr_schedule"] else args["learning_rate"]
        optimizer = build_optimizer(args["optimizer"], lr, args["optimizer_config"])
        targs = TrainingArgs(batch_size=args["batch_size"], iters=args["iters"], val_batches=args["val_batches"],
                             steps_per_report=args["steps_per_report"], steps_per_eval=args["steps_per_eval"],
                             steps_per_save=args["save_every"], max_seq_length=args["max_seq_length"],
                             adapter_file=adapter_path / ADAPTER_FILE, grad_checkpoint=bool(args["grad_checkpoint"]),
                             grad_accumulation_steps=args["grad_accumulation_steps"],
                             mask_prompt=bool(args["mask_prompt"]), seed=args["seed"],
                             compile={"auto": None, "on": True, "off": False}[args["compile"]])
        report(f"Starting training..., iters: {args['iters']}")
        result = train(model, optimizer, train_set, valid_set, targs, report, group)
    elif adapter_path.exists() and str(args["adapter_path"]) != "":
        load_adapters(model, adapter_path)
    if args["test"]:
        report("Testing")
        loss = evaluate(model, test_set, global_batch, args["test_batches"], args["max_seq_length"],
                        bool(args["mask_prompt"]), group)
        result["test"] = loss
        report(f"Test loss {loss:.3f}, Test ppl {math.exp(min(loss, 700)):.3f}.")
    return result


def main(argv=None) -> int:
    from .checkpoint import CheckpointError
    from .cpu_blas import warn_if_slow
    from .train import use_large_cuda_graphs
    use_large_cuda_graphs()   # before the first GPU evaluation (MLX reads it once)
    try:
        args = resolve_options(argv)
        if dist.world().rank == 0:
            warn_if_slow()
        run(args)
        return 0
    except (ValueError, OSError, KeyError, CheckpointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        rank = dist.world().rank
        print(f"error{f' (rank {rank})' if rank else ''}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
