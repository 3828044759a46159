"""The systems that ``benchmarks/peers.py`` compares, one class each, run inside a worker process.

Every system loads the same weights (the Megalodon ones from one upstream-format checkpoint
directory through its own loader; the Llama ones from one .npz) and offers:

- ``gate_logits(tokens, precision)``: logits [B, L, V] (float32 numpy) in "float32" (everything in
  float32) or "bfloat16" (bf16 weights and compute, the full-precision parts kept in float32);
- ``train(seq_len, rows, warmup, steps)``: one optimizer update per step (forward, backward, global
  norm clip at 1.0, AdamW) with float32 parameters and bf16 compute;
- ``infer(context, prefill_step, decode_tokens)``: read ``context`` random tokens into a fresh cache,
  then decode greedily one token at a time, with bf16 weights.

Timings synchronize the device (``mx.eval`` / a CUDA event / ``block_until_ready``), after every
training step or, with the job's ``train_loop`` "pipelined", one step late (see ``timed_steps``);
peak memory is reset before each measurement where the framework allows it (JAX cannot reset its
peak, so ``peers.py`` runs each JAX measurement in its own process).

A job that raises (an out-of-memory error, say) must not spoil the jobs after it in the same worker:
the worker clears the failed job's traceback frames (the arrays they hold), collects garbage, empties
the framework's allocator cache and resets its peak counter before the next job, and if memory is
still held afterwards (a framework-internal leak) it stops, so that ``peers.py`` starts a fresh worker
for the remaining jobs.

``torch_ref_compile`` compiles the PyTorch reference with CEMA and TimestepNorm left eager (see
``TorchMegalodon.compiled_forward``): inductor cannot generate code for CEMA's complex arithmetic and
its CUDA scan code generation fails on TimestepNorm's float64 cumulative sums.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import llama_baseline  # noqa: E402
from mlx_megalodon.config import ModelArgs  # noqa: E402

GB = 1e9
# Memory (GB) still in use after a failed job has been cleaned up beyond what was in use before it:
# more than this and the worker stops so that a fresh process runs the remaining jobs.
LEFTOVER_RESTART_GB = 0.5
# Test hook: "module:attribute" naming a dict {name: (system class, extra job settings)} of more
# systems for the worker (the class's ``family`` attribute gives its gate family).
EXTRA_SYSTEMS_ENV = "PEERS_EXTRA_SYSTEMS"
LEARNING_RATE, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0


def inference_record(context, prefill_s, prefill_peak_gb, decode_tokens, decode_s, decode_memory_gb,
                     decode_memory_kind, prefill_mode) -> dict:
    """One system's prefill + decode measurement, in the fields every report reads."""
    return {"prefill_tokens_per_s": context / prefill_s, "prefill_s": prefill_s,
            "prefill_peak_memory_gb": prefill_peak_gb, "decode_tokens_per_s": decode_tokens / decode_s,
            "decode_peak_memory_gb": decode_memory_gb, "decode_memory_kind": decode_memory_kind,
            "prefill_mode": prefill_mode}


class Unavailable(Exception):
    """The system cannot run here (package missing, no device); the message says why."""


