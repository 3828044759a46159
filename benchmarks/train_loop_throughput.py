"""Tokens/s of the project's own training loop (``mlx_megalodon.train.train``), as ``python -m
mlx_megalodon.train`` runs it: numpy batches from the data iterator every step, the learning-rate
schedule, the loss read one step late, progress reporting. ``train_throughput.py`` times the compiled
step alone on one resident batch; this checks that the loop around it keeps the GPU as busy.

    python benchmarks/train_loop_throughput.py --preset mega200M --seq-lens 4096,32768 \\
        --tokens-per-step 32768 --iters 14 [--batches resident|staged] [--out results.json]

``--batches resident`` converts the batches to MLX before the loop, to tell the per-step batch
conversion's cost apart from the loop's; ``--batches staged`` writes each step's batch into a few
MLX arrays made once (no per-step host allocation), a candidate fix to A/B. Random tokens, one
document (no resets), bfloat16 compute, no validation and no checkpoints. The loop's figure is the
median step after the first two (compilation) steps.

The resident rows of the tenth session's table (BENCHMARKS.md) ran before ``Batch.token_count``
existed: ``train`` then summed each MLX mask right after queueing the step, which waited for the
device, so that loop was synchronous.
"""
import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_megalodon.config import preset  # noqa: E402
from mlx_megalodon.data import PackedDataset, TokenStream  # noqa: E402
from mlx_megalodon.train import TrainConfig, new_model, train, use_large_cuda_graphs  # noqa: E402
from benchmarks.step_kernels import json_object  # noqa: E402


