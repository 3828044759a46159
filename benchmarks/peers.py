#!/usr/bin/env python3
"""Side-by-side benchmark: mlx-megalodon, the PyTorch reference (eager and torch.compile),
megalodon-jax and a matched Llama-style Transformer (MLX and PyTorch) on the same weights and inputs.

    python benchmarks/peers.py --preset mega200M --out benchmarks/results/peers_h200
    python benchmarks/peers.py --tiny --seq-lens 256,1024 --tokens-per-step 2048 --contexts 256,1K
    python benchmarks/peers.py --report-only --out DIR [--merge DIR2 ...]

Split over two runs by --systems (e.g. mlx,llama_mlx,torch_ref,llama_torch then
jax,torch_ref_compile,llama_torch_compile into another folder) and join them with --report-only
--merge; the Megalodon gate reference (mlx) is recomputed in a run that does not measure mlx.

One random-init Megalodon model is written once as an upstream checkpoint directory and every
Megalodon system loads it through its own loader; one random Llama weight file feeds both Llama
builds. Each system runs in its own process (``--worker``), so MLX, PyTorch and JAX never share a GPU
allocator, and peak memory is per measurement.

Correctness gate first: on one input longer than an attention chunk each system's logits, in
float32 and in bf16 (bf16 weights and compute, CEMA/norms in float32), are compared with the float32
logits of the family's reference (mlx-megalodon for Megalodon, the MLX Llama for Llama):
max|diff| <= tol * max|reference logit| (``--gate-tol-fp32``, ``--gate-tol-bf16``). A system that fails
is reported as failing and not measured.

Then per system: training steps (forward, backward, clip, AdamW; float32 parameters, bf16 compute) at
each ``--seq-lens`` with ``--tokens-per-step`` tokens per step; prefill and greedy decoding at each
``--contexts`` with bf16 weights. Results go to ``--out``: ``systems/NAME.json`` per system (so runs
split by ``--systems`` add up in one folder), ``peers.json``, ``peers.md`` and PNG plots.

Time limits: ``--budget-s`` bounds the whole run and ``--job-timeout-s`` one job of a worker. The
parent watches each worker and kills it (its whole process group, compile workers included) at
either limit; the job it was in is recorded as a timeout, what it finished is kept, and the system's
remaining jobs go to a fresh worker while budget remains. A worker whose failed job left memory
behind also hands the remaining jobs to a fresh worker (see ``peers_workers.worker_main``).

Repeated training rounds: ``--train-rounds N`` (N > 1) follows the normal pass with rounds 2..N of
the training jobs alone (no gate: the weights are the same) for every system whose gate passed, each
length that trained in round 1, every system's round in a fresh worker. The systems' order
alternates (round 2 reversed, round 3 as normal, ...) so that a GPU slowing down over time does not
always hit the same one. A training record then keeps each round's tokens/s and peak memory, and its
tokens/s is the median over the rounds; the report adds, for each target ratio, the ratio of the two
systems' same rounds (measured back to back on one machine) with min / median / max. Machine
instances of one GPU model differ by ~5% in training throughput, so compare systems this way, in one
run, e.g. on the H200:

    python3 benchmarks/peers.py --preset mega200M --systems mlx,jax --seq-lens 4K --contexts "" --steps 10 \
        --warmup 2 --train-rounds 3 --budget-s 560 --job-timeout-s 240

Training loop: ``--train-loop synchronous`` (the default) waits for every step before the next
starts, in every system. ``--train-loop pipelined`` starts each step before waiting for the one
before, as a real training loop that reads its loss one step late does. mlx_megalodon.train runs
this way; JAX and PyTorch dispatch asynchronously anyway. The host's work on a step then overlaps
the device's work on the previous one. That matters most for MLX, whose compiled step call builds
the step's graph on the host. For mega200M at 8 x 4K this took 24-28 ms per call on this project's
2-core CPU. That graph holds the CPU's pure-ops CEMA and TimestepNorm; on a GPU the kernels make it
smaller, by an amount not yet measured. Results of the two loops do not merge into one report.

Results of runs with and without ``--mlx-grad-checkpoint`` merge: the MLX systems that trained with
gradient checkpointing are labelled ``NAME (grad ckpt)``, and the ratio rows pair like with like
where both were measured and mark any unlike pair.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import llama_baseline  # noqa: E402
from benchmarks.peers_workers import (FAMILY, ISOLATED, REFERENCE, SYSTEMS, TRAIN_LOOPS,  # noqa: E402
                                      load_extra_systems, nvidia_smi_lines, worker_main)
from mlx_megalodon.config import ModelArgs, parameter_count, preset  # noqa: E402

ALL_SYSTEMS = list(SYSTEMS)
TINY = dict(num_layers=2, model_dim=128, z_dim=64, value_dim=256, num_heads=1, ffn_hidden_dim=256,
            cema_ndim=16, chunk_size=128, norm_num_groups=8, vocab_size=4096)
PAIRS = [("mlx", "llama_mlx"), ("torch_ref", "llama_torch"), ("torch_ref_compile", "llama_torch_compile")]


class UsageError(ValueError):
    pass


def parse_size(text: str) -> int:
    """'4K' -> 4096, '1M' -> 1048576, '300' -> 300 (binary multiples, as sequence lengths are)."""
    t = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2}.get(t[-1:], 1)
    digits = t[:-1] if mult > 1 else t
    try:
        value = int(float(digits) * mult)
    except ValueError:
        raise UsageError(f"cannot read '{text}' as a length (e.g. 4096, 4K, 128K)") from None
    if value <= 0:
        raise UsageError(f"lengths must be positive, got '{text}'")
    return value


def size_label(n: int) -> str:
    if n % (1024 ** 2) == 0:
        return f"{n // 1024 ** 2}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


# ============================================================================ settings
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--preset", default="mega200M", help="Megalodon preset (default mega200M)")
    g.add_argument("--tiny", action="store_true", help="a 2-layer, 128-dim model with chunk 128 for CPUs")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (both models)")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list from {','.join(ALL_SYSTEMS)}")
    p.add_argument("--seq-lens", default="4K,32K", help="training sequence lengths")
    p.add_argument("--tokens-per-step", type=int, default=32768, help="tokens per training step (rows = this / seq len)")
    p.add_argument("--contexts", default="4K,32K,128K", help="prefill/decode context lengths")
    p.add_argument("--prefill-step", type=int, default=8192, help="tokens per prefill call for streaming systems")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3, help="timed training steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first (compilation)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="skip the remaining measurements after this many seconds (a worker still running then "
                        "is killed and its job recorded as a timeout)")
    p.add_argument("--job-timeout-s", type=float, default=None,
                   help="kill a worker whose current job (or start-up) runs longer than this, record the job as a "
                        "timeout and go on with a fresh worker (default: only --budget-s limits it)")
    p.add_argument("--train-rounds", type=int, default=1,
                   help="after the normal pass, run every passing system's training jobs again in rounds 2..N "
                        "(fresh workers, the systems' order alternating) and report medians and paired ratios")
    p.add_argument("--gate-tol-fp32", type=float, default=5e-4)
    p.add_argument("--gate-tol-bf16", type=float, default=2e-2)
    p.add_argument("--mlx-grad-checkpoint", action="store_true",
                   help="train both MLX systems with gradient checkpointing (the MLX Transformer's full "
                        "attention matrices do not fit otherwise: MLX 0.32's CUDA SDPA has no fused backward)")
    p.add_argument("--train-loop", default="synchronous", choices=list(TRAIN_LOOPS),
                   help="synchronous: every system waits for each training step before starting the next; "
                        "pipelined: each step is started before the previous one is waited for, as a training "
                        "loop that reads its loss one step late runs (mlx_megalodon.train's does)")
    p.add_argument("--llama-head-dim", type=int, default=64, choices=[64, 128])
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="torch/jax device (MLX uses its default)")
    p.add_argument("--out", default="benchmarks/results/peers", help="output folder")
    p.add_argument("--merge", nargs="*", default=[], help="more output folders whose systems/*.json join the report")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from --out (and --merge) only")
    p.add_argument("--gate-only", action="store_true", help="run the correctness gate only (a quick check)")
    p.add_argument("--keep-weights", default=None, help="write the weights here and keep them (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--job-file", default=None, help=argparse.SUPPRESS)
    return p


def resolve(a) -> dict:
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise UsageError(f"--systems: unknown {', '.join(unknown) or '(none given)'} (known: {', '.join(ALL_SYSTEMS)})")
    overrides = {} if a.layers is None else {"num_layers": a.layers}
    if a.tiny:
        mega = ModelArgs.from_dict({**TINY, **overrides})
        model_name = "tiny"
    else:
        mega = preset(a.preset, **overrides)
        model_name = a.preset + ("" if a.layers is None else f" ({a.layers} layers)")
    # An empty list skips that half of the work (e.g. --seq-lens "" for inference only).
    seq_lens = [parse_size(s) for s in a.seq_lens.split(",") if s.strip()]
    contexts = [parse_size(s) for s in a.contexts.split(",") if s.strip()]
    if not seq_lens and not contexts:
        raise UsageError("--seq-lens and --contexts are both empty: nothing to measure")
    for L in seq_lens:
        if L > mega.chunk_size and L % mega.chunk_size:
            raise UsageError(f"--seq-lens {L} must be at most chunk_size {mega.chunk_size} or a multiple of it")
    for name, v in (("--tokens-per-step", a.tokens_per_step), ("--prefill-step", a.prefill_step),
                    ("--decode-tokens", a.decode_tokens), ("--steps", a.steps)):
        if v <= 0:
            raise UsageError(f"{name} must be positive, got {v}")
    if a.warmup < 1:
        raise UsageError("--warmup must be at least 1 (the first step compiles)")
    if a.job_timeout_s is not None and a.job_timeout_s <= 0:
        raise UsageError(f"--job-timeout-s must be positive, got {a.job_timeout_s:g}")
    n_mega = parameter_count(mega)
    llama = llama_baseline.matched_llama_args(mega, n_mega, head_dim=a.llama_head_dim if not a.tiny else 64)
    return {"systems": systems, "model": model_name, "mega_args": mega.to_dict(), "mega_parameters": n_mega,
            "llama_args": llama.to_dict(), "llama_parameters": llama_baseline.parameter_count(llama),
            "seq_lens": seq_lens, "tokens_per_step": a.tokens_per_step, "contexts": contexts,
            "prefill_step": a.prefill_step, "decode_tokens": a.decode_tokens, "steps": a.steps,
            "warmup": a.warmup, "tol_fp32": a.gate_tol_fp32, "tol_bf16": a.gate_tol_bf16, "device": a.device,
            "gate_only": a.gate_only, "mlx_grad_checkpoint": a.mlx_grad_checkpoint, "train_rounds": a.train_rounds,
            "train_loop": a.train_loop}


# Settings that must agree for two systems' results to share a report. --mlx-grad-checkpoint is not
# one of them: each system is labelled with how it trained (see trained_with_checkpointing).
SETTINGS_KEYS = ("model", "mega_args", "llama_args", "tokens_per_step", "prefill_step", "decode_tokens",
                 "tol_fp32", "tol_bf16", "train_loop")
SETTINGS_DEFAULTS = {"train_loop": "synchronous"}   # what results from before the setting existed used


def settings_key(s: dict) -> str:
    return json.dumps({k: s.get(k, SETTINGS_DEFAULTS.get(k)) for k in SETTINGS_KEYS}, sort_keys=True)


# ============================================================================ weights
def write_megalodon_weights(args: ModelArgs, directory: Path, seed: int = 0) -> None:
    """The model's own random init (torch_ref.Mega), with the zero-initialized norm scales, Q/K
    affine and biases given small random values so that the gate exercises them, saved once as an
    upstream checkpoint directory (mlx_megalodon.checkpoint.write_upstream_dir)."""
    import torch
    from mlx_megalodon.checkpoint import write_upstream_dir
    from torch_ref import Mega
    torch.manual_seed(seed)
    model = Mega(args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("mega.gamma") or name.endswith("mega.beta"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    sd = model.state_dict()
    write_upstream_dir(directory, args, sd, None)


def write_gate_tokens(path: Path, vocab: int, length: int, seed: int) -> None:
    np.save(path, np.random.default_rng(seed).integers(0, vocab, size=(1, length)).astype(np.int32))


# ============================================================================ orchestration
def read_records(path: Path) -> List[dict]:
    """The worker's JSON lines; a line it was writing when it was killed is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


