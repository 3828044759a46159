"""Pretraining Megalodon on text: packed batches, AdamW + warmup/cosine, mixed precision, resumable.

    python -m mlx_megalodon.train --preset NAME | --config CFG.json | --model DIR \\
        --tokenizer tokenizer.model --train FILES... [--valid FILES...] --out DIR

Mixed precision: the trainer keeps float32 master weights (the optimizer updates those); each step
runs the model on a bfloat16 copy of them, except CEMA, the norms and the Q/K affine, which stay
float32 (``config.is_full_precision_key``); gradients flow back through the cast in float32.

Checkpoints (``DIR/checkpoints/step-NNNNNNNN``: master weights, optimizer state, step, data
position, loss history, the RNG re-seed point) are written to a temporary folder and renamed into
place, so a killed run leaves either the complete checkpoint or none; ``--resume`` continues from
the newest one with the same losses an uninterrupted run would have produced (the settings that
shape the run must match; ``--iters`` may grow to extend it).

Data parallelism: started by ``mlx.launch`` on several ranks (ring, JACCL, MPI or NCCL; see
docs/distributed.md) every rank trains on its rows ``rank::ranks`` of a global batch of
``--batch-size`` x ranks rows; gradients are token-weighted over the ranks with one fused
``all_sum`` per update (``distributed.reduce_step``), losses and validation are global, only rank 0
writes files, and checkpoints keep the data position in global rows, so ``--resume`` works with any
number of ranks that keeps the global batch.

The reusable pieces (``loss_fn``, ``build_optimizer``, ``lr_at``, ``Trainer``, ``train``,
``save_checkpoint`` / ``load_checkpoint``, ``write_model_dir``) take a model and arrays, not
command-line state.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from . import distributed as dist
from .config import ConfigError, ModelArgs, PRESETS, is_full_precision_key, parameter_count
from .cross_entropy_kernels import ce_kernel_wanted, cross_entropy_kernel, cross_entropy_ops
from .data import Batch, BatchIterator, DataError, PackedDataset, iterate_batches
from .flat_adamw import FlatAdamW, decoupled_decay

PROG = "megalodon-train"
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
# Training-state fields that must match for --resume to continue the same run.
RESUME_KEYS = ("seq_len", "batch_size", "grad_accum", "learning_rate", "min_lr_ratio", "warmup",
               "beta1", "beta2", "eps", "weight_decay", "grad_clip", "seed", "compute_dtype")


class TrainError(ValueError):
    """A training setting or state that cannot work; the message is one line."""


def resolve_compute_dtype(name: str) -> str:
    """``auto``: bfloat16 on a GPU (Metal, CUDA), float32 on MLX's CPU backend, where bf16 / fp16
    matmuls do not go through BLAS (about 8 GFLOP/s on this project's CPU, against 65 in float32
    with OpenBLAS; see mlx_megalodon.cpu_blas). Any other name is returned unchanged."""
    if name != "auto":
        return name
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    iters: Optional[int] = 1000         # None: planned from the time budget
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1           # cosine decays to learning_rate * min_lr_ratio
    warmup: int = 100
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0              # 0 disables clipping
    compute_dtype: str = "bfloat16"
    grad_checkpoint: bool = False
    compile: bool = True
    document_resets: bool = True        # packed documents do not see each other (segment ids)
    flat_optimizer: bool = False        # AdamW over flat buffers (flat_adamw.py): far fewer kernels
    val_every: int = 200                # 0: only the final validation
    val_batches: int = 20               # batches per periodic validation; 0: the whole set
    final_val_batches: int = 0          # 0: the whole validation set
    keep_best: bool = False             # end with the weights of the best validation (needs val_batches 0)
    save_every: int = 500               # 0: no periodic checkpoints
    keep_checkpoints: int = 2
    report_every: int = 10
    seed: int = 0
    time_budget_s: Optional[float] = None

    def validate(self) -> None:
        def positive_int(name, flag, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
                raise TrainError(f"{flag} must be a {'non-negative' if allow_zero else 'positive'} integer, got {v}")

        positive_int("seq_len", "--seq-len")
        positive_int("batch_size", "--batch-size")
        positive_int("grad_accum", "--grad-accum")
        if self.iters is not None:
            positive_int("iters", "--iters")
        positive_int("warmup", "--warmup", allow_zero=True)
        positive_int("val_every", "--val-every", allow_zero=True)
        positive_int("val_batches", "--val-batches", allow_zero=True)
        positive_int("final_val_batches", "--final-val-batches", allow_zero=True)
        positive_int("save_every", "--save-every", allow_zero=True)
        positive_int("keep_checkpoints", "--keep-checkpoints")
        positive_int("report_every", "--report-every")
        for name, flag in (("learning_rate", "--learning-rate"), ("eps", "--adam-eps")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise TrainError(f"{flag} must be a positive number, got {v}")
        for name, flag in (("weight_decay", "--weight-decay"), ("grad_clip", "--grad-clip")):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise TrainError(f"{flag} must be a non-negative number, got {v}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise TrainError(f"--{name} must be in [0, 1), got {v}")
        if self.compute_dtype not in DTYPES and self.compute_dtype != "auto":
            raise TrainError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.compute_dtype!r}")
        if self.time_budget_s is not None and not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise TrainError(f"--time-budget-s must be a positive number, got {self.time_budget_s}")
        if self.keep_best and (self.val_batches or self.final_val_batches):
            raise TrainError("--keep-best compares whole validation passes: use it with --val-batches 0")
        if self.iters is None and self.time_budget_s is None:
            raise TrainError("give --iters or --time-budget-s (or both)")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum


def check_seq_len(seq_len: int, chunk_size: int) -> None:
    """Megalodon's chunk-wise attention trains on sequences shorter than a chunk or made of whole
    chunks (upstream's rule)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise TrainError(f"--seq-len must be a positive integer, got {seq_len}")
    if seq_len > chunk_size and seq_len % chunk_size:
        lo = (seq_len // chunk_size) * chunk_size
        raise TrainError(f"--seq-len {seq_len} is not compatible with the model's chunk_size {chunk_size}: it "
                         f"must be at most {chunk_size} or a multiple of it (e.g. {lo} or {lo + chunk_size})")


# ----------------------------------------------------------------------------- loss, optimizer, schedule
def _chunked_cross_entropy(model, inputs, targets, segment_ids, piece: int) -> mx.array:
    """Per-token cross entropy (B x L) with the output projection and softmax done ``piece`` tokens
    at a time under ``mx.checkpoint``: only one piece's B x piece x vocab logits exist at once, in
    the forward and in the backward pass (the piece's logits are recomputed there)."""
    x = model.features(inputs, segment_ids)
    weight = model.output.head_weight(model.embed)

    def piece_ce(ts):  # targets are closed over: integer inputs of a checkpoint would need a VJP
        return mx.checkpoint(lambda w, xs: cross_entropy_ops(xs @ w.T, ts))

    L = inputs.shape[1]
    return mx.concatenate([piece_ce(targets[:, s:s + piece])(weight, x[:, s:s + piece])
                           for s in range(0, L, piece)], axis=1)


def _fused_loss_head(model, inputs: mx.array) -> Optional[mx.array]:
    """The output projection's vocab x model_dim weight when the loss should take the fused
    cross-entropy kernels (``ce_kernel_wanted``: on by default for CUDA) and the head is a plain
    matrix (nn.Linear without bias, or the shared nn.Embedding: not quantized, no
    adapter), else None."""
    if not hasattr(model, "features"):
        return None
    out = model.output
    head = out.output if "output" in out else model.embed
    if type(head) is not (nn.Linear if "output" in out else nn.Embedding) or "bias" in head:
        return None
    weight = out.head_weight(model.embed)
    if not ce_kernel_wanted((*inputs.shape, weight.shape[0]), weight.dtype):
        return None
    return weight


def loss_fn(model, inputs: mx.array, targets: mx.array, mask: Optional[mx.array] = None,
            segment_ids: Optional[mx.array] = None, loss_piece: int = 0) -> Tuple[mx.array, mx.array]:
    """Mean next-token cross entropy over the tokens where ``mask`` is 1 -> (loss, token count).
    With ``segment_ids`` the packed documents of a row do not see each other. ``loss_piece`` > 0
    (and shorter than the rows): project and score that many tokens at a time, so the B x L x vocab
    logits are never whole (same result; the head's matmul is recomputed in the backward pass).
    Otherwise, where the fused cross-entropy kernels are switched on (by default on CUDA;
    ``MEGALODON_CE_KERNEL=1`` / ``0`` forces), they score the compute-dtype logits without a float32 copy (the same loss up to float32
    rounding)."""
    chunked = 0 < loss_piece < inputs.shape[1] and hasattr(model, "features")
    head = None if chunked else _fused_loss_head(model, inputs)
    if chunked:
        ce = _chunked_cross_entropy(model, inputs, targets, segment_ids, loss_piece)
    elif head is not None:
        # Model.__call__'s logits (final norm, then the head) in the compute dtype, without its
        # float32 cast: the fused kernels read them as they are and accumulate in float32. Runs
        # inside mx.compile, so the targets are not validated here (the data pipeline's token ids
        # are in the vocabulary; an out-of-range one gives a NaN loss, never an out-of-bounds read).
        logits = model.features(inputs, segment_ids) @ head.T
        ce = cross_entropy_kernel(logits, targets, validate=False)   # _fused_loss_head decided
    else:
        ce = cross_entropy_ops(model(inputs, segment_ids=segment_ids), targets)
    if mask is None:
        ntoks = mx.array(ce.size, dtype=mx.float32)
        return ce.mean(), ntoks
    mask = mask.astype(mx.float32)
    ntoks = mask.sum()
    return (ce * mask).sum() / mx.maximum(ntoks, 1.0), ntoks


def default_decay_filter(path: str, param: mx.array) -> bool:
    """Weight decay on matrices (linear layers, the embedding), not on biases, norms, CEMA or the
    Q/K affine."""
    return param.ndim >= 2 and not is_full_precision_key(path)


class AdamW(optim.Adam):
    """AdamW (decoupled weight decay, bias-corrected moments as in PyTorch) that decays only the
    parameters ``decay_filter(path, param)`` selects."""

    def __init__(self, learning_rate, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 decay_filter: Callable[[str, mx.array], bool] = default_decay_filter,
                 bias_correction: bool = True):
        super().__init__(learning_rate, list(betas), eps, bias_correction)
        self.weight_decay = weight_decay
        self.decay_filter = decay_filter

    def apply_gradients(self, gradients: dict, parameters: dict):
        if not self._initialized:
            self.init(gradients)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        self.state["step"] = self.step + 1

        def one(path, g, p, s):
            if self.weight_decay and self.decay_filter(path, p):
                p = decoupled_decay(p, self.learning_rate, self.weight_decay)
            return self.apply_single(g, p, s)
        return tree_map_with_path(one, gradients, parameters, self.state)


def build_optimizer(cfg: TrainConfig, decay_filter=default_decay_filter) -> AdamW:
    """AdamW with the config's betas/eps/weight decay; the learning rate is set every step from
    :func:`lr_at` (a plain value in the optimizer state, so the schedule can be re-planned)."""
    kind = FlatAdamW if cfg.flat_optimizer else AdamW
    return kind(lr_at(0, cfg, cfg.iters), (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay, decay_filter)


def lr_at(step: int, cfg: TrainConfig, total: Optional[int]) -> float:
    """Learning rate for update number ``step`` (0-based): linear warmup over ``cfg.warmup`` updates,
    then cosine decay to ``learning_rate * min_lr_ratio`` at ``total`` (None: not planned yet, so
    no decay)."""
    base = cfg.learning_rate
    if cfg.warmup and step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    if total is None:
        return base
    progress = min(1.0, max(0.0, (step - cfg.warmup) / max(1, total - cfg.warmup)))
    return base * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cast_params(params, dtype: mx.Dtype):
    """A copy of a parameter tree in ``dtype``, full-precision keys (CEMA, norms, Q/K affine) kept."""
    if dtype == mx.float32:
        return params
    return tree_map_with_path(
        lambda path, v: v if is_full_precision_key(path) or not mx.issubdtype(v.dtype, mx.floating)
        else v.astype(dtype), params)


def _sum_of_squares(g: mx.array) -> mx.array:
    """In 4,096-element pieces for large arrays: on MLX's CPU backend one float32 sum over tens
    of millions of elements drops the small terms (FlatAdamW's flat gradients lost 20% of the
    squared norm)."""
    squares = mx.square(g.astype(mx.float32))   # no reshape below the size: one graph node per tensor saved
    while squares.size >= 1 << 22 and squares.size % 4096 == 0:
        squares = squares.reshape(-1, 4096).sum(axis=1)
    return squares.sum()


def global_norm(grads) -> mx.array:
    return mx.sqrt(sum(_sum_of_squares(g) for _, g in tree_flatten(grads)))


def clip_by_global_norm(grads, max_norm: float):
    norm = global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    scale = mx.minimum(1.0, max_norm / (norm + 1e-6))
    return tree_map(lambda g: g * scale.astype(g.dtype), grads), norm


# ----------------------------------------------------------------------------- gradient checkpointing
_CHECKPOINTED: Dict[type, type] = {}


def _checkpointed_class(base: type) -> type:
    if base not in _CHECKPOINTED:
        def __call__(self, x, cache=None, doc_starts=None):
            if cache is not None:
                return base.__call__(self, x, cache)

            starts = None if doc_starts is None else mx.stop_gradient(doc_starts)  # integer indices

            def inner(params, x):
                self.update(params)
                if starts is None:   # blocks without packed-row support (e.g. a baseline's) work too
                    return base.__call__(self, x, None)
                return base.__call__(self, x, None, doc_starts=starts)
            return mx.checkpoint(inner)(self.trainable_parameters(), x)
        _CHECKPOINTED[base] = type(f"Checkpointed{base.__name__}", (base,), {"__call__": __call__})
    return _CHECKPOINTED[base]


LOSS_PIECE = 4096   # tokens per piece of the output head + loss under --grad-checkpoint


def set_grad_checkpoint(model, enabled: bool = True) -> None:
    """Recompute each block's activations in the backward pass (``mx.checkpoint`` around every
    block) instead of keeping them: less memory, about a third more compute. Changes only these
    layer objects' class, so parameter names and other models are untouched."""
    for layer in model.layers:
        cls = type(layer)
        base = cls.__bases__[0] if cls in _CHECKPOINTED.values() else cls
        layer.__class__ = _checkpointed_class(base) if enabled else base


# ----------------------------------------------------------------------------- CUDA graph size
# MLX's CUDA backend closes a CUDA graph once its operations have read MLX_MAX_MB_PER_BUFFER
# megabytes (1000 on an H100/H200) and lets the host get only 10 graphs ahead of the GPU. A training
# step's operations each read ~100 MB, so its graphs are short and mx.async_eval returns only when
# the step is nearly done: the next step's graph build (7-11 ms for mega200M) then runs while the GPU
# idles. Bounded by operation count alone (100 per graph) the host stays about a third of a step
# ahead: on the H200 the step went from 239K to 248K tokens/s at 4K x 8 and from 235K to 242K at
# 32K x 1, with 7 GB more peak memory (BENCHMARKS.md, tenth session). Metal keeps MLX's own limits
# (not measured there).
CUDA_GRAPH_MB = 100_000


def use_large_cuda_graphs() -> bool:
    """Default ``MLX_MAX_MB_PER_BUFFER`` to :data:`CUDA_GRAPH_MB` on MLX's CUDA backend; a value
    already in the environment is kept. MLX reads the variable once, at the process's first GPU
    evaluation, so training entry points call this before anything is evaluated. True when it set
    the value."""
    from .kernels import gpu_backend
    if "MLX_MAX_MB_PER_BUFFER" in os.environ or gpu_backend() != "cuda":
        return False
    os.environ["MLX_MAX_MB_PER_BUFFER"] = str(CUDA_GRAPH_MB)
    return True


# ----------------------------------------------------------------------------- the step functions
class Trainer:
    """Owns the compiled train/eval steps for one model and optimizer.

    ``step(batches)`` runs one optimizer update over ``len(batches)`` micro-batches (gradient
    accumulation, weighted by token count) and returns lazy (loss, tokens, grad_norm) arrays.

    With a ``group`` of several ranks (data parallelism) each rank passes its own shard of the
    micro-batches; gradients, loss and token count are token-weighted over all ranks (one fused
    all_sum per update, :func:`distributed.reduce_step`), so every rank applies the same update.
    ``always_reduce`` runs that reduction even on one rank (benchmarks: the distributed path's cost).
    """

    def __init__(self, model, optimizer: AdamW, cfg: TrainConfig, group=None, always_reduce: bool = False):
        self.model = model
        self.optimizer = optimizer
        self.cfg = cfg
        self.group = dist.get_group(group)
        self.world = dist.world(self.group)
        group, distributed = self.group, self.world.distributed
        self.dtype = DTYPES[resolve_compute_dtype(cfg.compute_dtype)]
        self.last_eval_batch_s: Optional[float] = None
        if cfg.grad_checkpoint:
            set_grad_checkpoint(model, True)
        model.train()
        optimizer.init(model.trainable_parameters())
        flat = isinstance(optimizer, FlatAdamW)
        if flat:   # the model's weights become views of the optimizer's flat master buffers
            model.update(optimizer.bind(model.trainable_parameters(), self.dtype))
        self.state = [model.state, optimizer.state, mx.random.state]
        dtype, clip = self.dtype, cfg.grad_clip
        # Gradient checkpointing is the memory-saving mode: the output head and loss then also run in
        # pieces, so no B x L x vocab logits (4.2 GB in float32 for 32K tokens of a 32K vocabulary).
        loss_piece = LOSS_PIECE if cfg.grad_checkpoint else 0

        def loss_and_grads(inputs, targets, mask, segment_ids=None):
            # flat: gradients of the flat buffers, one vector per group (FlatAdamW's layout)
            params = optimizer.state["flat"]["p"] if flat else model.trainable_parameters()

            def f(p):
                model.update(optimizer.compute_parameters(p) if flat else cast_params(p, dtype))
                return loss_fn(model, inputs, targets, mask, segment_ids, loss_piece)
            (loss, ntoks), grads = mx.value_and_grad(f)(params)
            model.update(optimizer.layout.unflatten(params) if flat else params)
            return loss, ntoks, grads

        def fused_step(inputs, targets, mask, segment_ids=None):
            loss, ntoks, grads = loss_and_grads(inputs, targets, mask, segment_ids)
            if distributed or always_reduce:
                grads, loss, ntoks = dist.reduce_step(grads, loss, ntoks, group, force=always_reduce)
            grads, norm = clip_by_global_norm(grads, clip)
            optimizer.update(model, grads)
            return loss, ntoks, norm

        def apply_step(grads, scale):
            grads = tree_map(lambda g: g * scale, grads)
            grads, norm = clip_by_global_norm(grads, clip)
            optimizer.update(model, grads)
            return norm

        def eval_step(inputs, targets, mask, segment_ids=None):
            params = model.trainable_parameters()
            model.update(cast_params(params, dtype))
            loss, ntoks = loss_fn(model, inputs, targets, mask, segment_ids)
            model.update(params)
            return loss * ntoks, ntoks

        if cfg.compile:
            wrap = partial(mx.compile, inputs=self.state, outputs=self.state)
            self._fused, self._micro, self._apply = wrap(fused_step), wrap(loss_and_grads), wrap(apply_step)
            self._eval = partial(mx.compile, inputs=[model.state], outputs=[model.state])(eval_step)
        else:
            self._fused, self._micro, self._apply, self._eval = fused_step, loss_and_grads, apply_step, eval_step

    def _arrays(self, b: Batch):
        """A batch as step inputs (MLX arrays pass through: Batch.resident); packed rows carry segment
        ids so documents stay apart."""
        fields = [b.inputs, b.targets, b.mask]
        if self.cfg.document_resets and getattr(b, "segment_ids", None) is not None:
            fields.append(b.segment_ids)
        return tuple(v if isinstance(v, mx.array) else mx.array(v) for v in fields)

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)

    def step(self, batches: Sequence[Batch]):
        arrays = [self._arrays(b) for b in batches]
        if len(arrays) == 1 and self.cfg.compile:
            return self._fused(*arrays[0])
        # Uncompiled, even one micro-batch takes the path below: its gradients are evaluated before
        # the optimizer builds its new weights and moments, so the backward pass's buffers are freed
        # first instead of sharing the peak with them.
        acc, total, loss_sum = None, None, None
        for micro in arrays:
            loss, ntoks, grads = self._micro(*micro)
            grads = tree_map(lambda g: g * ntoks, grads)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            total = ntoks if total is None else total + ntoks
            loss_sum = loss * ntoks if loss_sum is None else loss_sum + loss * ntoks
            mx.eval(acc, total, loss_sum)   # bound memory: one micro-batch's graph at a time
        if self.world.distributed:          # token-weighted sums over all ranks, one fused all_sum
            summed = dist.all_sum_tree({"g": acc, "s": mx.stack([loss_sum, total])}, self.group)
            acc, loss_sum, total = summed["g"], summed["s"][0], summed["s"][1]
        norm = self._apply(acc, 1.0 / mx.maximum(total, 1.0))
        return loss_sum / mx.maximum(total, 1.0), total, norm

    def evaluate(self, dataset: PackedDataset, batch_size: int, max_batches: int = 0) -> Tuple[float, int]:
        """Mean loss over the first ``max_batches`` batches (0: all) of ``dataset`` in order. With
        several ranks ``batch_size`` is the global batch: each rank evaluates its rows of every
        batch and the sums are combined, so all ranks return the single-process value."""
        self.model.eval()
        total_loss, total_n = 0.0, 0
        times = []
        rank, size = self.world.rank, self.world.size
        try:
            for i, b in enumerate(iterate_batches(dataset, batch_size, shuffle=False, loop=False,
                                                  rank=rank, world_size=size)):
                if max_batches and i >= max_batches:
                    break
                if b.inputs.shape[0] == 0:   # this rank's share of a short last batch
                    continue
                t = time.perf_counter()
                s, n = self._eval(*self._arrays(b))
                mx.eval(s, n)
                total_loss += s.item()
                total_n += int(n.item())
                times.append(time.perf_counter() - t)
        finally:
            self.model.train()
        if times:  # the median leaves out a first call that compiled the eval step
            self.last_eval_batch_s = float(np.median(times))
        if size > 1:
            total_loss, n = dist.all_sum_scalars([total_loss, total_n], self.group)
            total_n = int(round(n))
        return (total_loss / total_n if total_n else float("nan")), total_n


# ----------------------------------------------------------------------------- checkpoints
def _write_atomic_dir(dst: Path, write: Callable[[Path], None]) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def save_checkpoint(directory, model, optimizer, state: dict) -> Path:
    """Write ``directory`` (e.g. .../step-00000100) atomically: model.safetensors (all model arrays,
    float32 masters), optimizer.safetensors (the flattened optimizer state) and trainer_state.json
    (``state``: step, data position, history, ...)."""
    def write(tmp: Path):
        mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        # FlatAdamW writes AdamW's per-parameter layout: checkpoints resume with either optimizer
        opt_state = optimizer.checkpoint_state() if isinstance(optimizer, FlatAdamW) else optimizer.state
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(opt_state)))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
    return _write_atomic_dir(Path(directory), write)