def train_tokens(vocab: int, rows: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """rows x (seq_len + 1) token ids, the same for every system."""
    return np.random.default_rng(seed).integers(0, vocab, size=(rows, seq_len + 1)).astype(np.int32)


def random_batch(vocab: int, rows: int, seq_len: int, doc_len: int = 0, seed: int = 0):
    """A training Batch of train_tokens: every target counted, one document per row (or documents
    of ``doc_len`` tokens, as segment ids)."""
    from mlx_megalodon.data import Batch
    toks = train_tokens(vocab, rows, seq_len, seed)
    segments = np.zeros((rows, seq_len), np.int32)
    if doc_len:
        segments += (np.arange(seq_len, dtype=np.int32) // doc_len)[None]
    return Batch(toks[:, :-1], toks[:, 1:], np.ones((rows, seq_len), np.float32), segments)


def prompt_tokens(vocab: int, context: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(1, context)).astype(np.int32)


def nvidia_smi_lines(query: str, timeout: float = 20) -> list:
    """nvidia-smi's CSV lines (one per GPU) for ``--query-gpu=QUERY``; [] where there is no
    nvidia-smi or it fails."""
    import subprocess
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    return r.stdout.strip().splitlines() if r.returncode == 0 else []


TRAIN_LOOPS = ("synchronous", "pipelined")


def timed_steps(queue_step, wait, n: int, pipelined: bool) -> list:
    """Seconds per training step for ``n`` steps. ``queue_step()`` starts one step and returns a
    handle that ``wait(handle)`` blocks on until the step is done. Synchronous: each step is waited
    for before the next starts. Pipelined (how a training loop that reads its loss one step late
    runs): step i is queued before step i-1 is waited for, so the host prepares a step while the
    device runs the one before; a step's time is the interval between two completions."""
    times = []
    if not pipelined:
        for _ in range(n):
            tic = time.perf_counter()
            wait(queue_step())
            times.append(time.perf_counter() - tic)
        return times
    tic, previous = time.perf_counter(), None
    for i in range(n):
        handle = queue_step()
        if i > 0:   # (a handle may be None: a step that is done once queued)
            wait(previous)
            times.append(time.perf_counter() - tic)
            tic = time.perf_counter()
        previous = handle
    wait(previous)
    times.append(time.perf_counter() - tic)
    return times


def step_handle(loss, state) -> list:
    """What to wait on for one MLX step: its loss and the arrays its state holds now. The compiled
    step writes each new state into the same containers (``trainer.state``), so waiting on those
    containers a step later would wait on the newer step: the pipelined loop would run synchronously."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    leaves = []
    for _, v in tree_flatten(state):   # mx.random.state is a container tree_flatten keeps whole
        leaves.extend([v] if isinstance(v, mx.array) else [v[i] for i in range(len(v))])
    return [loss] + leaves


def mlx_trainer_steps(trainer, batch, n: int, pipelined: bool, mark=None):
    """``n`` steps of an mlx_megalodon Trainer on ``batch`` through timed_steps: (seconds per step,
    seconds of each trainer.step call, the losses, seconds of each mx.async_eval call). The step
    call builds the step's graph on the host; async_eval then encodes and launches its kernels, and
    returns when it has (on the H200 only near the end of the step's GPU work: see BENCHMARKS.md).
    ``mark(name)``, a context manager (step_kernels.py passes torch.profiler.record_function), wraps
    the graph build, the async_eval and the wait of every step."""
    import mlx.core as mx
    mark = mark or (lambda name: contextlib.nullcontext())
    calls, losses, evals = [], [], []
    # converted to MLX once, as the jax system converts its tokens once (jnp.asarray): see
    # Batch.resident for why a per-step conversion may cost more on MLX's CUDA backend
    batch = batch.resident()

    def queue_step():
        tic = time.perf_counter()
        with mark("mlx step: graph build"):
            loss, _, _ = trainer.step([batch])
        built = time.perf_counter()
        calls.append(built - tic)
        with mark("mlx step: async_eval"):
            mx.async_eval(loss, trainer.state)
        evals.append(time.perf_counter() - built)
        losses.append(loss)
        return step_handle(loss, trainer.state)

    def wait(handle):
        with mark("mlx step: wait"):
            mx.eval(handle)

    return timed_steps(queue_step, wait, n, pipelined), calls, losses, evals


def timing_summary(times, warmup: int, tokens: int) -> dict:
    """Median of the timed steps; the first step's excess over it estimates compilation."""
    timed = times[warmup:] or times[-1:]
    step = float(np.median(timed))
    return {"step_s": step, "tokens_per_s": tokens / step, "first_step_s": times[0],
            "compile_s": max(0.0, times[0] - step), "timed_steps": len(timed)}


# ============================================================================ MLX
class MLXSystem:
    framework = "mlx"

    def setup(self, job):
        try:
            import mlx.core as mx
        except ImportError as e:
            raise Unavailable(f"mlx not importable ({e})")
        from mlx_megalodon.train import use_large_cuda_graphs
        use_large_cuda_graphs()   # as the training CLI does, before the job's first GPU evaluation
        self.mx = mx
        self.job = job
        self._decode_warm = False

    def versions(self):
        from benchmarks.long_context import device_name
        return {"mlx": self.mx.__version__, "device": device_name()}

    def reset_memory(self):
        gc.collect()
        self.mx.clear_cache()
        self.mx.reset_peak_memory()

    def peak_gb(self):
        return self.mx.get_peak_memory() / GB

    def in_use_gb(self):
        return self.mx.get_active_memory() / GB

    def train(self, seq_len, rows, warmup, steps):
        mx = self.mx
        from mlx_megalodon.train import TrainConfig, Trainer, build_optimizer
        self.reset_memory()
        model = self.fresh_model(mx.float32)
        checkpointing = bool(self.job.get("mlx_grad_checkpoint"))
        cfg = TrainConfig(seq_len=seq_len, batch_size=rows, compute_dtype="bfloat16", compile=True,
                          grad_checkpoint=checkpointing, document_resets=False, learning_rate=LEARNING_RATE,
                          beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY, grad_clip=CLIP,
                          warmup=0)
        trainer = Trainer(model, build_optimizer(cfg), cfg)
        batch = random_batch(self.vocab, rows, seq_len)
        times, _, losses, _ = mlx_trainer_steps(trainer, batch, warmup + steps, self.job.get("train_loop") == "pipelined")
        out = timing_summary(times, warmup, rows * seq_len)
        out.update(peak_memory_gb=self.peak_gb(), loss=float(losses[-1].item()), first_loss=float(losses[0].item()),
                   grad_checkpoint=checkpointing, train_loop=self.job.get("train_loop", "synchronous"))
        return out

    def infer(self, context, prefill_step, decode_tokens):
        mx = self.mx
        if not hasattr(self, "_infer_model"):
            self._infer_model = self.fresh_model(mx.bfloat16)
            self._infer_model.eval()
        model = self._infer_model
        if not self._decode_warm:   # kernel compilation and the compiled decode step, once per process
            self._run_context(model, min(prefill_step, context), prefill_step, 4)
            self._decode_warm = True
        self.reset_memory()
        return self._run_context(model, context, prefill_step, decode_tokens)

    def _run_context(self, model, context, step, decode_tokens):
        mx = self.mx
        toks = prompt_tokens(self.vocab, context)
        cache = model.make_cache()
        tic = time.perf_counter()
        logits = None
        for s in range(0, context, step):
            logits = model(mx.array(toks[:, s:s + step]), cache=cache, last_only=True)[:, -1]
            mx.eval(logits, [c.state for c in cache])
        prefill_s = time.perf_counter() - tic
        prefill_peak = self.peak_gb()
        mx.reset_peak_memory()
        y = mx.argmax(logits, axis=-1)[:, None]
        for _ in range(2):                       # untimed: the step's first calls at this cache state
            y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[:, None]
        mx.eval(y)
        tic = time.perf_counter()
        for _ in range(decode_tokens):
            y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1)[:, None]
            mx.async_eval(y)
        mx.eval(y)
        decode_s = time.perf_counter() - tic
        return inference_record(context, prefill_s, prefill_peak, decode_tokens, decode_s, self.peak_gb(), "peak",
                                f"chunked, {step} tokens per call")


class MLXMegalodon(MLXSystem):
    family = "megalodon"

    def setup(self, job):
        super().setup(job)
        from mlx_megalodon.checkpoint import load_mlx_weights
        args, weights, _ = load_mlx_weights(job["megalodon_dir"])
        self.args = args
        self.vocab = args.vocab_size
        self.host_weights = {k: v.float().numpy() for k, v in weights.items()}   # host copy, not device memory

    def fresh_model(self, dtype):
        mx = self.mx
        from mlx_megalodon.mega import Model
        from mlx_megalodon.utils import cast_model
        model = Model(self.args)
        model.load_weights(list(model.sanitize({k: mx.array(v) for k, v in self.host_weights.items()}).items()),
                           strict=True)
        if dtype != mx.float32:
            cast_model(model, dtype)
        mx.eval(model.parameters())
        return model

    def gate_logits(self, tokens, precision):
        mx = self.mx
        model = self.fresh_model(mx.float32 if precision == "float32" else mx.bfloat16)
        model.eval()
        out = np.array(model(mx.array(tokens)))
        del model
        return out


class MLXLlama(MLXSystem):
    family = "llama"

    def setup(self, job):
        super().setup(job)
        self.args = llama_baseline.LlamaArgs(**job["llama_args"])
        self.vocab = self.args.vocab_size
        self.host_weights = llama_baseline.load_weights(job["llama_weights"])

    def fresh_model(self, dtype):
        from benchmarks import llama_mlx
        return llama_mlx.build(self.args, self.host_weights, dtype)

    def gate_logits(self, tokens, precision):
        mx = self.mx
        model = self.fresh_model(mx.float32 if precision == "float32" else mx.bfloat16)
        out = np.array(model(mx.array(tokens)))
        del model
        return out


# ============================================================================ PyTorch
class TorchSystem:
    framework = "torch"

    def setup(self, job):
        try:
            import torch
        except ImportError as e:
            raise Unavailable(f"torch not importable ({e})")
        self.torch = torch
        self.job = job
        self.compile = job.get("compile", False)
        self.compile_backend = job.get("compile_backend", "inductor")
        want = job.get("device", "auto")
        self.device = torch.device("cuda" if (want == "auto" and torch.cuda.is_available()) or want == "cuda"
                                   else "cpu")
        torch.backends.cuda.matmul.allow_tf32 = False     # float32 means float32 in the gate
        torch.backends.cudnn.allow_tf32 = False
        self._decode_warm = False

    def versions(self):
        t = self.torch
        name = t.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return {"torch": t.__version__, "device": f"torch {self.device.type}: {name}"}

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_memory(self):
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self):
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device) / GB
        return None

    def in_use_gb(self):
        if self.device.type == "cuda":
            return self.torch.cuda.memory_allocated(self.device) / GB
        return None

    def compiled_forward(self, model):
        """The model under torch.compile; static shapes, so each sequence length gets its own graph
        as the other frameworks' jit does."""
        return self.torch.compile(model, dynamic=False, backend=self.compile_backend)

    def compile_mode(self):
        return f"torch.compile(dynamic=False, backend={getattr(self.compile_backend, '__name__', self.compile_backend)})"

    def autocast(self):
        return self.torch.autocast(device_type=self.device.type, dtype=self.torch.bfloat16)

    def train(self, seq_len, rows, warmup, steps):
        torch = self.torch
        self.reset_memory()
        model = self.fresh_model(torch.float32)
        model.train()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE, betas=BETAS,
                                eps=EPS, fused=self.device.type == "cuda")
        forward = self.compiled_forward(model) if self.compile else model
        toks = torch.from_numpy(train_tokens(self.vocab, rows, seq_len)).long().to(self.device)
        inputs, targets = toks[:, :-1], toks[:, 1:]
        losses = []
        cuda = self.device.type == "cuda"

        def queue_step():
            with self.autocast():
                logits = forward(inputs)
                loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            if not cuda:
                return None
            done = torch.cuda.Event()   # one stream: an event waits for this step, not the ones after
            done.record()
            return done

        times = timed_steps(queue_step, lambda done: done is not None and done.synchronize(), warmup + steps,
                            self.job.get("train_loop") == "pipelined")
        out = timing_summary(times, warmup, rows * seq_len)
        out.update(peak_memory_gb=self.peak_gb(), loss=float(losses[-1].item()), first_loss=float(losses[0].item()),
                   grad_checkpoint=False, train_loop=self.job.get("train_loop", "synchronous"))
        if self.compile:
            out["compile_mode"] = self.compile_mode()
        return out

    def infer(self, context, prefill_step, decode_tokens):
        torch = self.torch
        if self.compile:
            raise NotImplementedError("torch.compile is applied to training only; inference is the eager "
                                      "system's (its cache changes shape every token)")
        if not hasattr(self, "_infer_model"):
            self._infer_model = self.inference_model()
        model = self._infer_model
        with torch.inference_mode():
            if not self._decode_warm:
                self._run_context(model, min(prefill_step, context), prefill_step, 4)
                self._decode_warm = True
            self.reset_memory()
            return self._run_context(model, context, prefill_step, decode_tokens)

    def _run_context(self, model, context, step, decode_tokens):
        torch = self.torch
        toks = torch.from_numpy(prompt_tokens(self.vocab, context)).long().to(self.device)
        cache = model.make_cache(batch_size=1)
        self.sync()
        tic = time.perf_counter()
        for s in range(0, context, step):
            logits = self.forward_last(model, toks[:, s:s + step], cache)
        self.sync()
        prefill_s = time.perf_counter() - tic
        prefill_peak = self.peak_gb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        y = logits.argmax(-1).reshape(1, 1)
        for _ in range(2):
            y = model(y, cache=cache)[:, -1].argmax(-1).reshape(1, 1)
        self.sync()
        tic = time.perf_counter()
        for _ in range(decode_tokens):
            y = model(y, cache=cache)[:, -1].argmax(-1).reshape(1, 1)
        self.sync()
        decode_s = time.perf_counter() - tic
        return inference_record(context, prefill_s, prefill_peak, decode_tokens, decode_s, self.peak_gb(), "peak",
                                f"chunked, {step} tokens per call")