# MLX runs float32 matmuls as TF32 on CUDA unless told otherwise: its gate runs in full float32, in a
# process of its own so that the measured runs keep MLX's defaults.
GATE_ENV = {"mlx": {"MLX_ENABLE_TF32": "0"}}
POLL_S = 0.25          # how often the parent looks at a running worker
KILL_GRACE_S = 5.0     # SIGTERM, then this long before SIGKILL


def kill_process_group(proc: subprocess.Popen) -> None:
    """End a worker and everything it started (inductor's compile workers, say): it leads its own
    process group (start_new_session), so the group id is its pid."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:      # the leader is gone: its children may still be running
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def watch_worker(proc: subprocess.Popen, result_file: Path, deadline: float,
                 job_timeout_s: Optional[float]) -> Optional[dict]:
    """Wait for a worker, killing it (its whole process group) at ``deadline`` or when one phase
    (start-up and setup, then each job) runs longer than ``job_timeout_s``; a phase ends when the
    worker appends a record. Returns None when it exited by itself, else what ended it:
    {"cause": "budget" | "job timeout", "phase_s": seconds the unfinished phase had run}."""
    seen, phase_start = 0, time.time()
    while proc.poll() is None:
        now = time.time()
        count = len(read_records(result_file))
        if count > seen:
            seen, phase_start = count, now
        cause = None
        if now >= deadline:
            cause = "budget"
        elif job_timeout_s and now - phase_start > job_timeout_s:
            cause = "job timeout"
        if cause:
            kill_process_group(proc)
            return {"cause": cause, "phase_s": now - phase_start}
        time.sleep(POLL_S)
    return None


def run_worker(name: str, job: dict, jobs: List[str], work: Path, log_dir: Path, deadline: float,
               extra_env: Optional[dict] = None, job_timeout_s: Optional[float] = None) -> List[dict]:
    """One worker process for ``jobs``; returns its records, with a record for the job it died in
    or was killed in (status "skipped", ``timed_out``, when the parent ended it)."""
    result_file = work / f"{name}-{time.time_ns()}.jsonl"
    job_file = work / f"{name}-job.json"
    job_file.write_text(json.dumps({**job, "jobs": jobs, "result_file": str(result_file), "deadline": deadline}))
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", **(extra_env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--job-file", str(job_file)]
    log_path = log_dir / f"{name}.log"
    with open(log_path, "a") as log:
        log.write(f"\n=== {' '.join(jobs)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT),
                                start_new_session=True)
        try:
            killed = watch_worker(proc, result_file, deadline, job_timeout_s)
        except BaseException:          # Ctrl-C in the parent: take the worker down with it
            kill_process_group(proc)
            raise
        rc = proc.returncode
    records = read_records(result_file)
    done = {r["job"] for r in records}
    missing = [j for j in ["setup"] + jobs if j not in done]
    if killed and missing:
        limit = ("the --budget-s deadline" if killed["cause"] == "budget"
                 else f"--job-timeout-s {job_timeout_s:g}")
        records.append({"job": missing[0], "status": "skipped", "timed_out": True,
                        "reason": f"timeout: worker killed after {killed['phase_s']:.0f} s in this job ({limit})"})
        with open(log_path, "a") as log:
            log.write(f"\n=== killed by peers.py: {records[-1]['reason']}\n")
    elif rc != 0 and missing:
        tail = log_path.read_text().strip().splitlines()[-3:]
        records.append({"job": missing[0], "status": "error",
                        "reason": f"worker died (exit {rc}): {' | '.join(tail)[-300:]}"})
    return records


def run_system(name: str, job: dict, settings: dict, work: Path, log_dir: Path, deadline: float,
               job_timeout_s: Optional[float] = None, jobs: Optional[List[str]] = None) -> dict:
    """One system's jobs (default: the gate, then training and inference; ``jobs``: just those, as
    the extra training rounds run them), in as few workers as the jobs allow: a new worker picks up
    after a worker that stopped early (a job it was killed in, a failed job that left memory behind)."""
    if jobs is None:
        jobs = ["gate"]
        if not settings.get("gate_only"):
            jobs += [f"train:{L}" for L in settings["seq_lens"]] + [f"infer:{c}" for c in settings["contexts"]]
    gate_env = GATE_ENV.get(SYSTEMS[name][0].framework)
    result = {"system": name, "family": FAMILY[name], "settings": settings, "settings_key": settings_key(settings),
              "records": {}}
    pending = list(jobs)
    while pending:
        if time.time() > deadline:
            for j in pending:
                result["records"][j] = {"job": j, "status": "skipped", "reason": "time budget exhausted"}
            break
        batch = pending[:1] if name in ISOLATED or (gate_env and pending[0] == "gate") else pending
        records = run_worker(name, job, batch, work, log_dir, deadline, gate_env if batch == ["gate"] else None,
                             job_timeout_s)
        for r in records:
            if r["job"] == "setup":
                if "setup" not in result or r["status"] == "ok":
                    result["setup"] = r
                if r["status"] != "ok":
                    for j in pending:
                        result["records"][j] = {"job": j, "status": "skipped", "reason": f"setup {r['status']}: "
                                                f"{r.get('reason', '')}"}
                    return result
            elif r["job"] in pending:
                result["records"][r["job"]] = r
        progressed = [j for j in pending if j in result["records"]]
        pending = [j for j in pending if j not in result["records"]]
        gate = result["records"].get("gate")
        if gate is not None and not (gate["status"] == "ok" and gate.get("passed")):
            why = "gate failed" if gate["status"] == "ok" else f"gate {gate['status']}"
            for j in pending:
                result["records"][j] = {"job": j, "status": "skipped", "reason": f"{why}: not measured"}
            break
        if not progressed:   # a worker that finished none of its jobs: do not loop
            for j in pending:
                result["records"][j] = {"job": j, "status": "error", "reason": "worker produced no output"}
            break
    return result


GPU_QUERY = ("name", "memory.total", "uuid", "pci.bus_id")


def gpu_identity() -> Optional[List[dict]]:
    """Each GPU's name, memory, UUID and PCI bus id from nvidia-smi (None without it): the UUID tells
    one machine instance of a GPU model from another, whose throughput can differ by a few percent."""
    gpus = []
    for line in nvidia_smi_lines(",".join(GPU_QUERY)):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == len(GPU_QUERY):
            gpus.append(dict(zip(("name", "memory", "uuid", "pci_bus_id"), fields)))
    return gpus or None


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": platform.processor()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info["cpu_count"] = os.cpu_count()
    info["gpus"] = gpu_identity()
    info["gpu"] = "; ".join(f"{g['name']}, {g['memory']}" for g in info["gpus"]) if info["gpus"] else None
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for pkg in ("mlx", "mlx-cuda", "torch", "jax", "jaxlib", "equinox", "megalodon-jax", "numpy"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    info["versions"] = versions
    return info


def run(a, settings: dict) -> Path:
    out = Path(a.out)
    (out / "systems").mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    log_dir.mkdir(exist_ok=True)
    start = time.time()
    deadline = start + a.budget_s
    # The run's id lets the report pair rounds only between systems measured in one run (one machine).
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    meta = {"machine": machine_info(), "command": "python " + " ".join(sys.argv), "run_id": run_id,
            "budget_s": a.budget_s, "job_timeout_s": a.job_timeout_s, "train_rounds": settings["train_rounds"]}
    (out / "run_meta.json").write_text(json.dumps(meta, indent=1) + "\n")      # kept if the run is killed
    weights = Path(a.keep_weights) if a.keep_weights else Path(tempfile.mkdtemp(prefix="peers-weights-"))
    weights.mkdir(parents=True, exist_ok=True)
    try:
        mega = ModelArgs.from_dict(settings["mega_args"])
        llama = llama_baseline.LlamaArgs(**settings["llama_args"])
        families = {FAMILY[s] for s in settings["systems"]}
        tic = time.perf_counter()
        job = {k: settings[k] for k in ("tokens_per_step", "prefill_step", "decode_tokens", "steps", "warmup",
                                       "tol_fp32", "tol_bf16", "device", "mlx_grad_checkpoint", "train_loop")}
        job["llama_args"] = settings["llama_args"]
        gate_len = mega.chunk_size + mega.chunk_size // 4         # crosses one chunk boundary
        job["gate_tokens"], job["gate_reference"] = {}, {}
        for fam in ("megalodon", "llama"):
            job["gate_tokens"][fam] = str(weights / f"gate_tokens_{fam}.npy")
            job["gate_reference"][fam] = str(weights / f"gate_reference_{fam}.npy")
            write_gate_tokens(Path(job["gate_tokens"][fam]), mega.vocab_size, gate_len, seed=7)
        if "megalodon" in families:
            job["megalodon_dir"] = str(weights / "megalodon_upstream")
            if not (weights / "megalodon_upstream" / "consolidated.pth").exists():
                write_megalodon_weights(mega, weights / "megalodon_upstream")
        if "llama" in families:
            job["llama_weights"] = str(weights / "llama.npz")
            if not Path(job["llama_weights"]).exists():
                llama_baseline.save_weights(job["llama_weights"], llama_baseline.random_weights(llama))
        print(f"weights written in {time.perf_counter() - tic:.1f} s ({weights})", flush=True)
        order = []
        for fam in ("megalodon", "llama"):       # each family's reference first: it writes the gate logits
            chosen = [s for s in settings["systems"] if FAMILY[s] == fam]
            if chosen:
                ref = REFERENCE[fam]
                if ref not in chosen:
                    order.append((ref, True))
                order += [(s, False) for s in sorted(chosen, key=lambda s: s != ref)]
        work = weights / "work"
        work.mkdir(exist_ok=True)
        results: Dict[str, dict] = {}

        def save(name):
            (out / "systems" / f"{name}.json").write_text(json.dumps(results[name], indent=1) + "\n")

        for name, reference_only in order:
            tic = time.time()
            if reference_only:
                print(f"[{name}] reference logits for the gate", flush=True)
                recs = run_worker(name, job, ["gate"], work, log_dir, deadline, GATE_ENV.get(SYSTEMS[name][0].framework),
                                  a.job_timeout_s)
                ok = any(r["job"] == "gate" and r.get("passed") for r in recs)
                print(f"[{name}] reference {'written' if ok else 'FAILED: ' + str(recs[-1:])}", flush=True)
                continue
            print(f"[{name}] running", flush=True)
            res = run_system(name, job, settings, work, log_dir, deadline, a.job_timeout_s)
            res["wall_s"] = time.time() - tic
            res["run_id"] = run_id
            results[name] = res
            save(name)
            print(f"[{name}] done in {res['wall_s']:.0f} s: " + ", ".join(
                f"{j}={r['status']}" for j, r in res["records"].items()), flush=True)
        if settings["train_rounds"] > 1 and not settings.get("gate_only"):
            measured = [name for name, reference_only in order if not reference_only]
            meta["rounds"] = run_train_rounds(results, measured, settings["train_rounds"], job, settings, work,
                                              log_dir, deadline, a.job_timeout_s, save)
    finally:
        if not a.keep_weights:
            shutil.rmtree(weights, ignore_errors=True)
    meta["total_wall_s"] = time.time() - start
    (out / "run_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def start_rounds(rec: dict, rounds: int) -> None:
    """Turn a training record of the normal pass into round 1 of ``rounds``. Its other fields
    (step_s, compile_s, peak_memory_gb, losses) stay round 1's."""
    rec.update(rounds_requested=rounds, round_numbers=[1], tokens_per_s_rounds=[rec["tokens_per_s"]],
               peak_memory_gb_rounds=[rec.get("peak_memory_gb")], tokens_per_s_round1=rec["tokens_per_s"],
               round_failures=[])


