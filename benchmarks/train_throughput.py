#!/usr/bin/env python3
"""Training-step throughput and peak memory for a preset-shaped model with random weights.

    python benchmarks/train_throughput.py --preset mega200M --seq-lens 4096,32768 --tokens-per-step 32768

Each step is one AdamW update (forward + backward) through the project's own Trainer (bf16
compute, float32 CEMA/norms/master weights), over batches of ``tokens_per_step / seq_len`` rows, so
every sequence length does the same work per step. Reports tokens/s (median of timed steps after
warm-up), the first step's time (it includes mx.compile and any kernel JIT) and MLX's peak memory.

``--variants`` measures the same step several ways, in one process:
  kernels      the default dispatch (the fused CEMA kernel where a GPU backend exists)
  ops          MEGALODON_KERNELS=0, the pure-ops path
  distributed  default dispatch, plus the data-parallel gradient reduction forced on at world
               size 1 (``Trainer(always_reduce=True)``): the distributed code's own cost
  tnorm        default dispatch with the fused TimestepNorm kernel forced on (MEGALODON_TNORM_KERNEL=1)
  no-tnorm     default dispatch with the fused TimestepNorm kernel forced off (MEGALODON_TNORM_KERNEL=0)
  ce-kernel    default dispatch with the fused cross-entropy kernels forced on (MEGALODON_CE_KERNEL=1):
               the loss reads the bf16 logits, no float32 copy (the CUDA default)
  no-ce-kernel default dispatch with the fused cross-entropy kernels forced off (MEGALODON_CE_KERNEL=0)
  ln-kernel    default dispatch with the LayerNorm kernel backward forced on (MEGALODON_LN_KERNEL=1):
               the FFN norm's scale / shift gradients summed in the kernel (the CUDA default)
  no-ln-kernel default dispatch with MLX's own LayerNorm vjp (MEGALODON_LN_KERNEL=0)
  flat-adamw   default dispatch with TrainConfig(flat_optimizer=True): AdamW over flat buffers,
               one cast / clip / update per group of weights instead of per tensor
``--packed-doc-len N`` gives every row documents of N tokens (segment ids; state resets at each).
``--pipelined`` times the steps as the project's training loop runs them: each step is queued before
the previous one's loss is read, so building a step's graph on the host overlaps the device's work
on the step before. That graph build took 24-28 ms per call for mega200M at 8 x 4K on this project's
2-core CPU, with the pure-ops CEMA and TimestepNorm; a GPU's graph, with the kernels, is smaller. Each
row reports that host time (``host_call_s``, the median trainer.step call before evaluation) and
the median ``mx.async_eval`` call (``host_eval_call_s``). On the H200 that call returned only about
18 ms before the step's end (eighth session), so the pipelined loop cannot hide the graph build
there and measured the same as the synchronous one. The default evaluates every step before the next is built, as megalodon-jax's step is timed in
``peers.py``; with it the device waits while the host builds each step.
On MLX's CUDA backend the run sizes CUDA graphs as the training CLI does
(``train.use_large_cuda_graphs``); ``MLX_MAX_MB_PER_BUFFER=1000`` in the environment measures MLX's
own H200 default instead.
``--fresh-process`` runs every measurement in a process of its own (same options): on the H200 the
later measurements of one process ran 1-7% slower than its first, at an unchanged SM clock
(BENCHMARKS.md, sixth session), and a fresh process gives each case the same start.
"""
import os
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mlx_megalodon import kernels as cema_kernels  # noqa: E402
from mlx_megalodon import moving_average_gated_attention as maga  # noqa: E402
from mlx_megalodon.config import ModelArgs, parameter_count, preset  # noqa: E402
from mlx_megalodon.mega import Model  # noqa: E402
from mlx_megalodon.train import Trainer, TrainConfig, build_optimizer, use_large_cuda_graphs  # noqa: E402
from benchmarks.long_context import device_name  # noqa: E402
from benchmarks.peers_workers import mlx_trainer_steps, nvidia_smi_lines, random_batch  # noqa: E402


VARIANTS = ("kernels", "ops", "distributed", "tnorm", "no-tnorm", "ce-kernel", "no-ce-kernel", "ln-kernel",
            "no-ln-kernel", "flat-adamw")
# The kernel switches a variant forces (every other variant leaves them to the default dispatch).
VARIANT_SWITCHES = {"tnorm": ("MEGALODON_TNORM_KERNEL", "1"), "no-tnorm": ("MEGALODON_TNORM_KERNEL", "0"),
                    "ce-kernel": ("MEGALODON_CE_KERNEL", "1"), "no-ce-kernel": ("MEGALODON_CE_KERNEL", "0"),
                    "ln-kernel": ("MEGALODON_LN_KERNEL", "1"), "no-ln-kernel": ("MEGALODON_LN_KERNEL", "0")}


