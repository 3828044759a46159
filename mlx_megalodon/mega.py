"""The Megalodon language model in MLX, keyed like upstream's ``Mega`` state_dict.

Follows mlx-lm's model contract: ``Model(args)``, ``model(inputs, cache=None)`` -> logits,
``make_cache()``, ``layers`` and ``sanitize(weights)``. Training on packed rows:
``model(inputs, segment_ids=...)`` keeps the documents of a row from seeing each other.
"""
from __future__ import annotations

import math
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import MegalodonCache, TimestepNormCache
from .config import ModelArgs
from .kernel_check import ensure_kernels_work
from .moving_average_gated_attention import MovingAverageGatedAttention
from .normalized_feedforward_network import NormalizedFeedForwardNetwork
from .timestep_norm import TimestepNorm, TimestepNormState


def document_starts(segment_ids: mx.array, shape=None) -> mx.array:
    """B x L segment ids -> B x L int32: the index of the first token of each token's document
    (a document starts at t = 0 and wherever the id changes). Pure array ops, no host sync."""
    segment_ids = mx.array(segment_ids) if not isinstance(segment_ids, mx.array) else segment_ids
    if segment_ids.ndim != 2 or (shape is not None and tuple(segment_ids.shape) != tuple(shape)):
        want = "batch x length" if shape is None else f"the inputs' shape {tuple(shape)}"
        raise ValueError(f"segment_ids must have shape {want}, got {tuple(segment_ids.shape)}")
    B, L = segment_ids.shape
    t = mx.arange(L, dtype=mx.int32)
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    is_start = mx.concatenate([mx.ones((B, 1), dtype=mx.bool_), changed], axis=1)
    return mx.cummax(mx.where(is_start, t, 0), axis=1)


class MegaBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.mega = MovingAverageGatedAttention(args)
        self.nffn = NormalizedFeedForwardNetwork(args, layer_id)

    def __call__(self, x: mx.array, cache: Optional[MegalodonCache] = None,
                 doc_starts: Optional[mx.array] = None, exchange=None) -> mx.array:
        if exchange is not None:
            return self.nffn(self.mega(x, exchange=exchange), x)
        if doc_starts is None:
            return self.nffn(self.mega(x, cache), x)
        return self.nffn(self.mega(x, cache, doc_starts=doc_starts), x)


class MegaOutputLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.final_norm = TimestepNorm(args.model_dim, args.norm_num_groups, eps=args.norm_eps)
        if not args.share_emb:
            self.output = nn.Linear(args.model_dim, args.output_dim, bias=False)

    def __call__(self, x, embed: nn.Embedding, cache: Optional[TimestepNormCache] = None, last_only=False,
                 doc_starts: Optional[mx.array] = None, exchange=None):
        state = None if cache is None else cache.norm
        if exchange is not None:
            state = exchange.norm_state(self.final_norm, x)
        x, state = self.final_norm(x, state, doc_starts)
        if cache is not None:
            cache.norm = state
            cache.offset += x.shape[1]
        if last_only:
            x = x[:, -1:]
        return self.output(x) if "output" in self else embed.as_linear(x)

    def head_weight(self, embed: nn.Embedding) -> mx.array:
        """The vocab x model_dim matrix of the output projection (the embedding when shared)."""
        return self.output.weight if "output" in self else embed.weight


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        ensure_kernels_work()   # once per process, and only on a GPU backend nobody has measured
        self.args = args
        self.model_type = args.model_type
        self.embed = nn.Embedding(args.vocab_size, args.model_dim)
        self.layers = [MegaBlock(args, i) for i in range(args.num_layers)]
        self.output = MegaOutputLayer(args)
        self._compiled_step = None

    def __call__(self, inputs: mx.array, cache: Optional[List] = None, *, last_only: bool = False,
                 segment_ids: Optional[mx.array] = None, exchange=None) -> mx.array:
        """inputs: B x L token ids -> B x L x vocab logits (float32); B x 1 x vocab with
        ``last_only`` (prompt ingestion needs only the next-token distribution).

        ``segment_ids`` (B x L ints, full forward only: no cache): rows packed from several
        documents, numbered along each row (non-decreasing; a change from t-1 to t starts a document
        at t, and t = 0 always starts one). Every document is then processed exactly as if it were
        its own sequence: CEMA and TimestepNorm restart, chunks and RoPE positions count from the
        document's start, attention stays inside it. All zeros gives the plain call's result.

        ``exchange`` (full forward only): ``inputs`` is this rank's span of a sequence split over
        ranks (see ``chunk_parallel.chunk_parallel_logits``)."""
        if exchange is not None:
            if cache is not None or segment_ids is not None or last_only:
                raise ValueError("exchange (chunk-parallel spans) takes no cache, segment_ids or last_only")
            h = self.embed(inputs)
            if self.args.scale_emb:
                h = h * math.sqrt(self.args.model_dim)
            for layer in self.layers:
                h = layer(h, exchange=exchange)
            return self.output(h, self.embed, exchange=exchange).astype(mx.float32)
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be a 2-D array of token ids (batch x length), got shape {inputs.shape}")
        doc_starts = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids is for full (training) forward passes; it cannot be used with a "
                                 "cache (stream each document separately instead)")
            doc_starts = document_starts(segment_ids, inputs.shape)
        if cache is not None and len(cache) != len(self.layers) + 1:
            raise ValueError(f"cache has {len(cache)} entries; this model needs {len(self.layers) + 1} "
                             f"(use model.make_cache())")
        if cache is not None and inputs.shape[1] == 1 and not self.training:
            return self._decode(inputs, cache)
        h = self.embed(inputs)
        if self.args.scale_emb:
            h = h * math.sqrt(self.args.model_dim)
        if doc_starts is None:
            for i, layer in enumerate(self.layers):
                h = layer(h, None if cache is None else cache[i])
        else:
            for layer in self.layers:
                h = layer(h, None, doc_starts=doc_starts)
        logits = self.output(h, self.embed, None if cache is None else cache[-1], last_only, doc_starts)
        return logits.astype(mx.float32)

    def features(self, inputs: mx.array, segment_ids: Optional[mx.array] = None) -> mx.array:
        """The final-normalized hidden states (B x L x model_dim) of a full forward pass: the
        logits are ``features @ model.output.head_weight(model.embed).T``. For losses that project
        a long sequence in pieces instead of materializing B x L x vocab logits at once."""
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be a 2-D array of token ids (batch x length), got shape {inputs.shape}")
        doc_starts = None if segment_ids is None else document_starts(segment_ids, inputs.shape)
        h = self.embed(inputs)
        if self.args.scale_emb:
            h = h * math.sqrt(self.args.model_dim)
        for layer in self.layers:
            h = layer(h, None, doc_starts=doc_starts)
        x, _ = self.output.final_norm(h, None, doc_starts)
        return x

    def make_cache(self) -> List:
        return [MegalodonCache(self.args.chunk_size) for _ in self.layers] + [TimestepNormCache()]

    # ------------------------------------------------------------------ one-token decoding
    def _step(self, inputs, states, pos):
        """Pure function of arrays: one token through every layer. ``states`` is a flat list of
        per-layer (count, mean, var, cema_re, cema_im, keys, values) + the final norm's three."""
        h = self.embed(inputs)
        if self.args.scale_emb:
            h = h * math.sqrt(self.args.model_dim)
        new_states = []
        for i, layer in enumerate(self.layers):
            count, mean, var, c_re, c_im, keys, values = states[7 * i: 7 * i + 7]
            y, norm, cema, keys, values = layer.mega.step(
                h, TimestepNormState(count, mean, var), (c_re, c_im), keys, values, pos)
            h = layer.nffn(y, h)
            new_states += [*norm, *cema, keys, values]
        x, norm = self.output.final_norm(h, TimestepNormState(*states[-3:]))
        logits = self.output.output(x) if "output" in self.output else self.embed.as_linear(x)
        return logits.astype(mx.float32), new_states + list(norm)

    def _decode(self, inputs, cache):
        B = inputs.shape[0]
        h = self.embed(inputs)        # its dtype is the compute dtype, whatever the quantization
        states = []
        for layer, c in zip(self.layers, cache[:-1]):
            m = layer.mega
            if c.norm is None:
                c.norm = m.timenorm.initial_state(B)
                zeros = mx.zeros((B, self.args.model_dim, self.args.cema_ndim), dtype=mx.float32)
                c.cema = (zeros, zeros)
            c.ensure_buffers(B, m.num_heads, m.z_head_dim, m.v_head_dim, h.dtype)
            states += [*c.norm, *c.cema, c.keys, c.values]
        final = cache[-1]
        if final.norm is None:
            final.norm = self.output.final_norm.initial_state(B)
        states += list(final.norm)
        if self._compiled_step is None:
            self._compiled_step = mx.compile(self._step)
        pos = mx.array(cache[0].chunk_fill, dtype=mx.int32)
        logits, new_states = self._compiled_step(inputs, states, pos)
        for i, c in enumerate(cache[:-1]):
            count, mean, var, c_re, c_im, c.keys, c.values = new_states[7 * i: 7 * i + 7]
            c.norm, c.cema = TimestepNormState(count, mean, var), (c_re, c_im)
            c.offset += 1
        final.norm = TimestepNormState(*new_states[-3:])
        final.offset += 1
        return logits

    def sanitize(self, weights: dict) -> dict:
        """Upstream keys -> this model: ``rope.freqs`` is derived from the config and a shared
        output matrix lives only in ``embed``."""
        weights = {k: v for k, v in weights.items() if k != "rope.freqs"}
        if self.args.share_emb:
            weights.pop("output.output.weight", None)
        return weights

    @property
    def head_dim(self) -> int:
        return self.args.z_head_dim