def add_round(rec: dict, round_number: int, got: Optional[dict]) -> None:
    """Add one extra round's record (None: the worker never reported the job) to a training record:
    its tokens/s and peak memory where it succeeded (tokens_per_s becomes the median over the
    rounds), else why it did not."""
    if got is not None and got.get("status") == "ok":
        rec["round_numbers"].append(round_number)
        rec["tokens_per_s_rounds"].append(got["tokens_per_s"])
        rec["peak_memory_gb_rounds"].append(got.get("peak_memory_gb"))
        rec["tokens_per_s"] = float(np.median(rec["tokens_per_s_rounds"]))
    else:
        got = got or {"status": "error", "reason": "no record from the worker"}
        rec["round_failures"].append({"round": round_number, "status": got.get("status"),
                                      "reason": got.get("reason", ""), "timed_out": bool(got.get("timed_out"))})


def run_train_rounds(results: Dict[str, dict], order: List[str], rounds: int, job: dict, settings: dict,
                     work: Path, log_dir: Path, deadline: float, job_timeout_s: Optional[float], save) -> List[dict]:
    """Rounds 2..``rounds`` of training (--train-rounds): the train jobs that succeeded in the normal
    pass (round 1), of the systems whose gate passed, again, each system's round in fresh workers
    (``run_system`` with those jobs only), in ``order`` reversed in even rounds. ``results`` (the
    normal pass's, by system) gain the rounds, and ``save(name)`` writes a system's file after each of
    its rounds, so that a run cut short keeps what it measured. Under --budget-s the round in which
    the budget ran out is the last (its unfinished jobs recorded as such). Returns one entry per round."""
    train_jobs: Dict[str, List[str]] = {}
    for name in order:
        records = results[name]["records"]
        gate = records.get("gate", {})
        if not (gate.get("status") == "ok" and gate.get("passed")):
            continue
        jobs = [j for j, r in records.items() if j.startswith("train:") and r.get("status") == "ok"]
        if jobs:
            train_jobs[name] = jobs
            for j in jobs:
                start_rounds(records[j], rounds)
            save(name)
    names = [n for n in order if n in train_jobs]
    log = []
    for round_number in range(2, rounds + 1):
        sequence = names[::-1] if round_number % 2 == 0 else names
        tic, complete = time.time(), True
        for name in sequence:
            print(f"[{name}] training round {round_number}/{rounds}", flush=True)
            res = run_system(name, job, settings, work, log_dir, deadline, job_timeout_s, jobs=train_jobs[name])
            for j in train_jobs[name]:
                got = res["records"].get(j)
                add_round(results[name]["records"][j], round_number, got)
                complete &= got is not None and got.get("status") == "ok"
            save(name)
            print(f"[{name}] round {round_number}: " + ", ".join(
                f"{j}={r['status']}" for j, r in res["records"].items()), flush=True)
        log.append({"round": round_number, "order": sequence, "wall_s": time.time() - tic, "complete": complete})
        if time.time() > deadline and round_number < rounds:
            print(f"time budget exhausted: training rounds {round_number + 1}..{rounds} not run", flush=True)
            break
    return log