def list_checkpoints(checkpoint_dir) -> List[Path]:
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def latest_checkpoint(checkpoint_dir) -> Optional[Path]:
    found = list_checkpoints(checkpoint_dir)
    return found[-1] if found else None


def read_checkpoint_state(path) -> dict:
    path = Path(path)
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"{path}: unreadable checkpoint state ({e})") from None


def load_checkpoint(path, model, optimizer) -> dict:
    """Load weights and optimizer state from a checkpoint folder into ``model`` / ``optimizer``;
    returns its trainer state."""
    path = Path(path)
    state = read_checkpoint_state(path)
    try:
        weights = mx.load(str(path / "model.safetensors"))
        opt = mx.load(str(path / "optimizer.safetensors"))
    except Exception as e:
        raise TrainError(f"{path}: unreadable checkpoint ({' '.join(str(e).split())})") from None
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise TrainError(f"{path}: checkpoint does not fit the model ({' '.join(str(e).split())})") from None
    if getattr(optimizer, "layout", None) is not None:
        raise TrainError(f"{path}: load the checkpoint before building the Trainer (its optimizer is bound)")
    optimizer.state = tree_unflatten(list(opt.items()))
    optimizer.init(model.trainable_parameters())  # marks it initialized; keeps the loaded moments
    mx.eval(model.parameters(), optimizer.state)
    return state