def resident_iterator_class(n_batches: int):
    """A BatchIterator that draws its first ``n_batches`` batches up front and serves them as MLX
    arrays (``Batch.resident``), so the timed loop makes no per-step host allocations."""
    import mlx.core as mx
    from mlx_megalodon.data import BatchIterator

    class ResidentBatches(BatchIterator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._ready = [super(ResidentBatches, self).__next__().resident() for _ in range(n_batches)]
            mx.eval([[b.inputs, b.targets, b.mask] for b in self._ready])

        def __next__(self):
            return self._ready.pop(0) if self._ready else super().__next__()
    return ResidentBatches


STAGING_SETS = 3


def staged_iterator_class(n_sets: int = STAGING_SETS):
    """A BatchIterator that makes ``n_sets`` sets of MLX batch arrays once and writes each step's
    batch into them in turn (through numpy views of their memory), so no step allocates a host
    buffer: the candidate fix for the per-step conversion's cost, to A/B on a GPU. Safe only with a
    loop that, like ``train.train``, reads step i-1's loss before it draws batch i+1: step i-1
    started after step i-2 ended (one stream), so the set drawn three batches back is free."""
    import mlx.core as mx
    from mlx_megalodon.data import Batch, BatchIterator

    class StagedBatches(BatchIterator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._sets, self._draws = [None] * n_sets, 0   # each: (MLX arrays, numpy views of them)

        def __next__(self):
            b = super().__next__()
            fields = (b.inputs, b.targets, b.mask, b.segment_ids)
            k = self._draws % n_sets
            self._draws += 1
            staged = self._sets[k]
            layout = [None if v is None else (v.shape, v.dtype) for v in fields]
            if staged is None or [None if w is None else (w.shape, w.dtype) for w in staged[1]] != layout:
                arrays = tuple(None if v is None else mx.array(v) for v in fields)
                mx.eval([a for a in arrays if a is not None])
                staged = self._sets[k] = (arrays, tuple(None if a is None else np.asarray(memoryview(a))
                                                        for a in arrays))
            else:
                for w, v in zip(staged[1], fields):
                    if v is not None:
                        w[...] = v
            return Batch(*staged[0], token_count=b.num_tokens)
    return StagedBatches


@contextlib.contextmanager
def marked_loop(mark):
    """Inside this, ``train.train`` wraps its host phases in ``mark(name)`` ranges (step_kernels.py
    --library-loop passes torch.profiler.record_function): drawing a batch, building the step's graph
    (Trainer.step) and mx.async_eval. It swaps names in mlx_megalodon.train for wrappers and puts them
    back on exit; the loop itself is unchanged."""
    import mlx_megalodon.train as T
    plain_trainer, plain_batches, plain_mx = T.Trainer, T.BatchIterator, T.mx

    class MarkedTrainer(plain_trainer):
        def step(self, batches):
            with mark("mlx step: graph build"):
                return super().step(batches)

    class MarkedBatches(plain_batches):
        def __next__(self):
            with mark("mlx step: data"):
                return super().__next__()

    class MarkedMx:
        def __getattr__(self, name):
            return getattr(plain_mx, name)

        @staticmethod
        def async_eval(*arrays):
            with mark("mlx step: async_eval"):
                return plain_mx.async_eval(*arrays)

    T.Trainer, T.BatchIterator, T.mx = MarkedTrainer, MarkedBatches, MarkedMx()
    try:
        yield
    finally:
        T.Trainer, T.BatchIterator, T.mx = plain_trainer, plain_batches, plain_mx


BATCH_MODES = ("numpy", "resident", "staged")


def measure(preset_name: str, seq_len: int, rows: int, iters: int, seed: int = 0, batches: str = "numpy",
            dtype: str = "bfloat16", mark=None, on_step=None, **overrides) -> dict:
    """One run of ``train.train``; ``mark`` (a context-manager factory) marks its host phases
    (:func:`marked_loop`), ``on_step(step, loss)`` is train's own callback."""
    import mlx.core as mx
    import mlx_megalodon.train as train_module
    args = preset(preset_name, **overrides)
    tokens = np.random.default_rng(seed).integers(0, args.vocab_size, size=(iters + 1) * rows * seq_len + 1)
    data = PackedDataset(TokenStream(tokens.astype(np.int32), np.zeros(1, np.int64), args.vocab_size), seq_len)
    cfg = TrainConfig(seq_len=seq_len, batch_size=rows, iters=iters, warmup=2, val_every=0, save_every=0,
                      compute_dtype=dtype, compile=True, document_resets=False, report_every=1000)
    model = new_model(args, seed)
    mx.reset_peak_memory()
    plain = train_module.BatchIterator
    if batches == "resident":
        train_module.BatchIterator = resident_iterator_class(iters)
    elif batches == "staged":
        train_module.BatchIterator = staged_iterator_class()
    elif batches != "numpy":
        raise ValueError(f"batches must be one of {', '.join(BATCH_MODES)}, got {batches!r}")
    try:
        with marked_loop(mark) if mark is not None else contextlib.nullcontext():
            result = train(model, data, None, cfg, quiet=True, on_step=on_step)
    finally:
        train_module.BatchIterator = plain
    return {"seq_len": seq_len, "rows": rows, "iters": result.step, "batches": batches,
            "tokens_per_s": result.tokens_per_sec, "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "last_loss": result.train_losses[-1][1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mega200M")
    p.add_argument("--seq-lens", default="4096,32768")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--iters", type=int, default=14)
    p.add_argument("--batches", default="numpy", choices=BATCH_MODES,
                   help="numpy: drawn and converted every step, as the CLI does; resident: all converted "
                        "before the loop; staged: written each step into a few MLX arrays made once")
    p.add_argument("--overrides", type=json_object, default={},
                   help="JSON of ModelArgs fields over the preset's (tests)")
    p.add_argument("--out", help="write the rows as JSON here")
    a = p.parse_args(argv)
    if a.iters < 4:
        p.error("--iters must be >= 4 (two compile steps, then timed ones)")
    try:
        lens = [int(v) for v in a.seq_lens.split(",") if v.strip()]
    except ValueError:
        p.error(f"--seq-lens: not a comma list of integers: {a.seq_lens!r}")
    if not lens or min(lens) < 1 or a.tokens_per_step < max(lens):
        p.error("--seq-lens must be positive and each at most --tokens-per-step")
    use_large_cuda_graphs()   # as the training CLI does, before the first GPU evaluation
    rows_out = []
    for L in lens:
        r = measure(a.preset, L, a.tokens_per_step // L, a.iters, batches=a.batches, **a.overrides)
        rows_out.append(r)
        print(f"{a.preset} seq {L:>7,d} x {r['rows']:>3d} ({r['batches']} batches): {r['tokens_per_s']:>10,.0f} tok/s  "
              f"peak {r['peak_memory_gb']:.2f} GB  loss {r['last_loss']:.3f}", flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps({"preset": a.preset, "results": rows_out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