# ============================================================================ report
CKPT_LABEL = " (grad ckpt)"


def trained_with_checkpointing(sysres: dict) -> bool:
    """Whether the system trained with gradient checkpointing: what its training records say, or,
    for results from before they said it, the run's --mlx-grad-checkpoint on an MLX system."""
    flags = [r["grad_checkpoint"] for j, r in sysres["records"].items()
             if j.startswith("train:") and "grad_checkpoint" in r]
    if flags:
        return any(flags)
    framework = getattr(SYSTEMS.get(sysres["system"], (None,))[0], "framework", None)
    return bool(sysres.get("settings", {}).get("mlx_grad_checkpoint")) and framework == "mlx"


def system_label(sysres: dict) -> str:
    return sysres["system"] + (CKPT_LABEL if trained_with_checkpointing(sysres) else "")


def load_systems(dirs: List[Path]) -> Dict[str, dict]:
    """Every system's result in ``dirs``, keyed by its label (its name, plus " (grad ckpt)" when it
    trained with gradient checkpointing, so a run with and one without both stay); where two
    folders hold one label, the first folder's wins."""
    found: Dict[str, dict] = {}
    for d in reversed(dirs):
        for f in sorted((Path(d) / "systems").glob("*.json")):
            r = json.loads(f.read_text())
            r["_from"] = str(d)
            r["_checkpointed"] = trained_with_checkpointing(r)
            r["_label"] = system_label(r)
            found[r["_label"]] = r
    return found