def _reseed(seed: int, step: int) -> None:
    """The MLX RNG key from (seed, step): set at every checkpoint and on resume, so random ops
    (none today: no dropout) continue identically after a resume."""
    mx.random.seed((seed * 1_000_003 + step) % (2 ** 63))


# ----------------------------------------------------------------------------- the training loop
@dataclass
class TrainResult:
    step: int
    iters: int
    tokens: int
    elapsed_s: float
    stop_reason: str
    train_losses: List[Tuple[int, float]]
    val_history: List[Tuple[int, float]]
    final_val_loss: Optional[float] = None
    final_val_tokens: int = 0
    tokens_per_sec: float = 0.0
    best_step: Optional[int] = None     # set when keep_best restored an earlier step's weights

    @property
    def final_val_ppl(self) -> Optional[float]:
        return None if self.final_val_loss is None else math.exp(min(self.final_val_loss, 50.0))


class _Display:
    """Rich progress bar plus plain log lines; silent when ``quiet``."""

    def __init__(self, total: Optional[int], start: int, quiet: bool):
        self.quiet = quiet
        self.progress = None
        if quiet:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.console, transient=False,
                                 disable=not self.console.is_terminal)
        self.task = self.progress.add_task("train", total=total, completed=start, loss="-", tps="-")
        self.progress.start()

    def update(self, step: int, total: Optional[int], loss: float, tps: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, total=total, loss=f"{loss:.4f}",
                                 tps=f"{tps:,.0f}")

    def log(self, msg: str) -> None:
        if self.quiet:
            return
        if self.progress is not None and self.console.is_terminal:
            self.progress.console.print(msg, highlight=False)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def train(model, train_set: PackedDataset, valid_set: Optional[PackedDataset], cfg: TrainConfig, *,
          checkpoint_dir=None, resume: bool = False, deadline: Optional[float] = None,
          quiet: bool = False, on_step: Optional[Callable[[int, float], None]] = None,
          extra_state: Optional[dict] = None, group=None) -> TrainResult:
    """Train ``model`` in place. ``deadline`` (``time.perf_counter()`` seconds; default now +
    ``cfg.time_budget_s``) stops training cleanly in time for the final validation. With
    ``cfg.iters`` None the number of updates is planned from the time budget after a few steps.
    ``on_step(step, loss)`` is called after every update (tests use it to interrupt a run).

    Data parallelism: ``group`` (default: the global group of ``mx.distributed.init()``, a group
    of one without a launcher) with several ranks trains on global batches of ``cfg.batch_size``
    rows per rank; every rank calls ``train`` with the same arguments, only rank 0 logs and writes
    checkpoints, and losses, token counts and validation are global. Checkpoints store the data
    position in global rows, so ``resume`` works with any number of ranks that keeps the global
    batch (``batch_size * ranks``)."""
    cfg.validate()
    group = dist.get_group(group)
    wd = dist.world(group)
    main_rank = wd.is_main
    quiet = quiet or not main_rank
    global_batch = cfg.batch_size * wd.size
    check_seq_len(cfg.seq_len, model.args.chunk_size)
    if train_set.seq_len != cfg.seq_len or (valid_set is not None and valid_set.seq_len != cfg.seq_len):
        raise TrainError("datasets were packed with a different sequence length than --seq-len")
    t0 = time.perf_counter()
    if deadline is None and cfg.time_budget_s is not None:
        deadline = t0 + cfg.time_budget_s
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    optimizer = build_optimizer(cfg)
    iterator = BatchIterator(train_set, global_batch, cfg.seed, rank=wd.rank, world_size=wd.size)
    data_fp = train_set.stream.fingerprint()
    step, tokens, planned = 0, 0, cfg.iters
    train_losses: List[Tuple[int, float]] = []
    val_history: List[Tuple[int, float]] = []
    prior_elapsed = 0.0
    saved_step = None       # the step of the newest checkpoint this run wrote or resumed from
    if resume:
        latest = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
        if wd.distributed:  # every rank must resume from the same checkpoint (shared or copied OUT)
            seen = dist.gather_scalars([-1 if latest is None else int(CHECKPOINT_RE.match(latest.name).group(1))],
                                       group)[:, 0]
            if len(set(seen.tolist())) > 1:
                raise TrainError(f"--resume: the ranks see different newest checkpoints in {ckpt_dir} (steps "
                                 f"{', '.join(str(int(x)) if x >= 0 else 'none' for x in seen)} on ranks "
                                 f"0..{wd.size - 1}); put OUT on a shared filesystem or copy it to every host")
        if latest is None:
            raise TrainError(f"--resume: no checkpoint in {ckpt_dir}")
        state = load_checkpoint(latest, model, optimizer)
        saved = state.get("train_config", {})
        saved_world = int(state.get("world_size", 1))
        if "batch_size" in saved and saved["batch_size"] * saved_world != global_batch:
            raise TrainError(f"--resume: the global batch (batch_size x ranks) was {saved['batch_size']} x "
                             f"{saved_world} = {saved['batch_size'] * saved_world} rows in {latest.name}, now "
                             f"{cfg.batch_size} x {wd.size} = {global_batch}; choose --batch-size so that "
                             f"they match")
        if cfg.compute_dtype == "auto" and "compute_dtype" in saved:   # auto continues the run's dtype
            cfg.compute_dtype = saved["compute_dtype"]
        for key in RESUME_KEYS:
            if key == "batch_size":
                continue
            if key in saved and saved[key] != getattr(cfg, key):
                raise TrainError(f"--resume: {key} was {saved[key]!r} in {latest.name}, now {getattr(cfg, key)!r}; "
                                 f"resume with the same training settings")
        if state.get("data_fingerprint") not in (None, data_fp):
            raise TrainError(f"--resume: the training data differs from the data of {latest.name} "
                             f"(tokenized corpus fingerprint {state['data_fingerprint']} vs {data_fp})")
        iterator.load_state_dict(state["data"])
        step, tokens = int(state["step"]), int(state["tokens"])
        planned = state.get("planned_iters") if cfg.iters is None else cfg.iters
        train_losses = [tuple(x) for x in state.get("train_losses", [])]
        val_history = [tuple(x) for x in state.get("val_history", [])]
        prior_elapsed = float(state.get("elapsed_s", 0.0))
        saved_step = step
        _reseed(cfg.seed, step)
    else:
        _reseed(cfg.seed, 0)
    try:   # identical starting weights and optimizer state on every rank (same seed / checkpoint)
        dist.check_identical({"model": model.parameters(), "optimizer": optimizer.state}, group,
                             "weights" if not resume else "weights or optimizer state")
    except dist.DistributedError as e:
        raise TrainError(str(e)) from None

    cfg.compute_dtype = resolve_compute_dtype(cfg.compute_dtype)   # checkpoints record the dtype used
    trainer = Trainer(model, optimizer, cfg, group)
    val_bs = global_batch
    tokens_per_step = cfg.tokens_per_step * wd.size
    display = _Display(planned, step, quiet)
    if not quiet:
        display.log(f"{parameter_count(model.args):,} parameters; {len(train_set):,} training rows of "
                    f"{cfg.seq_len} tokens ({train_set.num_tokens:,} tokens), {tokens_per_step:,} tokens/step"
                    + (f" over {wd.size} ranks (global batch {global_batch} rows)" if wd.distributed else "")
                    + (f"; resuming at step {step}" if step else ""))

    def state_dict(elapsed: float) -> dict:
        return {"step": step, "tokens": tokens, "planned_iters": planned, "data": iterator.state_dict(),
                "data_fingerprint": data_fp, "train_config": dataclasses.asdict(cfg), "world_size": wd.size,
                "global_batch_size": global_batch,
                "model_args": model.args.to_dict(), "train_losses": train_losses, "val_history": val_history,
                "elapsed_s": elapsed, **(extra_state or {})}

    def checkpoint() -> None:
        nonlocal saved_step
        mx.eval(trainer.state)
        if main_rank:
            save_checkpoint(ckpt_dir / f"step-{step:08d}", model, optimizer,
                            state_dict(prior_elapsed + time.perf_counter() - t0))
            for old in list_checkpoints(ckpt_dir)[:-cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier(group)     # nobody runs ahead of (or reads before) the complete checkpoint
        saved_step = step
        _reseed(cfg.seed, step)

    # Decisions taken from a clock (time budget) must be the same on every rank: rank 0's count.
    agree = (lambda v: dist.broadcast_scalar(v, group)) if wd.distributed else (lambda v: v)

    step_times: List[float] = []
    eval_time_per_batch: Optional[float] = None
    n_final_val = 0
    if valid_set is not None and len(valid_set):
        n_val_rows = len(valid_set)
        n_final_val = -(-n_val_rows // val_bs)
        if cfg.final_val_batches:
            n_final_val = min(n_final_val, cfg.final_val_batches)

    def eval_batch_s() -> float:
        if eval_time_per_batch is not None:
            return eval_time_per_batch
        return 0.4 * float(np.median(step_times)) / cfg.grad_accum if step_times else 0.0

    # Time kept for the final validation: its estimate, but at most a fifth of the training time
    # (the final validation is trimmed to what is left, see below).
    reserve_cap = 0.2 * (deadline - t0) if deadline is not None else float("inf")

    def reserve_s() -> float:
        return 1.0 + min(1.3 * eval_batch_s() * n_final_val, reserve_cap)

    best = None   # (step, validation loss, parameters) for keep_best
    plan_at = step + 12
    stop_reason = "iterations done"
    window_t, window_tokens = time.perf_counter(), 0
    pending = None   # (step, loss array, ntoks array): read one step late so the device stays busy
    last_loss = float("nan")

    def settle(p) -> None:
        nonlocal last_loss
        s, loss_a, _ = p
        last_loss = float(loss_a.item())
        if not math.isfinite(last_loss):
            raise TrainError(f"loss became {last_loss} at step {s}; lower --learning-rate or check the data")
        train_losses.append((s, last_loss))
        if on_step is not None:
            on_step(s, last_loss)

    try:
        last_t = time.perf_counter()
        while planned is None or step < planned:
            now = time.perf_counter()
            if deadline is not None and step_times:
                if agree(float(now + float(np.median(step_times[-20:])) + reserve_s() > deadline)):
                    stop_reason = "time budget reached"
                    break
            trainer.set_learning_rate(lr_at(step, cfg, planned))
            batches = [next(iterator) for _ in range(cfg.grad_accum)]
            loss, ntoks, _norm = trainer.step(batches)
            mx.async_eval(trainer.state, loss, ntoks)
            step += 1
            # packed rows count every token and every rank holds the same number of rows
            step_tokens = sum(b.num_tokens for b in batches) * wd.size
            tokens += step_tokens
            window_tokens += step_tokens
            if pending is not None:
                settle(pending)
            pending = (step, loss, ntoks)
            t = time.perf_counter()
            step_times.append(t - last_t)
            last_t = t
            if len(step_times) == 2:       # drop the first (compilation) steps from the timing
                step_times = step_times[1:]

            # plan the schedule from the measured speed
            if planned is None and step >= plan_at and deadline is not None:
                settle(pending)
                pending = None
                per_step = float(np.median(step_times[-10:]))
                val_cost = 0.0
                if cfg.val_every and valid_set is not None:
                    nb = cfg.val_batches or n_final_val
                    val_cost = 0.4 * per_step / cfg.grad_accum * nb / cfg.val_every
                budget = deadline - time.perf_counter() - reserve_s()
                planned = max(step + 1, step + int(0.97 * budget / (per_step + val_cost)))
                if planned <= cfg.warmup:
                    planned = cfg.warmup + 1
                planned = int(round(agree(planned)))
                display.log(f"time budget: planned {planned} steps ({per_step * 1000:.0f} ms/step)")

            report = step % cfg.report_every == 0 or step == planned
            do_val = cfg.val_every and step % cfg.val_every == 0 and valid_set is not None and len(valid_set) \
                and step != planned
            do_save = bool(ckpt_dir is not None and cfg.save_every and step % cfg.save_every == 0)
            if report or do_val or do_save:
                if pending is not None:
                    settle(pending)
                    pending = None
            if report:
                dt = time.perf_counter() - window_t
                tps = window_tokens / dt if dt > 0 else 0.0
                window_t, window_tokens = time.perf_counter(), 0
                display.update(step, planned, last_loss, tps)
                display.log(f"step {step}{'/' + str(planned) if planned else ''}: loss {last_loss:.4f}, "
                            f"lr {lr_at(step - 1, cfg, planned):.2e}, {tps:,.0f} tok/s, "
                            f"{prior_elapsed + time.perf_counter() - t0:.0f}s")
            if do_val:
                est = (eval_time_per_batch or 0.0) * (cfg.val_batches or n_final_val)
                if deadline is None or agree(float(time.perf_counter() + est + reserve_s() < deadline)):
                    vloss, n = trainer.evaluate(valid_set, val_bs, cfg.val_batches)
                    eval_time_per_batch = trainer.last_eval_batch_s
                    val_history.append((step, vloss))
                    display.log(f"step {step}: validation loss {vloss:.4f}, perplexity {math.exp(min(vloss, 50)):.2f}")
                    if cfg.keep_best and (best is None or vloss < best[1]):
                        best = (step, vloss, model.parameters())   # references: updates make new arrays
                last_t = time.perf_counter()
            if do_save:
                checkpoint()
                last_t = time.perf_counter()
        if pending is not None:
            settle(pending)
            pending = None
    finally:
        display.close()

    if ckpt_dir is not None and cfg.save_every and step and saved_step != step:
        checkpoint()
    train_time = time.perf_counter() - t0
    result = TrainResult(step=step, iters=planned or step, tokens=tokens, elapsed_s=prior_elapsed + train_time,
                         stop_reason=stop_reason, train_losses=train_losses, val_history=val_history)
    if step_times:
        result.tokens_per_sec = tokens_per_step / float(np.median(step_times))
    if valid_set is not None and len(valid_set):
        n_batches = cfg.final_val_batches
        if deadline is not None and eval_batch_s() > 0:
            fit = max(1, int((deadline - time.perf_counter() - 0.5) / (1.1 * eval_batch_s())))
            fit = max(1, int(round(agree(fit))))
            if fit < n_final_val:
                n_batches = fit
                display.log(f"final validation trimmed to {fit} of {n_final_val} batches to fit the time budget")
        vloss, n = trainer.evaluate(valid_set, val_bs, n_batches)
        result.final_val_loss, result.final_val_tokens = vloss, n
        if not val_history or val_history[-1][0] != step:
            val_history.append((step, vloss))
        if not quiet:
            display.log(f"final validation ({n:,} tokens): loss {vloss:.4f}, perplexity {result.final_val_ppl:.2f}")
        if best is not None and best[1] < vloss and n_batches == cfg.final_val_batches and best[0] != step:
            model.update(best[2])
            result.best_step, result.final_val_loss = best[0], best[1]
            display.log(f"keeping the weights of step {best[0]} (validation loss {best[1]:.4f} < {vloss:.4f})")
    if cfg.grad_checkpoint:
        set_grad_checkpoint(model, False)
    model.eval()
    return result


# ----------------------------------------------------------------------------- output
def _atomic_file(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}.{path.name}")  # keeps the suffix
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_weights(model, dtype: mx.Dtype = mx.bfloat16) -> Dict[str, mx.array]:
    """The model's arrays as they go to disk: floating weights in ``dtype`` except the
    full-precision keys (as ``utils.cast_model``), buffers as they are."""
    return {k: v if is_full_precision_key(k) or not mx.issubdtype(v.dtype, mx.floating) else v.astype(dtype)
            for k, v in tree_flatten(model.parameters())}


def write_model_dir(model, tokenizer_path, out_dir, dtype: mx.Dtype = mx.bfloat16,
                    max_file_bytes: Optional[int] = None) -> Path:
    """Write (or overwrite) the MLX model files in ``out_dir``: config.json, model.safetensors and
    tokenizer.model, each replaced atomically; with ``max_file_bytes`` the weights are split into
    model-0000i-of-0000n.safetensors + model.safetensors.index.json shards no larger than that.
    Other files in ``out_dir`` (checkpoints, logs) are left alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = save_weights(model, dtype)
    mx.eval(weights)
    total = sum(v.nbytes for v in weights.values())
    shards: List[Dict[str, mx.array]] = [{}]
    if max_file_bytes and total > max_file_bytes:
        size = 0
        for k, v in weights.items():
            if shards[-1] and size + v.nbytes > max_file_bytes - 65536:  # header room
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += v.nbytes
    for stale in list(out.glob("model-*-of-*.safetensors")) + [out / "model.safetensors.index.json",
                                                                out / "model.safetensors"]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_file(out / "model.safetensors",
                     lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "mlx"}))
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            _atomic_file(out / name, lambda p, s=shard: mx.save_safetensors(str(p), s, metadata={"format": "mlx"}))
            weight_map.update({k: name for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_file(out / "model.safetensors.index.json", lambda p: p.write_text(json.dumps(index, indent=2) + "\n"))
    if tokenizer_path is not None and Path(tokenizer_path).resolve() != (out / "tokenizer.model").resolve():
        _atomic_file(out / "tokenizer.model", lambda p: shutil.copyfile(tokenizer_path, p))
    _atomic_file(out / "config.json", lambda p: p.write_text(json.dumps(model.args.to_dict(), indent=2) + "\n"))
    return out


def plot_losses(result: TrainResult, path, title: str = "Megalodon training") -> Optional[Path]:
    """PNG of the training loss (raw and smoothed) and validation loss; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if result.train_losses:
        s, l = np.array(result.train_losses, dtype=np.float64).T
        ax.plot(s, l, color="tab:blue", alpha=0.25, lw=0.8, label="train")
        if len(l) > 5:
            ema, acc = np.empty_like(l), l[0]
            a = min(0.5, 10.0 / len(l))
            for i, v in enumerate(l):
                acc = (1 - a) * acc + a * v
                ema[i] = acc
            ax.plot(s, ema, color="tab:blue", lw=1.6, label="train (smoothed)")
    if result.val_history:
        s, l = np.array(result.val_history, dtype=np.float64).T
        ax.plot(s, l, "o-", color="tab:orange", ms=3.5, lw=1.2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    sub = f"{result.tokens:,} tokens"
    if result.final_val_loss is not None:
        sub += f"; final validation loss {result.final_val_loss:.3f}, perplexity {result.final_val_ppl:.2f}"
    ax.set_title(f"{title}\n{sub}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    _atomic_file(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- model set-up
def model_args_from(preset_name: Optional[str], config_path: Optional[str], vocab_size: int) -> ModelArgs:
    """``--preset`` and/or ``--config`` (a JSON object of ModelArgs fields, or an upstream config with a
    "model" section; its fields override the preset's). vocab_size defaults to the tokenizer's."""
    fields: dict = {}
    if preset_name is not None:
        if preset_name not in PRESETS:
            raise ConfigError(f"unknown --preset '{preset_name}' (known: {', '.join(PRESETS)})")
        fields.update(PRESETS[preset_name])
    if config_path is not None:
        try:
            cfg = json.loads(Path(config_path).read_text())
        except OSError as e:
            raise ConfigError(f"{config_path}: cannot read ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        upstream = isinstance(cfg, dict) and isinstance(cfg.get("model"), dict)
        if upstream:
            cfg = {k: v for k, v in cfg["model"].items() if k in {f.name for f in dataclasses.fields(ModelArgs)}}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{config_path}: expected a JSON object of model fields")
        unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(ModelArgs)})
        if unknown:
            raise ConfigError(f"{config_path}: unknown model field(s) {', '.join(unknown)}")
        fields.update(cfg)
    if fields.get("vocab_size", -1) in (-1, None):
        fields["vocab_size"] = vocab_size
    elif fields["vocab_size"] < vocab_size:
        raise ConfigError(f"model vocab_size {fields['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    try:
        return ModelArgs.from_dict(fields)
    except TypeError as e:
        raise ConfigError(f"{config_path or preset_name}: {e}") from None


def new_model(args: ModelArgs, seed: int = 0):
    from .mega import Model
    mx.random.seed(seed)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def to_float32(model) -> None:
    """Master weights in float32 (e.g. after loading a bfloat16 model directory)."""
    model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                          model.trainable_parameters()))
    mx.eval(model.parameters())


# ----------------------------------------------------------------------------- command line
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Pretrain a Megalodon model on text or jsonl files.")
    src = p.add_argument_group("model")
    src.add_argument("--preset", help=f"model preset ({', '.join(PRESETS)})")
    src.add_argument("--config", help="JSON file of ModelArgs fields (override the preset's)")
    src.add_argument("--model", help="continue training an MLX model directory")
    src.add_argument("--tokenizer", help="SentencePiece model (default: the --model directory's)")
    d = p.add_argument_group("data")
    d.add_argument("--train", nargs="+", required=True, metavar="PATH",
                   help="text files (one document each), .jsonl files ({\"text\": ...} per line) or directories")
    d.add_argument("--valid", nargs="+", metavar="PATH", help="validation files (default: hold out --val-fraction)")
    d.add_argument("--val-fraction", type=float, default=0.05,
                   help="tail of the training tokens held out when --valid is not given (0: no validation)")
    d.add_argument("--text-key", default="text")
    d.add_argument("--max-doc-chars", type=int, default=None, help="reject documents longer than this")
    d.add_argument("--cache-dir", help="keep tokenized corpora here (default: OUT/data-cache)")
    o = p.add_argument_group("optimization")
    o.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: the model's chunk_size)")
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update")
    o.add_argument("--iters", type=int, default=None, help="updates (default 1000, or planned from --time-budget-s)")
    o.add_argument("--learning-rate", "--lr", type=float, default=3e-4)
    o.add_argument("--min-lr-ratio", type=float, default=0.1)
    o.add_argument("--warmup", type=int, default=100)
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.95)
    o.add_argument("--adam-eps", type=float, default=1e-8)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0, help="global gradient norm clip (0: off)")
    o.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="compute dtype (auto: bfloat16 on a GPU, float32 on the CPU backend)")
    o.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations in backward")
    o.add_argument("--no-compile", action="store_true", help="do not mx.compile the train step")
    o.add_argument("--flat-optimizer", action="store_true",
                   help="AdamW over flat float32 buffers: one update for all weights instead of one per tensor, "
                        "far fewer kernels per step (checkpoints are the same either way)")
    o.add_argument("--no-document-resets", action="store_true",
                   help="let packed documents see each other (faster: keeps the CEMA kernel path)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--time-budget-s", type=float, default=None, help="stop training cleanly after this long")
    r = p.add_argument_group("output")
    r.add_argument("--out", required=True, help="output MLX model directory (checkpoints under OUT/checkpoints)")
    r.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")
    r.add_argument("--save-every", type=int, default=500)
    r.add_argument("--keep-checkpoints", type=int, default=2)
    r.add_argument("--val-every", type=int, default=200)
    r.add_argument("--val-batches", type=int, default=20, help="batches per periodic validation (0: all)")
    r.add_argument("--keep-best", action="store_true",
                   help="end with the weights of the best validation (with --val-batches 0)")
    r.add_argument("--report-every", type=int, default=10)
    r.add_argument("--save-dtype", default="bfloat16", choices=tuple(DTYPES))
    r.add_argument("--quiet", action="store_true")
    return p