class TorchMegalodon(TorchSystem):
    family = "megalodon"

    def setup(self, job):
        super().setup(job)
        from mlx_megalodon.checkpoint import load_upstream_state
        args, state, _ = load_upstream_state(job["megalodon_dir"])
        self.args = args
        self.vocab = args.vocab_size
        self.host_state = {k: (v if isinstance(v, self.torch.Tensor) else self.torch.from_numpy(np.asarray(v)))
                           for k, v in state.items()}

    def fresh_model(self, dtype):
        from torch_ref import Mega
        model = Mega(self.args)
        model.load_state_dict(self.host_state, strict=True)
        model = model.to(self.device)
        if dtype != self.torch.float32:
            model.to_compute_dtype(dtype)
        return model

    def inference_model(self):
        model = self.fresh_model(self.torch.bfloat16)
        model.eval()
        return model

    def compiled_forward(self, model):
        """torch.compile of the reference with CEMA and TimestepNorm (every instance, the final norm
        included) left eager through torch.compiler.disable, so the projections, attention, RMS
        norms, feed-forward networks and output head are compiled and the graph breaks around the
        two. Why: inductor cannot generate code for CEMA's complex tensors (FFT convolution, complex
        state) and on CUDA its scan code generation fails on TimestepNorm's float64 cumulative sums
        (``Error in codegen for ... SplitScan ... cumsum``, then no step finished in 7 minutes on
        an H200). The patch sets ``forward`` on this model's module instances only, so torch_ref's
        code and numerics are unchanged."""
        from torch_ref.complex_exponential_moving_average import MultiHeadComplexEMA
        from torch_ref.timestep_norm import TimestepNorm
        for module in model.modules():
            if isinstance(module, (MultiHeadComplexEMA, TimestepNorm)):
                module.forward = self.torch.compiler.disable(module.forward)
        return super().compiled_forward(model)

    def compile_mode(self):
        return super().compile_mode() + "; CEMA and TimestepNorm eager (torch.compiler.disable)"

    def gate_logits(self, tokens, precision):
        torch = self.torch
        model = self.fresh_model(torch.float32 if precision == "float32" else torch.bfloat16).eval()
        with torch.inference_mode():
            out = model(torch.from_numpy(tokens).long().to(self.device)).float().cpu().numpy()
        del model
        return out

    def forward_last(self, model, tokens, cache):
        """Mega.forward with a cache, projecting only the last position to the vocabulary (the final
        norm still sees every position, so its running statistics stay exact)."""
        x = model.embed(tokens)
        if model.emb_scale is not None:
            x = x * model.emb_scale
        for i, layer in enumerate(model.layers):
            x, cache.layers[i] = layer(x, model.rope, cache.layers[i])
        x, state = model.output.final_norm(x, cache.final_norm)
        cache.final_norm = tuple(t.detach() for t in state)
        cache.offset += tokens.shape[1]
        return model.output.output(x[:, -1:]).float()[:, -1]