def variants(systems: Dict[str, dict], name: str) -> Dict[bool, dict]:
    """{trained with checkpointing: result} for one system name."""
    return {r["_checkpointed"]: r for r in systems.values() if r["system"] == name}


def checkpoint_note(a: dict, b: dict) -> str:
    """Empty when a and b trained alike, else which one used gradient checkpointing."""
    if a["_checkpointed"] == b["_checkpointed"]:
        return ""
    return f"unlike: grad ckpt on {(a if a['_checkpointed'] else b)['system']} only"


def compare(systems: Dict[str, dict], a: str, b: str, L: int):
    """a's / b's training throughput at L, between variants that trained alike (neither
    checkpointed, else both) where both were measured, else between unlike ones (the caller
    labels those with checkpoint_note). Returns (a's result, b's result, ratio or None)."""
    va, vb = variants(systems, a), variants(systems, b)
    combos = [(c, c) for c in (False, True)] + [(False, True), (True, False)]
    present = [(va[ca], vb[cb]) for ca, cb in combos if ca in va and cb in vb]
    for ra, rb in present:
        q = ratio(tok_s(ra, L), tok_s(rb, L))
        if q is not None:
            return ra, rb, q
    if present:
        return present[0] + (None,)
    return next(iter(va.values()), None), next(iter(vb.values()), None), None