def measure(args, seq_len, rows, steps, warmup, grad_checkpoint, compile_step, dtype, variant="kernels",
            packed_doc_len=0, pipelined=False):
    os.environ["MEGALODON_KERNELS"] = "0" if variant == "ops" else "1"
    for switch, _ in VARIANT_SWITCHES.values():
        os.environ.pop(switch, None)
    if variant in VARIANT_SWITCHES:
        switch, value = VARIANT_SWITCHES[variant]
        os.environ[switch] = value
    flat_optimizer = variant == "flat-adamw"   # the default kernels with FlatAdamW (flat_adamw.py)
    mx.random.seed(0)
    model = Model(args)
    cfg = TrainConfig(seq_len=seq_len, batch_size=rows, compute_dtype=dtype, grad_checkpoint=grad_checkpoint,
                      compile=compile_step, document_resets=packed_doc_len > 0, flat_optimizer=flat_optimizer)
    trainer = Trainer(model, build_optimizer(cfg), cfg, always_reduce=variant == "distributed")
    batch = random_batch(args.vocab_size, rows, seq_len, packed_doc_len)
    mx.synchronize()
    mx.reset_peak_memory()
    # pipelined: as mlx_megalodon.train's loop runs, step n is queued before step n-1 is waited for
    times, calls, losses, evals = mlx_trainer_steps(trainer, batch, warmup + steps, pipelined)
    loss = losses[-1]
    t = float(np.median(times[warmup:]))
    out = {"variant": variant, "seq_len": seq_len, "rows": rows, "tokens_per_step": rows * seq_len, "step_s": t,
           "step_s_all": times[warmup:], "first_step_s": times[0], "tokens_per_s": rows * seq_len / t,
           "peak_memory_gb": mx.get_peak_memory() / 1e9, "loss": float(loss.item()),
           "grad_checkpoint": grad_checkpoint, "packed_doc_len": packed_doc_len, "pid": os.getpid(),
           "loop": "pipelined" if pipelined else "synchronous", "flat_optimizer": flat_optimizer,
           "host_call_s": float(np.median(calls[warmup:])), "host_call_s_all": calls[warmup:],
           "host_eval_call_s": float(np.median(evals[warmup:])), "host_eval_call_s_all": evals[warmup:]}
    del trainer, model
    mx.clear_cache()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mega200M")
    p.add_argument("--tiny", action="store_true", help="the 2-layer, 128-dim config of peers.py --tiny (CPUs, tests)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (smaller runs)")
    p.add_argument("--seq-lens", default="4096,32768")
    p.add_argument("--tokens-per-step", type=int, default=32768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--pipelined", action="store_true",
                   help="queue each step before waiting for the one before, as the training loop of "
                        "mlx_megalodon.train does (default: evaluate every step before the next starts)")
    p.add_argument("--variants", default="kernels", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--packed-doc-len", type=int, default=0, help="documents of N tokens per row (0: one per row)")
    p.add_argument("--causal-split-parts", type=int, default=None,
                   help="query blocks per attention chunk (default: the library's CAUSAL_SPLIT_PARTS)")
    p.add_argument("--cema-bwd-max-npt", type=int, default=None, choices=[1, 2, 4, 8, 16],
                   help="CEMA backward kernel: state dims per thread (default: the library's BWD_MAX_NPT)")
    p.add_argument("--cema-fwd-max-npt", type=int, default=None, choices=[1, 2, 4, 8, 16],
                   help="CEMA forward kernel: state dims per thread (default: the library's FWD_MAX_NPT)")
    p.add_argument("--cema-target-threads", type=int, default=None,
                   help="CEMA kernels: threads wanted per launch (default: the library's TARGET_THREADS)")
    p.add_argument("--cema-min-chunk", type=int, default=None,
                   help="CEMA kernels: shortest chunk (default: the library's MIN_CHUNK)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every (length, variant) this many times, the order reversed on every "
                        "other round (A B B A ...), and summarize each over all its rounds: a GPU that "
                        "slows as it heats up then weighs every case alike")
    p.add_argument("--fresh-process", action="store_true",
                   help="run every measurement in a new process (same options), not one after another in this one")
    p.add_argument("--out", default=None)
    return p


def main():
    p = build_parser()
    a = p.parse_args()
    use_large_cuda_graphs()   # as the training CLI does, before the first GPU evaluation
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    if a.packed_doc_len < 0:
        p.error("--packed-doc-len must be >= 0")
    if a.causal_split_parts is not None:
        if a.causal_split_parts < 1:
            p.error("--causal-split-parts must be >= 1")
        maga.CAUSAL_SPLIT_PARTS = a.causal_split_parts
    for option, name in (("cema_bwd_max_npt", "BWD_MAX_NPT"), ("cema_fwd_max_npt", "FWD_MAX_NPT"),
                         ("cema_target_threads", "TARGET_THREADS"), ("cema_min_chunk", "MIN_CHUNK")):
        value = getattr(a, option)
        if value is not None:
            if value < 1:
                p.error(f"--{option.replace('_', '-')} must be >= 1")
            setattr(cema_kernels, name, value)
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {', '.join(bad)} (known: {', '.join(VARIANTS)})")
    overrides = {} if a.layers is None else {"num_layers": a.layers}
    if a.tiny:
        from benchmarks.peers import TINY
        args = ModelArgs.from_dict({**TINY, **overrides})
    else:
        args = preset(a.preset, **overrides)
    meta = {"device": device_name(), "mlx": mx.__version__, "model": "tiny" if a.tiny else a.preset, "parameters": parameter_count(args),
            "dtype": a.dtype, "command": "python " + " ".join(sys.argv),
            "causal_split_parts": maga.CAUSAL_SPLIT_PARTS,
            "cema": {name: getattr(cema_kernels, name) for name in
                     ("FWD_MAX_NPT", "BWD_MAX_NPT", "TARGET_THREADS", "MIN_CHUNK")}}
    meta["fresh_process"], meta["pid"], meta["gpu"] = a.fresh_process, os.getpid(), gpu_identity()
    print(json.dumps(meta), flush=True)
    cases = [(int(x), v) for x in a.seq_lens.split(",") for v in variants]
    rows_out, summary = [], []
    for rnd in range(a.rounds):
        for L, variant in (cases if rnd % 2 == 0 else cases[::-1]):
            rows = max(1, a.tokens_per_step // L)
            before = gpu_state()
            if a.fresh_process:
                r = measure_in_child(p, a, L, variant)
            else:
                r = measure(args, L, rows, a.steps, a.warmup, a.grad_checkpoint, not a.no_compile, a.dtype, variant,
                            a.packed_doc_len, a.pipelined)
            r.update({"round": rnd, "gpu_before": before, "gpu_after": gpu_state()})
            rows_out.append(r)
            gpu = f"  GPU {r['gpu_after']}" if r["gpu_after"] else ""
            print(f"{variant:>11s} seq {L:>7,d} x {rows:>3d} rows: {r['tokens_per_s']:>10,.0f} tok/s  "
                  f"step {r['step_s']:.3f} s  first step {r['first_step_s']:.1f} s  "
                  f"peak {r['peak_memory_gb']:.2f} GB  loss {r['loss']:.3f}  "
                  f"host graph {r['host_call_s'] * 1e3:.1f} ms  async_eval {r['host_eval_call_s'] * 1e3:.1f} ms{gpu}",
                  flush=True)
            if a.rounds > 1:
                summary = summarize_rounds(rows_out)
            if a.out:  # after every measurement, so a run cut short keeps what it measured
                Path(a.out).write_text(json.dumps({"meta": meta, "results": rows_out, "summary": summary},
                                                  indent=2) + "\n")
    if a.rounds > 1:
        print(f"\nover {a.rounds} rounds (median step of all timed steps):")
        for r in summary:
            print(f"{r['variant']:>11s} seq {r['seq_len']:>7,d}: {r['tokens_per_s']:>10,.0f} tok/s  "
                  f"rounds {', '.join(f'{t:,.0f}' for t in r['tokens_per_s_by_round'])}")


# Options a child process of --fresh-process does not inherit: the parent picks its one case.
_PER_CASE = {"seq_lens", "variants", "rounds", "fresh_process", "out", "help"}


def measure_in_child(parser, a, seq_len, variant):
    """One measurement in a new process with this run's options; its result row."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--seq-lens", str(seq_len), "--variants", variant]
    for action in parser._actions:
        if action.dest in _PER_CASE or not action.option_strings:
            continue
        value = getattr(a, action.dest)
        if value == action.default:
            continue
        argv += [action.option_strings[-1]] if value is True else [action.option_strings[-1], str(value)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        r = subprocess.run(argv + ["--out", str(out)], capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"train_throughput: the process for seq {seq_len} / {variant} failed: {tail[0]}")
        return json.loads(out.read_text())["results"][0]


def summarize_rounds(rows_out):
    """Per (variant, length): tokens/s from the median of every timed step of every round."""
    out = []
    for key in dict.fromkeys((r["variant"], r["seq_len"]) for r in rows_out):
        mine = [r for r in rows_out if (r["variant"], r["seq_len"]) == key]
        step = float(np.median([t for r in mine for t in r["step_s_all"]]))
        out.append({"variant": key[0], "seq_len": key[1], "step_s": step,
                    "tokens_per_s": mine[0]["tokens_per_step"] / step,
                    "tokens_per_s_by_round": [r["tokens_per_s"] for r in mine]})
    return out


def nvidia_smi(query: str) -> str:
    """GPU 0's answer to ``nvidia-smi --query-gpu=QUERY``, or '' where there is no nvidia-smi."""
    lines = nvidia_smi_lines(query, timeout=10)
    return lines[0] if lines else ""


def gpu_state() -> str:
    """SM clock, temperature and power of GPU 0, or '': the runs of one process get slower as the
    GPU heats up, and this shows by how much it throttled."""
    return nvidia_smi("clocks.sm,temperature.gpu,power.draw")


def gpu_identity() -> str:
    """GPU 0's name, UUID and PCI bus id, or '': lent machines of one kind differ by a few percent
    (H200, seventh session), so a row says which GPU it ran on."""
    return nvidia_smi("name,uuid,pci.bus_id")


if __name__ == "__main__":
    main()