class TorchLlama(TorchSystem):
    family = "llama"

    def setup(self, job):
        super().setup(job)
        self.args = llama_baseline.LlamaArgs(**job["llama_args"])
        self.vocab = self.args.vocab_size
        self.host_weights = llama_baseline.load_weights(job["llama_weights"])

    def fresh_model(self, dtype):
        from benchmarks import llama_torch
        return llama_torch.build(self.args, self.host_weights, self.device, dtype)

    def inference_model(self):
        return self.fresh_model(self.torch.bfloat16).eval()

    def gate_logits(self, tokens, precision):
        torch = self.torch
        model = self.fresh_model(torch.float32 if precision == "float32" else torch.bfloat16).eval()
        with torch.inference_mode():
            out = model(torch.from_numpy(tokens).long().to(self.device)).float().cpu().numpy()
        del model
        return out

    def forward_last(self, model, tokens, cache):
        h = model.embed(tokens)
        for i, layer in enumerate(model.layers):
            h = layer(h, cache[i])
        return model.output(model.norm(h[:, -1:])).float()[:, -1]


# ============================================================================ megalodon-jax
class JaxMegalodon:
    framework = "jax"
    family = "megalodon"

    def setup(self, job):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:
            import jax
            import jax.numpy as jnp
            import equinox as eqx
            import megalodon_jax
            from megalodon_jax.convert import load_upstream_checkpoint, load_upstream_state_dict
        except ImportError as e:
            raise Unavailable(f"megalodon-jax (with jax, equinox, jaxtyping) not importable ({e})")
        if job.get("device") == "cpu":
            jax.config.update("jax_platforms", "cpu")
        import torch
        self.jax, self.jnp, self.eqx, self.mj = jax, jnp, eqx, megalodon_jax
        self.load_dir, self.load_state = load_upstream_checkpoint, load_upstream_state_dict
        self.job = job
        self.megalodon_dir = job["megalodon_dir"]
        self.args = ModelArgs.from_dict(json.loads((Path(self.megalodon_dir) / "config.json").read_text())["model"])
        self.vocab = self.args.vocab_size
        self._state = None
        self._torch = torch
        self.device = jax.devices()[0]

    def versions(self):
        import equinox
        return {"jax": self.jax.__version__, "equinox": equinox.__version__,
                "megalodon_jax": getattr(self.mj, "__version__", None) or _dist_version("megalodon-jax"),
                "device": f"jax {self.device.platform}: {self.device.device_kind}"}

    def config(self, param_dtype, compute_dtype):
        a = self.args
        return self.mj.MegalodonConfig(
            vocab_size=a.vocab_size, model_dim=a.model_dim, num_layers=a.num_layers, num_heads=a.num_heads,
            z_dim=a.z_dim, value_dim=a.value_dim, ffn_hidden_dim=a.ffn_hidden_dim, cema_ndim=a.cema_ndim,
            chunk_size=a.chunk_size, norm_num_groups=a.norm_num_groups, norm_eps=a.norm_eps,
            rope_base=a.rope_base, swiglu=a.swiglu, rescale_nffn=a.rescale_nffn, scale_emb=a.scale_emb,
            share_emb=a.share_emb, output_size=a.output_size, param_dtype=param_dtype,
            compute_dtype=compute_dtype)

    def model(self, param_dtype, compute_dtype, from_directory=False):
        """Through megalodon-jax's own upstream loaders: the directory loader, or the state-dict
        loader on the same checkpoint's tensors (read once)."""
        cfg = self.config(param_dtype, compute_dtype)
        key = self.jax.random.PRNGKey(0)
        if from_directory:
            return self.load_dir(self.megalodon_dir, cfg, key=key)
        if self._state is None:
            self._state = self._torch.load(Path(self.megalodon_dir) / "consolidated.pth", map_location="cpu",
                                           weights_only=True)
        return self.load_state(self.mj.MegalodonForCausalLM(cfg, key=key), self._state)

    def sync(self, x):
        return self.jax.block_until_ready(x)

    def reset_memory(self):
        gc.collect()

    def peak_gb(self):
        stats = self.device.memory_stats() or {}
        return stats["peak_bytes_in_use"] / GB if "peak_bytes_in_use" in stats else None

    def in_use_gb(self):
        stats = self.device.memory_stats() or {}
        return stats["bytes_in_use"] / GB if "bytes_in_use" in stats else None

    def gate_logits(self, tokens, precision):
        jnp, eqx = self.jnp, self.eqx
        if precision == "float32":
            model = self.model(jnp.float32, jnp.float32, from_directory=True)
        else:
            model = self.model(jnp.bfloat16, jnp.bfloat16)
        logits, _ = eqx.filter_jit(lambda m, ids: m(ids))(model, jnp.asarray(tokens))
        return np.asarray(logits, dtype=np.float32)

    def train(self, seq_len, rows, warmup, steps):
        jax, jnp, eqx = self.jax, self.jnp, self.eqx
        model = self.model(jnp.float32, jnp.bfloat16)
        params, static = eqx.partition(model, eqx.is_inexact_array)
        del model
        zeros = jax.tree.map(jnp.zeros_like, params)
        opt = (zeros, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.int32))

        def loss_fn(p, ids):
            # compute_loss shifts the labels itself: position i predicts token i+1.
            return eqx.combine(p, static).compute_loss(ids, ids)

        def step(p, opt, ids):
            loss, grads = jax.value_and_grad(loss_fn)(p, ids)
            leaves = jax.tree.leaves(grads)
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))
            scale = jnp.minimum(1.0, CLIP / (norm + 1e-6))
            m, v, t = opt
            t = t + 1
            b1, b2 = BETAS
            m = jax.tree.map(lambda m_, g: b1 * m_ + (1 - b1) * g * scale, m, grads)
            v = jax.tree.map(lambda v_, g: b2 * v_ + (1 - b2) * jnp.square(g * scale), v, grads)
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t

            def update(p_, m_, v_):
                decay = WEIGHT_DECAY if p_.ndim >= 2 else 0.0
                p_ = p_ * (1 - LEARNING_RATE * decay)
                return p_ - LEARNING_RATE * (m_ / c1) / (jnp.sqrt(v_ / c2) + EPS)
            return jax.tree.map(update, p, m, v), (m, v, t), loss

        step = jax.jit(step, donate_argnums=(0, 1))
        toks = jnp.asarray(train_tokens(self.vocab, rows, seq_len)[:, :seq_len])
        losses = []
        pipelined = self.job.get("train_loop") == "pipelined"

        def queue_step():
            nonlocal params, opt
            params, opt, loss = step(params, opt, toks)
            losses.append(loss)
            # The next step donates params and opt, so a pipelined wait can hold the loss only.
            return loss if pipelined else (params, opt, loss)

        times = timed_steps(queue_step, self.sync, warmup + steps, pipelined)
        out = timing_summary(times, warmup, rows * seq_len)
        out.update(peak_memory_gb=self.peak_gb(), loss=float(losses[-1]), first_loss=float(losses[0]),
                   grad_checkpoint=False, optimizer="own AdamW (jax.tree.map)",
                   train_loop=self.job.get("train_loop", "synchronous"),
                   memory_note="peak since process start (JAX cannot reset it; one process per measurement)")
        return out

    def infer(self, context, prefill_step, decode_tokens):
        jnp, eqx = self.jnp, self.eqx
        model = self.model(jnp.bfloat16, jnp.bfloat16)

        # A fresh cache's first call is megalodon-jax's vectorized prefill; calls on a non-empty cache
        # run a per-token scan, so the whole context is read in one call.
        @eqx.filter_jit
        def prefill(m, ids):
            hidden, cache = m.model(ids, cache=None, return_cache=True)
            return m._project_logits(hidden[:, -1:])[:, -1], cache

        @eqx.filter_jit(donate="all-except-first")
        def decode(m, tok, cache):
            logits, cache = m(tok[:, None], cache=cache, return_cache=True)
            return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

        ids = jnp.asarray(prompt_tokens(self.vocab, context))
        tic = time.perf_counter()
        logits, cache = self.sync(prefill(model, ids))
        first_prefill_s = time.perf_counter() - tic
        tic = time.perf_counter()
        logits, cache = self.sync(prefill(model, ids))        # timed: compiled
        prefill_s = time.perf_counter() - tic
        prefill_peak = self.peak_gb()
        y = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tic = time.perf_counter()
        y, cache = self.sync(decode(model, y, cache))
        first_decode_s = time.perf_counter() - tic
        y, cache = self.sync(decode(model, y, cache))
        tic = time.perf_counter()
        for _ in range(decode_tokens):
            y, cache = decode(model, y, cache)
        self.sync((y, cache))
        decode_s = time.perf_counter() - tic
        return {**inference_record(context, prefill_s, prefill_peak, decode_tokens, decode_s, self.in_use_gb(),
                                   "in use after decoding",
                                   "one call over the whole context (its cached path is a per-token scan)"),
                "prefill_compile_s": max(0.0, first_prefill_s - prefill_s),
                "decode_compile_s": max(0.0, first_decode_s - decode_s / decode_tokens)}


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