def label_or(sysres: Optional[dict], name: str) -> str:
    return name if sysres is None else sysres["_label"]


def _rec(sysres: Optional[dict], job: str) -> Optional[dict]:
    if sysres is None:
        return None
    r = sysres["records"].get(job)
    return r if r and r.get("status") == "ok" else None


def cell(sysres: Optional[dict], job: str, key: str, fmt: str = "{:,.0f}") -> str:
    if sysres is None:
        return "–"
    r = sysres["records"].get(job)
    if r is None:
        return "–"
    if r["status"] != "ok":
        reason = r.get("reason", "")
        if r.get("timed_out"):
            return "timeout"
        if r["status"] == "skipped":
            if "budget" in reason:
                return "skipped (budget)"
            return "gate failed" if "gate failed" in reason else ("skipped (timeout)" if "timeout" in reason else "skipped")
        if r["status"] == "n/a":
            return "n/a"
        short = reason.split(":")[0] if "out of memory" not in reason.lower() else "OOM"
        return f"error ({short})"
    v = r.get(key)
    return "–" if v is None else fmt.format(v)


GBF = "{:.3g}"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def tok_s(sysres, L) -> Optional[float]:
    r = _rec(sysres, f"train:{L}")
    return None if r is None else r["tokens_per_s"]


def round_values(rec: dict) -> Dict[int, float]:
    """{round number: tokens/s} of a training record measured in --train-rounds rounds ({} without)."""
    values = rec.get("tokens_per_s_rounds")
    if not values:
        return {}
    return dict(zip(rec.get("round_numbers") or range(1, len(values) + 1), values))


def train_cell(sysres: Optional[dict], L: int) -> str:
    """The training tokens/s cell: with rounds, their median followed by each round's value."""
    text = cell(sysres, f"train:{L}", "tokens_per_s")
    rec = _rec(sysres, f"train:{L}")
    values = round_values(rec) if rec is not None else {}
    if not values:
        return text
    listed = ", ".join(f"r{i} {v:,.0f}" for i, v in values.items())
    missing = rec.get("rounds_requested", len(values)) - len(values)
    return f"{text} ({listed}{f'; {missing} missing' if missing > 0 else ''})"


def paired_rounds(ra: Optional[dict], rb: Optional[dict], L: int) -> Optional[dict]:
    """a's / b's training throughput at L round by round (--train-rounds): round i of a over round i
    of b, which ran back to back on one machine. None unless both were measured in rounds in the
    same run (rounds of different runs, perhaps on different machines, do not pair)."""
    if ra is None or rb is None or ra.get("run_id") is None or ra.get("run_id") != rb.get("run_id"):
        return None
    a, b = _rec(ra, f"train:{L}"), _rec(rb, f"train:{L}")
    va, vb = (round_values(a), round_values(b)) if a is not None and b is not None else ({}, {})
    common = sorted(set(va) & set(vb))
    if not common:
        return None
    ratios = [va[i] / vb[i] for i in common]
    return {"rounds": common, "ratios": ratios, "min": min(ratios), "median": float(np.median(ratios)),
            "max": max(ratios)}