def config_from_args(a, seq_len: int) -> TrainConfig:
    iters = a.iters if a.iters is not None else (None if a.time_budget_s is not None else 1000)
    return TrainConfig(seq_len=seq_len, batch_size=a.batch_size, grad_accum=a.grad_accum, iters=iters,
                       learning_rate=a.learning_rate, min_lr_ratio=a.min_lr_ratio, warmup=a.warmup,
                       beta1=a.beta1, beta2=a.beta2, eps=a.adam_eps, weight_decay=a.weight_decay,
                       grad_clip=a.grad_clip, compute_dtype=a.dtype, grad_checkpoint=a.grad_checkpoint,
                       compile=not a.no_compile, document_resets=not a.no_document_resets,
                       flat_optimizer=a.flat_optimizer, val_every=a.val_every, val_batches=a.val_batches,
                       keep_best=a.keep_best, save_every=a.save_every, keep_checkpoints=a.keep_checkpoints,
                       report_every=a.report_every, seed=a.seed, time_budget_s=a.time_budget_s)


def run(a) -> TrainResult:
    """The CLI. Under ``mlx.launch`` (several ranks) every rank runs this with the same flags: all
    read the data and the tokenizer themselves (their paths must exist on every host), rank 0
    writes OUT (tokenizer copy, checkpoints, model, log, plot) and the others wait for it;
    ``--resume`` needs OUT's checkpoints on every rank (shared filesystem or a copy)."""
    from .tokenizer import Tokenizer, load_tokenizer
    from .utils import load_model
    group = dist.init()
    wd = dist.world(group)
    main_rank = wd.is_main
    out = Path(a.out)
    ckpt_dir = out / "checkpoints"
    if a.val_fraction is not None and not 0.0 <= a.val_fraction < 1.0:
        raise TrainError(f"--val-fraction must be in [0, 1), got {a.val_fraction}")
    if a.max_doc_chars is not None and a.max_doc_chars <= 0:
        raise TrainError(f"--max-doc-chars must be positive, got {a.max_doc_chars}")

    # the model and its tokenizer
    if a.resume:
        latest = latest_checkpoint(ckpt_dir)
        if latest is None:
            raise TrainError(f"--resume: no checkpoint in {ckpt_dir}")
        args = ModelArgs.from_dict(read_checkpoint_state(latest)["model_args"])
        tok_path = out / "tokenizer.model"
        if not tok_path.is_file():
            raise TrainError(f"--resume: {tok_path} is missing")
        tokenizer = Tokenizer(tok_path)
        model = new_model(args, a.seed)
    else:
        if list_checkpoints(ckpt_dir):
            raise TrainError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
        if a.model is not None and (a.preset or a.config):
            raise TrainError("give --model, or --preset/--config, not both")
        if a.model is None and not (a.preset or a.config):
            raise TrainError("give the model: --preset NAME, --config CFG.json or --model DIR")
        if a.model is not None:
            model, tok_file = load_model(a.model)
            if model.args.quantization:
                raise TrainError(f"{a.model}: a quantized model cannot be trained; start from the unquantized one")
            to_float32(model)
            tokenizer = load_tokenizer(a.tokenizer or tok_file or a.model)
            if tokenizer.vocab_size > model.args.vocab_size:
                raise TrainError(f"tokenizer has {tokenizer.vocab_size} ids, the model only {model.args.vocab_size}")
        else:
            if a.tokenizer is None:
                raise TrainError("--tokenizer is required with --preset/--config")
            tokenizer = load_tokenizer(a.tokenizer)
            model = new_model(model_args_from(a.preset, a.config, tokenizer.vocab_size), a.seed)
        if main_rank:   # the other ranks keep reading the tokenizer from where it was given
            out.mkdir(parents=True, exist_ok=True)
            if tokenizer.path.resolve() != (out / "tokenizer.model").resolve():
                _atomic_file(out / "tokenizer.model", lambda p: shutil.copyfile(tokenizer.path, p))
            tokenizer = Tokenizer(out / "tokenizer.model", tokenizer.additional_vocab_size)

    seq_len = a.seq_len if a.seq_len is not None else model.args.chunk_size
    check_seq_len(seq_len, model.args.chunk_size)
    cfg = config_from_args(a, seq_len)
    cfg.validate()

    # the data: rank 0 tokenizes first (and fills the cache); the others then find it in the cache
    # on a shared filesystem, or tokenize for themselves
    from .data import load_token_stream
    cache_dir = Path(a.cache_dir) if a.cache_dir else out / "data-cache"

    def load_streams():
        s = load_token_stream(a.train, tokenizer, cache_dir, a.text_key, a.max_doc_chars)
        v = load_token_stream(a.valid, tokenizer, cache_dir, a.text_key, a.max_doc_chars) if a.valid else None
        return s, v
    if main_rank:
        stream, valid_stream = load_streams()
    dist.barrier(group)
    if not main_rank:
        stream, valid_stream = load_streams()
    if not a.valid:
        stream, valid_stream = stream.split_tail(a.val_fraction) if a.val_fraction else (stream, None)
    train_set = PackedDataset(stream, seq_len)
    if len(train_set) == 0:
        raise DataError(f"{a.train[0]}{'...' if len(a.train) > 1 else ''}: {len(stream)} training tokens, fewer "
                        f"than --seq-len + 1 = {seq_len + 1}")
    valid_set = PackedDataset(valid_stream, seq_len) if valid_stream is not None else None
    if valid_set is not None and len(valid_set) == 0:
        if not a.quiet and main_rank:
            print(f"{PROG}: note: validation data has fewer than {seq_len + 1} tokens; validation skipped",
                  file=sys.stderr)
        valid_set = None

    result = train(model, train_set, valid_set, cfg, checkpoint_dir=ckpt_dir, resume=a.resume, quiet=a.quiet,
                   group=group)
    if not main_rank:
        dist.barrier(group)     # until rank 0 has written the outputs
        return result
    write_model_dir(model, out / "tokenizer.model", out, DTYPES[a.save_dtype])
    log = {"step": result.step, "iters": result.iters, "tokens": result.tokens, "elapsed_s": result.elapsed_s,
           "stop_reason": result.stop_reason, "tokens_per_sec": result.tokens_per_sec,
           "final_val_loss": result.final_val_loss, "final_val_ppl": result.final_val_ppl,
           "train_losses": result.train_losses, "val_history": result.val_history,
           "train_config": dataclasses.asdict(cfg), "model_args": model.args.to_dict(),
           "world_size": wd.size, "global_batch_size": cfg.batch_size * wd.size}
    _atomic_file(out / "train_log.json", lambda p: p.write_text(json.dumps(log) + "\n"))
    png = plot_losses(result, out / "loss.png")
    dist.barrier(group)
    if not a.quiet:
        ppl = f", validation perplexity {result.final_val_ppl:.2f}" if result.final_val_loss is not None else ""
        print(f"{PROG}: {result.stop_reason} at step {result.step}: {result.tokens:,} tokens in "
              f"{result.elapsed_s:.0f}s ({result.tokens_per_sec:,.0f} tok/s){ppl}; model written to {out}"
              + (f", loss curves in {png}" if png else ""), file=sys.stderr)
    return result


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    use_large_cuda_graphs()   # before the first GPU evaluation (MLX reads it once)
    from .checkpoint import CheckpointError
    from .cpu_blas import warn_if_slow
    from .tokenizer import TokenizerError
    if dist.world().rank == 0:
        warn_if_slow()
    try:
        run(a)
    except (TrainError, DataError, ConfigError, CheckpointError, TokenizerError) as e:
        rank = dist.world().rank
        print(f"{PROG}: error{f' (rank {rank})' if rank else ''}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; continue with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