SYSTEMS = {
    "mlx": (MLXMegalodon, {}),
    "torch_ref": (TorchMegalodon, {}),
    "torch_ref_compile": (TorchMegalodon, {"compile": True}),
    "jax": (JaxMegalodon, {}),
    "llama_mlx": (MLXLlama, {}),
    "llama_torch": (TorchLlama, {}),
    "llama_torch_compile": (TorchLlama, {"compile": True}),
}
FAMILY = {"mlx": "megalodon", "torch_ref": "megalodon", "torch_ref_compile": "megalodon", "jax": "megalodon",
          "llama_mlx": "llama", "llama_torch": "llama", "llama_torch_compile": "llama"}
REFERENCE = {"megalodon": "mlx", "llama": "llama_mlx"}     # whose float32 logits the gate compares with
ISOLATED = {"jax"}                                          # one process per measurement (peak not resettable)


# ============================================================================ the gate
def gate_error(got: np.ndarray, ref: np.ndarray) -> dict:
    scale = float(np.abs(ref).max())
    err = float(np.abs(got.astype(np.float64) - ref).max()) if got.shape == ref.shape else float("inf")
    return {"max_abs_diff": err, "max_abs_logit": scale, "relative": err / max(scale, 1e-30),
            "finite": bool(np.isfinite(got).all())}