def build_report(dirs: List[Path], out: Path) -> str:
    systems = load_systems(dirs)
    if not systems:
        raise UsageError(f"no systems/*.json under {', '.join(map(str, dirs))}")
    meta_file = out / "run_meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {"machine": machine_info()}
    # the newest settings decide; systems measured under other settings are listed apart
    # (keys recomputed: a stored key may hold settings that no longer separate runs)
    primary = [r for r in systems.values() if Path(r["_from"]) == Path(dirs[0])] or list(systems.values())
    ref_key = settings_key(primary[0]["settings"])
    settings = primary[0]["settings"]
    mismatched = sorted(n for n, r in systems.items() if settings_key(r["settings"]) != ref_key)
    systems = {n: r for n, r in systems.items() if settings_key(r["settings"]) == ref_key}
    order = {n: i for i, n in enumerate(ALL_SYSTEMS)}
    names = sorted(systems, key=lambda n: (order.get(systems[n]["system"], len(order)), systems[n]["_checkpointed"]))
    seq, ctx = settings["seq_lens"], settings["contexts"]
    tps = settings["tokens_per_step"]

    lines = [f"### Peers: {settings['model']} Megalodon ({settings['mega_parameters'] / 1e6:.1f}M parameters) vs "
             f"a Llama-style Transformer ({settings['llama_parameters'] / 1e6:.1f}M)", ""]
    m = meta["machine"]
    gpu_ids = ", ".join(f"{g['uuid']} at {g['pci_bus_id']}" for g in m.get("gpus") or [])
    lines.append(f"Machine: {m.get('gpu') or 'no GPU'}{f' ({gpu_ids})' if gpu_ids else ''}; "
                 f"CPU {m.get('cpu')} ({m.get('cpu_count')} cores); {m.get('platform')}; Python {m.get('python')}.  ")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()) + ".  ")
    lines.append(f"Command: `{meta.get('command', '?')}`" + (f" (plus {', '.join(map(str, dirs[1:]))} merged)"
                                                            if len(dirs) > 1 else ""))
    lines.append("")
    lla = settings["llama_args"]
    lines.append(f"Llama baseline: {lla['num_layers']} layers, dim {lla['model_dim']}, {lla['num_heads']} heads "
                 f"of {lla['model_dim'] // lla['num_heads']}, SwiGLU {lla['ffn_hidden_dim']}, untied embeddings. "
                 f"Training: {tps:,} tokens per step, float32 parameters, bf16 compute, AdamW + clip 1.0, median of "
                 f"{settings['steps']} steps after {settings['warmup']} warm-up steps, "
                 f"{settings.get('train_loop', 'synchronous')} loop (--train-loop). Inference: bf16 weights (CEMA and "
                 f"norms float32), greedy decoding of {settings['decode_tokens']} tokens, batch 1. Gate: "
                 f"max|diff| <= {settings['tol_fp32']:g} (float32) / {settings['tol_bf16']:g} (bf16) x max|logit| of the "
                 f"family reference's float32 logits.")
    if any(round_values(rec) for r in systems.values() for rec in r["records"].values()):
        lines.append("Training rounds (--train-rounds): after the normal pass each system's training jobs ran "
                     "again in fresh workers, round after round, the systems' order alternating; tok/s is the "
                     "median over the rounds, each round's value (r1, r2, ...) follows it.")
    if any(r["_checkpointed"] for r in systems.values()):
        lines.append(f"`{CKPT_LABEL.strip()}`: trained with gradient checkpointing (--mlx-grad-checkpoint: each block's "
                     f"activations are recomputed in the backward pass, so a step costs more and its peak memory is "
                     f"smaller). Ratios compare systems that trained alike where both were measured, and say "
                     f"'unlike' where they could not.")
    lines.append("")

    # --- gate + training
    head = ["system", "device", "gate fp32", "gate bf16"]
    for L in seq:
        head += [f"train {size_label(L)}x{max(1, tps // L)} tok/s", "peak GB", "compile s"]
    if len(seq) >= 2:
        head.append(f"{size_label(seq[-1])}/{size_label(seq[0])}")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r = systems[n]
        dev = (r.get("setup") or {}).get("versions", {}).get("device") or (r.get("setup") or {}).get("reason", "?")
        g = r["records"].get("gate", {})
        def gcell(prec):
            if g.get("status") != "ok" or prec not in g:
                return g.get("reason", "–")[:60] if g else "–"
            e = g[prec]
            return f"{'pass' if e['passed'] else '**FAIL**'} {e['relative']:.1e}"
        row = [n, dev[:40], gcell("float32"), gcell("bfloat16")]
        for L in seq:
            row += [train_cell(r, L), cell(r, f"train:{L}", "peak_memory_gb", GBF),
                    cell(r, f"train:{L}", "compile_s", "{:.1f}")]
        if len(seq) >= 2:
            q = ratio(tok_s(r, seq[-1]), tok_s(r, seq[0]))
            row.append("–" if q is None else f"{q:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    # --- inference
    head = ["system", "prefill"] + [f"prefill tok/s {size_label(c)}" for c in ctx] + \
           [f"decode tok/s {size_label(c)}" for c in ctx]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r = systems[n]
        mode = next((rec.get("prefill_mode") for j, rec in r["records"].items()
                     if j.startswith("infer") and rec.get("status") == "ok"), "–")
        row = [n, mode] + [cell(r, f"infer:{c}", "prefill_tokens_per_s") for c in ctx] + \
              [cell(r, f"infer:{c}", "decode_tokens_per_s", "{:,.1f}") for c in ctx]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    head = ["system", "decode memory"] + [f"decode GB {size_label(c)}" for c in ctx] + \
           [f"prefill peak GB {size_label(c)}" for c in ctx]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r = systems[n]
        kind = next((rec.get("decode_memory_kind") for j, rec in r["records"].items()
                     if j.startswith("infer") and rec.get("status") == "ok"), "–")
        row = [n, kind] + [cell(r, f"infer:{c}", "decode_peak_memory_gb", GBF) for c in ctx] + \
              [cell(r, f"infer:{c}", "prefill_peak_memory_gb", GBF) for c in ctx]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    # --- the paper's claim and the targets: one row per pair of variants that trained alike
    # (or, where there is none, per unlike pair, marked as such)
    claims, head = [], ["Megalodon", "Transformer", "grad ckpt"] + [f"ratio at {size_label(L)}" for L in seq]
    lines += ["Megalodon / Transformer training throughput (the paper's 7B: 0.94x at 4K, 1.32x at 32K):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mega_name, llama_name in PAIRS:
        vm, vl = variants(systems, mega_name), variants(systems, llama_name)
        pairs = [(vm[c], vl[c]) for c in (False, True) if c in vm and c in vl]
        pairs = pairs or [(vm[a], vl[b]) for a in vm for b in vl]
        if not pairs and (vm or vl):
            pairs = [(next(iter(vm.values()), None), next(iter(vl.values()), None))]
        for rm, rl in pairs:
            vals = [ratio(tok_s(rm, L), tok_s(rl, L)) for L in seq]
            if rm is None or rl is None:
                ckpt = "–"
            elif rm["_checkpointed"] == rl["_checkpointed"]:
                ckpt = "both" if rm["_checkpointed"] else "neither"
            else:
                ckpt = f"**unlike**: {'Megalodon' if rm['_checkpointed'] else 'Transformer'} only"
            claims.append({"megalodon": label_or(rm, mega_name), "transformer": label_or(rl, llama_name),
                           "grad_checkpoint": ckpt, "ratios": {str(L): v for L, v in zip(seq, vals)}})
            lines.append("| " + " | ".join([label_or(rm, mega_name), label_or(rl, llama_name), ckpt]
                                           + ["–" if v is None else f"{v:.2f}x" for v in vals]) + " |")
    lines.append("")
    targets, unpaired = [], []

    def target(a, b, L, goal):
        ra, rb, q = compare(systems, a, b, L)
        what = f"{label_or(ra, a)} / {label_or(rb, b)} training at {size_label(L)}"
        note = checkpoint_note(ra, rb) if ra is not None and rb is not None else ""
        paired = paired_rounds(ra, rb, L)
        if paired is None and all(r is not None and round_values(_rec(r, f"train:{L}") or {}) for r in (ra, rb)):
            unpaired.append(what)
        targets.append((what + (f" (**{note}**)" if note else ""), q, goal, not note, paired))

    for L in seq:
        for other, goal in (("jax", 1.5), ("torch_ref", 1.25), ("torch_ref_compile", 1.25)):
            target("mlx", other, L, goal)
    if len(seq) >= 2:      # one variant for both lengths: the plain one where it has both
        mlx_variants = sorted(variants(systems, "mlx").values(), key=lambda r: r["_checkpointed"])
        found = [(r, ratio(tok_s(r, seq[-1]), tok_s(r, seq[0]))) for r in mlx_variants]
        r, q = next(((r, q) for r, q in found if q is not None), found[0] if found else (None, None))
        targets.append((f"{label_or(r, 'mlx')} {size_label(seq[-1])} / {size_label(seq[0])} training", q, 0.94, True,
                        None))
    for L, goal in zip(seq, (0.94, 1.32)):
        target("mlx", "llama_mlx", L, goal)
    lines += ["Issue targets:", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for what, v, goal, _, _ in targets:
        lines.append(f"| {what} | {'–' if v is None else f'{v:.2f}x'} | >= {goal}x | "
                     f"{'–' if v is None else ('yes' if v >= goal else 'no')} |")
    lines.append("")
    if any(paired for *_, paired in targets):
        lines += ["Paired training rounds (round i of one system over round i of the other: they ran back to "
                  "back in one run, so machine-to-machine and slow-down-over-time differences largely cancel):", "",
                  "| target | rounds | per-round ratios | min | median | max | goal met in |", "|" + "---|" * 7]
        for what, _, goal, _, paired in targets:
            if paired:
                ratios = ", ".join(f"r{i} {q:.2f}x" for i, q in zip(paired["rounds"], paired["ratios"]))
                met = sum(q >= goal for q in paired["ratios"])
                lines.append(f"| {what} | {len(paired['ratios'])} | {ratios} | {paired['min']:.2f}x | "
                             f"{paired['median']:.2f}x | {paired['max']:.2f}x | {met} of {len(paired['ratios'])} |")
        lines.append("")
    notes = []
    for n in names:
        for j, rec in systems[n]["records"].items():
            if rec.get("status") in ("error", "skipped") and "gate failed" not in rec.get("reason", ""):
                restart = f" ({rec['worker_restart']})" if rec.get("worker_restart") else ""
                notes.append(f"- {n} {j}: {rec['status']}: {rec.get('reason', '')}{restart}")
            for failure in rec.get("round_failures", []):
                notes.append(f"- {n} {j} round {failure['round']}: {failure['status']}: {failure['reason']}")
            if "rounds_requested" in rec:
                seen = set(rec.get("round_numbers", [])) | {f["round"] for f in rec.get("round_failures", [])}
                not_run = [i for i in range(1, rec["rounds_requested"] + 1) if i not in seen]
                if not_run:
                    notes.append(f"- {n} {j}: round{'s' if len(not_run) > 1 else ''} "
                                 f"{', '.join(map(str, not_run))} not run (time budget exhausted or run stopped)")
    for what in unpaired:
        notes.append(f"- {what}: both ran in rounds, but in different runs: their rounds are not paired")
    if mismatched:
        notes.append(f"- left out (measured with other settings): {', '.join(mismatched)}")
    if notes:
        lines += ["Notes:", ""] + notes + [""]
    md = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.md").write_text(md + "\n")
    (out / "peers.json").write_text(json.dumps({"meta": meta, "settings": settings, "systems": systems,
                                                "claims": claims,
                                                "targets": [{"what": w, "value": v, "goal": g, "like_settings": like,
                                                             "paired_rounds": paired}
                                                            for w, v, g, like, paired in targets]},
                                               indent=1) + "\n")
    try:
        plot(systems, names, settings, out)
    except ImportError as e:
        print(f"(no plots: {e})", file=sys.stderr)
    return md


def plot(systems, names, settings, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seq, ctx = settings["seq_lens"], settings["contexts"]
    title = f"{settings['model']} ({settings['mega_parameters'] / 1e6:.1f}M) vs Llama ({settings['llama_parameters'] / 1e6:.1f}M)"
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}          # one colour per system in every panel
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 3.8))
    width = 0.8 / max(1, len(seq))
    for i, L in enumerate(seq):
        vals = [tok_s(systems[n], L) or 0 for n in names]
        ax.bar(np.arange(len(names)) + (i - (len(seq) - 1) / 2) * width, vals, width,
               label=f"{size_label(L)} x {max(1, settings['tokens_per_step'] // L)}")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"Training throughput, {title}")
    ax.legend(title="seq len x rows")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "peers_train.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for n in names:
        for ax, key in zip(axes, ["decode_peak_memory_gb", "prefill_tokens_per_s", "decode_tokens_per_s"]):
            pts = [(c, _rec(systems[n], f"infer:{c}")) for c in ctx]
            pts = [(c, r[key]) for c, r in pts if r is not None and r.get(key) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n, color=colors[n])
    for ax, label in zip(axes, ["decode memory (GB)", "prefill tokens/s", "decode tokens/s"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)
    fig.suptitle(f"Inference, {title}")
    fig.tight_layout(rect=(0, 0, 0.87, 1))
    fig.savefig(out / "peers_inference.png", dpi=110)
    plt.close(fig)


# ============================================================================ main
def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.worker:
        load_extra_systems()
        if a.worker not in SYSTEMS or not a.job_file:
            p.error("--worker needs a known system and --job-file")
        return worker_main(a.worker, a.job_file)
    try:
        if a.train_rounds < 1:
            raise UsageError(f"--train-rounds must be at least 1 (1: no extra rounds), got {a.train_rounds}")
        out = Path(a.out)
        if not a.report_only:
            settings = resolve(a)
            print(json.dumps({k: settings[k] for k in ("systems", "model", "mega_parameters", "llama_parameters",
                                                       "seq_lens", "tokens_per_step", "contexts")}), flush=True)
            run(a, settings)
        md = build_report([out] + [Path(d) for d in a.merge], out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    print(f"\nwritten: {out / 'peers.md'}, {out / 'peers.json'}, {out / 'peers_train.png'}, {out / 'peers_inference.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