def run_gate(system, name: str, job: dict) -> dict:
    """float32 and bfloat16 logits against the reference system's float32 logits on the same input.
    The reference system writes that file first."""
    tokens = np.load(job["gate_tokens"][FAMILY[name]])
    ref_path = Path(job["gate_reference"][FAMILY[name]])
    results = {"tokens": list(tokens.shape), "reference": REFERENCE[FAMILY[name]]}
    f32 = system.gate_logits(tokens, "float32")
    if name == REFERENCE[FAMILY[name]]:
        np.save(ref_path, f32)
    if not ref_path.exists():
        return {**results, "passed": False, "reason": f"no reference logits ({REFERENCE[FAMILY[name]]} did not run)"}
    ref = np.load(ref_path)
    passed = True
    for precision, got, tol in (("float32", f32, job["tol_fp32"]),
                                ("bfloat16", system.gate_logits(tokens, "bfloat16"), job["tol_bf16"])):
        e = gate_error(got, ref)
        e["tolerance"] = tol
        e["passed"] = e["finite"] and e["relative"] <= tol
        passed &= e["passed"]
        results[precision] = e
    results["passed"] = bool(passed)
    return results


# ============================================================================ the worker
def load_extra_systems() -> None:
    """Add the systems named by $PEERS_EXTRA_SYSTEMS ("module:attribute", a test hook) to SYSTEMS
    and FAMILY."""
    spec = os.environ.get(EXTRA_SYSTEMS_ENV)
    if not spec:
        return
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"${EXTRA_SYSTEMS_ENV} must read module:attribute, got '{spec}'")
    for name, (cls, extra) in getattr(importlib.import_module(module_name), attribute).items():
        SYSTEMS[name] = (cls, extra)
        FAMILY[name] = cls.family


def release_failure(error: BaseException) -> None:
    """Let go of what a failed job held. Clearing its traceback frames frees their locals (arrays,
    models, optimizer state) even where the exception object itself lives on (in a chained
    exception, in a system that kept it, in a frame-exception reference cycle)."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)      # skips the frames still running (this worker's)
        e.__traceback__ = None
        pending += [e.__cause__, e.__context__]


def run_job(system, name: str, job: dict, j: str) -> dict:
    kind, _, value = j.partition(":")
    if kind == "gate":
        return run_gate(system, name, job)
    if kind == "train":
        L = int(value)
        rows = max(1, job["tokens_per_step"] // L)
        return {"seq_len": L, "rows": rows, "tokens_per_step": rows * L,
                **system.train(L, rows, job["warmup"], job["steps"])}
    if kind == "infer":
        return {"context": int(value), "decode_tokens": job["decode_tokens"],
                **system.infer(int(value), job["prefill_step"], job["decode_tokens"])}
    raise ValueError(f"unknown job {j}")


def _in_use_gb(system):
    measure = getattr(system, "in_use_gb", None)
    return None if measure is None else measure()


def worker_main(name: str, job_file: str) -> int:
    """Run ``job["jobs"]`` for one system, appending one JSON line per finished job to job["result_file"].

    Each job starts clean (garbage collected, allocator cache emptied, peak counter reset), so its
    peak is its own. After a job that raised, the worker releases what the job held; if more than
    ``job["leftover_restart_gb"]`` (default LEFTOVER_RESTART_GB) is still in use than before the
    job, or the cleanup itself fails, the worker returns early and ``peers.py`` runs the remaining
    jobs in a fresh process."""
    load_extra_systems()
    job = json.loads(Path(job_file).read_text())
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name}")
    restart_gb = job.get("leftover_restart_gb", LEFTOVER_RESTART_GB)
    out = open(job["result_file"], "a")

    def record(entry):
        out.write(json.dumps(entry) + "\n")
        out.flush()

    cls, extra = SYSTEMS[name]
    system = cls()
    tic = time.perf_counter()
    try:
        system.setup({**job, **extra})
    except Unavailable as e:
        record({"job": "setup", "status": "unavailable", "reason": str(e)})
        return 0
    except Exception as e:   # a loader error is a result too
        record({"job": "setup", "status": "error", "reason": _one_line(e)})
        return 0
    record({"job": "setup", "status": "ok", "setup_s": time.perf_counter() - tic, "versions": system.versions()})
    for index, j in enumerate(job["jobs"]):
        if time.time() > job["deadline"]:
            record({"job": j, "status": "skipped", "reason": "time budget exhausted"})
            continue
        system.reset_memory()
        before = _in_use_gb(system)
        failed = False
        tic = time.perf_counter()
        try:
            entry = {"job": j, "status": "ok", **run_job(system, name, job, j)}
        except NotImplementedError as e:
            entry = {"job": j, "status": "n/a", "reason": str(e)}
        except Exception as e:
            entry = {"job": j, "status": "error", "reason": _one_line(e)}
            release_failure(e)
            failed = True
        if entry["status"] != "n/a":
            entry["wall_s"] = time.perf_counter() - tic
        if before is not None:
            entry["start_memory_gb"] = before
        if failed:
            restart = None
            try:
                gc.collect()
                system.reset_memory()
                after = _in_use_gb(system)
                if before is not None and after is not None:
                    entry["leftover_memory_gb"] = after - before
                    if after - before > restart_gb:
                        restart = f"{after - before:.2f} GB still in use after the cleanup"
            except Exception as e:
                restart = f"cleanup failed ({_one_line(e, 120)})"
            if restart and index + 1 < len(job["jobs"]):
                entry["worker_restart"] = restart + ": the remaining jobs run in a fresh worker"
                record(entry)
                return 0
        record(entry)
        gc.collect()
    return 0


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
