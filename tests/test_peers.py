"""The correctness gate of benchmarks/peers.py on a tiny config: mlx-megalodon and torch_ref (and
megalodon-jax when installed) pass it on the same upstream-format weights, a deliberately perturbed
weight fails it; the MLX and PyTorch Llama baselines agree on shared weights. CPU, a few seconds."""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import llama_baseline
from benchmarks.peers import parse_size, write_gate_tokens, write_megalodon_weights
from benchmarks.peers_workers import SYSTEMS, run_gate
from mlx_megalodon.checkpoint import write_upstream_dir
from mlx_megalodon.config import ModelArgs, parameter_count, preset

TINY = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=48, num_heads=2, ffn_hidden_dim=40, cema_ndim=4,
            chunk_size=16, norm_num_groups=4, vocab_size=96)


@pytest.fixture(scope="module")
def gate_job(tmp_path_factory):
    d = tmp_path_factory.mktemp("peers")
    args = ModelArgs.from_dict(TINY)
    write_megalodon_weights(args, d / "mega")
    llama = llama_baseline.matched_llama_args(args, parameter_count(args), head_dim=16)
    llama_baseline.save_weights(d / "llama.npz", llama_baseline.random_weights(llama))
    job = {"megalodon_dir": str(d / "mega"), "llama_weights": str(d / "llama.npz"), "llama_args": llama.to_dict(),
           "tol_fp32": 5e-4, "tol_bf16": 2e-2, "device": "cpu", "gate_tokens": {}, "gate_reference": {}}
    for fam in ("megalodon", "llama"):
        job["gate_tokens"][fam] = str(d / f"tokens_{fam}.npy")
        job["gate_reference"][fam] = str(d / f"reference_{fam}.npy")
        write_gate_tokens(d / f"tokens_{fam}.npy", args.vocab_size, args.chunk_size + args.chunk_size // 2, seed=3)
    return args, job, d


def gate(name, job):
    cls, extra = SYSTEMS[name]
    system = cls()
    system.setup({**job, **extra})
    return run_gate(system, name, job)


def test_megalodon_gate_passes_and_catches_a_perturbed_weight(gate_job):
    args, job, d = gate_job
    ref = gate("mlx", job)                                  # writes the reference logits
    assert ref["passed"] and ref["float32"]["relative"] == 0.0
    assert ref["bfloat16"]["relative"] > 0.0                # bf16 is really compared, not skipped
    assert np.load(job["gate_reference"]["megalodon"]).shape == (1, 24, args.vocab_size)

    ok = gate("torch_ref", job)
    assert ok["passed"], ok
    assert ok["float32"]["relative"] < 1e-4

    # 2% on one feed-forward matrix of the last layer (about 5e-3 of the logit scale): inside the
    # bf16 tolerance, so the float32 comparison is what must catch it.
    sd = torch.load(d / "mega" / "consolidated.pth", weights_only=True)
    sd["layers.1.nffn.fc1.weight"] = sd["layers.1.nffn.fc1.weight"] * 1.02
    write_upstream_dir(d / "mega_bad", args, sd, None)
    bad = gate("torch_ref", {**job, "megalodon_dir": str(d / "mega_bad")})
    assert not bad["passed"]
    assert not bad["float32"]["passed"] and bad["float32"]["relative"] > job["tol_fp32"]
    shutil.rmtree(d / "mega_bad")


def test_gate_without_reference_fails(gate_job, tmp_path):
    _, job, _ = gate_job
    res = gate("torch_ref", {**job, "gate_reference": {"megalodon": str(tmp_path / "missing.npy")}})
    assert not res["passed"] and "no reference" in res["reason"]


@pytest.mark.skipif(importlib.util.find_spec("megalodon_jax") is None, reason="megalodon-jax not installed")
def test_megalodon_jax_passes_the_gate(gate_job):
    _, job, _ = gate_job
    if not Path(job["gate_reference"]["megalodon"]).exists():
        gate("mlx", job)
    res = gate("jax", job)
    assert res["passed"], res


def test_llama_baselines_agree(gate_job):
    _, job, _ = gate_job
    assert gate("llama_mlx", job)["passed"]
    res = gate("llama_torch", job)
    assert res["passed"] and res["float32"]["relative"] < 1e-4, res


def test_matched_llama_size_and_parse_size():
    mega = preset("mega200M")
    n = parameter_count(mega)
    for head_dim in (64, 128):
        llama = llama_baseline.matched_llama_args(mega, n, head_dim=head_dim)
        assert abs(llama_baseline.parameter_count(llama) / n - 1) < 0.05
        assert llama.head_dim == head_dim and llama.num_layers == mega.num_layers
    assert parse_size("4K") == 4096 and parse_size("128K") == 131072 and parse_size("300") == 300
    with pytest.raises(ValueError):
        parse_size("four")


def test_empty_work_lists(tmp_path, capsys):
    """--seq-lens "" measures inference only (and --contexts "" training only); both empty is an error."""
    from benchmarks.peers import build_parser, main, resolve
    a = build_parser().parse_args(["--tiny", "--seq-lens", "", "--contexts", "1K", "--out", str(tmp_path)])
    settings = resolve(a)
    assert settings["seq_lens"] == [] and settings["contexts"] == [1024]
    assert main(["--tiny", "--seq-lens", "", "--contexts", " ", "--out", str(tmp_path)]) == 2
    assert "both empty: nothing to measure" in capsys.readouterr().err


def test_grad_checkpoint_on_the_llama_baseline():
    """--mlx-grad-checkpoint: the Trainer's checkpoint wrapper also serves blocks that take no
    doc_starts (the MLX Transformer), with the same loss and gradients as without it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from benchmarks import llama_mlx
    from mlx_megalodon.train import loss_fn, set_grad_checkpoint
    args = llama_baseline.LlamaArgs(num_layers=2, model_dim=32, num_heads=2, ffn_hidden_dim=64, vocab_size=50)
    model = llama_mlx.build(args, llama_baseline.random_weights(args))
    x = mx.array(np.random.default_rng(0).integers(0, 50, (2, 17)).astype(np.int32))

    def value_and_grads():
        def f(params):
            model.update(params)
            return loss_fn(model, x[:, :-1], x[:, 1:])[0]
        return mx.value_and_grad(f)(model.trainable_parameters())

    plain, g_plain = value_and_grads()
    set_grad_checkpoint(model, True)
    assert type(model.layers[0]).__name__.startswith("Checkpointed")
    ckpt, g_ckpt = value_and_grads()
    assert ckpt.item() == pytest.approx(plain.item(), rel=1e-6)
    for (k, a), (_, b) in zip(tree_flatten(g_plain), tree_flatten(g_ckpt)):
        assert np.allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6), k


# ============================================================================ worker robustness
# Fake systems for the worker tests. The parent-side tests run them in real worker processes, which
# find them through $PEERS_EXTRA_SYSTEMS=tests.test_peers:FAKE_SYSTEMS.
from benchmarks.peers_workers import EXTRA_SYSTEMS_ENV, FAMILY, MLXSystem  # noqa: E402

BIG_ELEMENTS = 75_000_000               # 0.3 GB of float32


class FakeMLX(MLXSystem):
    """train:1 allocates 0.3 GB and raises (an out-of-memory error, say); train:2 allocates almost
    nothing and reports the peak since the worker's reset, without resetting anything itself.
    ``job["keep"]`` says what of the failure it keeps: "error" (the exception, hence its frames) or
    "array" (the array itself: a leak no cleanup can undo)."""
    family = "megalodon"
    framework = "fake-mlx"

    def setup(self, job):
        super().setup(job)
        self.keep = job.get("keep")

    def versions(self):
        return {"device": "cpu"}

    def gate_logits(self, tokens, precision):
        return np.zeros((*tokens.shape, 8), np.float32)

    def train(self, seq_len, rows, warmup, steps):
        mx = self.mx
        if seq_len == 1:
            big = mx.zeros((BIG_ELEMENTS,))
            mx.eval(big)
            try:
                raise RuntimeError("simulated out of memory")
            except RuntimeError as err:
                if self.keep == "error":
                    self.last_error = err
                elif self.keep == "array":
                    self.kept = big
                raise
        small = mx.ones((1000,))
        mx.eval(small)
        return {"peak_memory_gb": self.peak_gb(), "tokens_per_s": 1.0}


class FakeSlow(FakeMLX):
    """train:1 starts a child process (its pid written to job["child_pid_file"]) and then hangs, as
    torch_ref_compile did in inductor on the H200; train:2 is quick."""
    framework = "fake-slow"

    def train(self, seq_len, rows, warmup, steps):
        if seq_len == 1:
            import subprocess
            child = subprocess.Popen(["sleep", "600"])
            Path(self.job["child_pid_file"]).write_text(str(child.pid))
            time.sleep(600)
        return {"tokens_per_s": 1.0}


FAKE_SYSTEMS = {"fake_mlx": (FakeMLX, {}), "fake_slow": (FakeSlow, {})}


def worker_job(tmp_path, jobs, **extra):
    return {"jobs": jobs, "result_file": str(tmp_path / "records.jsonl"), "deadline": time.time() + 300,
            "tokens_per_step": 2, "warmup": 1, "steps": 1, "leftover_restart_gb": 0.1, **extra}


def run_worker_here(tmp_path, monkeypatch, jobs, **extra):
    """worker_main in this process (so MLX's counters are this process's)."""
    from benchmarks.peers import read_records
    from benchmarks.peers_workers import worker_main
    for name, entry in FAKE_SYSTEMS.items():
        monkeypatch.setitem(SYSTEMS, name, entry)
        monkeypatch.setitem(FAMILY, name, entry[0].family)
    job = worker_job(tmp_path, jobs, **extra)
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert worker_main("fake_mlx", str(tmp_path / "job.json")) == 0
    return {r["job"]: r for r in read_records(Path(job["result_file"]))}


def test_failed_job_does_not_spoil_the_next_ones_peak(tmp_path, monkeypatch):
    """The H200's llama_mlx train:32768 OOM left its arrays alive and the next job reported a
    150 GB peak. Here the failed job's exception (hence its frames and the 0.3 GB array in them)
    stays referenced by the system; the next job's peak must not include it."""
    recs = run_worker_here(tmp_path, monkeypatch, ["train:1", "train:2"], keep="error")
    assert recs["train:1"]["status"] == "error" and "simulated out of memory" in recs["train:1"]["reason"]
    assert recs["train:1"]["leftover_memory_gb"] < 0.05 and "worker_restart" not in recs["train:1"]
    assert recs["train:2"]["status"] == "ok"
    assert recs["train:2"]["peak_memory_gb"] < 0.05, recs["train:2"]      # 0.3 GB if it leaked
    assert recs["train:2"]["start_memory_gb"] < 0.05


def test_worker_stops_when_a_failed_job_leaves_memory_behind(tmp_path, monkeypatch):
    recs = run_worker_here(tmp_path, monkeypatch, ["train:1", "train:2"], keep="array")
    assert recs["train:1"]["leftover_memory_gb"] > 0.25
    assert "fresh worker" in recs["train:1"]["worker_restart"]
    assert "train:2" not in recs                      # left to the next worker


@pytest.fixture
def fake_parent(tmp_path, monkeypatch):
    """run_system on the fake systems, their workers real processes."""
    from benchmarks import peers
    monkeypatch.setenv(EXTRA_SYSTEMS_ENV, "tests.test_peers:FAKE_SYSTEMS")
    for name, entry in FAKE_SYSTEMS.items():
        monkeypatch.setitem(SYSTEMS, name, entry)
        monkeypatch.setitem(FAMILY, name, entry[0].family)
    tokens, reference = tmp_path / "tokens.npy", tmp_path / "reference.npy"
    np.save(tokens, np.zeros((1, 4), np.int32))
    np.save(reference, np.ones((1, 4, 8), np.float32))        # the fakes' logits are zeros: within 1x
    job = {"tokens_per_step": 2, "prefill_step": 4, "decode_tokens": 2, "steps": 1, "warmup": 1,
           "tol_fp32": 1.0, "tol_bf16": 1.0, "device": "cpu", "child_pid_file": str(tmp_path / "child.pid"),
           "leftover_restart_gb": 0.1,
           "gate_tokens": {"megalodon": str(tokens)}, "gate_reference": {"megalodon": str(reference)}}
    settings = {"seq_lens": [1, 2], "contexts": [], "gate_only": False, "model": "fake"}
    (tmp_path / "work").mkdir()

    def run(name, budget_s, job_timeout_s=None, **extra):
        tic = time.time()
        res = peers.run_system(name, {**job, **extra}, settings, tmp_path / "work", tmp_path,
                               tic + budget_s, job_timeout_s)
        return res["records"], time.time() - tic
    return run


def _process_gone(pid: int, wait_s: float = 10.0) -> bool:
    end = time.time() + wait_s
    while time.time() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_parent_restarts_a_worker_that_leaked(fake_parent):
    recs, _ = fake_parent("fake_mlx", budget_s=120, keep="array")
    assert recs["gate"]["status"] == "ok" and recs["gate"]["passed"]
    assert recs["train:1"]["status"] == "error" and "worker_restart" in recs["train:1"]
    assert recs["train:2"]["status"] == "ok"
    assert recs["train:2"]["peak_memory_gb"] < 0.05          # measured in the fresh worker


def test_job_timeout_kills_the_worker_group_and_goes_on(fake_parent, tmp_path):
    recs, elapsed = fake_parent("fake_slow", budget_s=120, job_timeout_s=4)
    assert elapsed < 45, elapsed                              # not the 600 s the job would hang
    assert recs["gate"]["status"] == "ok"                     # kept from the killed worker
    hung = recs["train:1"]
    assert hung["status"] == "skipped" and hung["timed_out"] and "timeout" in hung["reason"]
    assert "--job-timeout-s 4" in hung["reason"]
    assert recs["train:2"]["status"] == "ok"                  # a fresh worker ran the rest
    assert _process_gone(int((tmp_path / "child.pid").read_text()))   # the worker's child died too


def test_budget_deadline_kills_the_worker(fake_parent, tmp_path):
    recs, elapsed = fake_parent("fake_slow", budget_s=8)
    assert elapsed < 8 + 15, elapsed
    assert recs["gate"]["status"] == "ok"
    assert recs["train:1"]["timed_out"] and "--budget-s" in recs["train:1"]["reason"]
    assert recs["train:2"]["status"] == "skipped" and "budget" in recs["train:2"]["reason"]
    assert _process_gone(int((tmp_path / "child.pid").read_text()))


# ============================================================================ torch_ref_compile
def test_torch_ref_compile_keeps_cema_and_timestep_norm_eager(gate_job):
    """torch_ref_compile trains with everything but CEMA and TimestepNorm compiled by inductor
    (CPU: its C++ backend; ~10-30 s). The graphs handed to inductor hold no complex or float64
    tensor (CEMA's FFT convolution, TimestepNorm's float64 cumsum: what inductor failed on on the
    H200), and the losses match eager torch_ref: the first step's to 1e-4 relative, the loss after
    one AdamW update to 2e-3 (bf16 autocast; fusion changes roundings)."""
    _, job, _ = gate_job
    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    results = {}
    for name in ("torch_ref", "torch_ref_compile"):
        cls, extra = SYSTEMS[name]
        system = cls()
        system.setup({**job, **extra, "compile_backend": recording_inductor})
        results[name] = system.train(32, 2, 1, 1)
    eager, compiled = results["torch_ref"], results["torch_ref_compile"]
    assert "CEMA and TimestepNorm eager" in compiled["compile_mode"]
    assert graphs, "nothing was compiled"
    compiled_nodes = 0
    for gm in graphs:
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                compiled_nodes += 1
                assert not value.is_complex() and value.dtype != torch.float64, (node.target, value.dtype)
            assert not any(bad in str(node.target) for bad in ("cumsum", "fft", "polar")), node.target
    assert compiled_nodes > 50                                # projections, attention, FFN: really compiled
    assert compiled["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-4)
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=2e-3)
    assert compiled["loss"] < compiled["first_loss"]          # the update took


def test_timed_steps_pipelined_waits_one_step_late():
    """timed_steps: synchronous waits for each step before queueing the next; pipelined queues step
    i before waiting for step i-1 (and waits for the last one at the end); one time per step."""
    from benchmarks.peers_workers import timed_steps
    for pipelined, want in ((False, ["q0", "w0", "q1", "w1", "q2", "w2"]),
                            (True, ["q0", "q1", "w0", "q2", "w1", "w2"])):
        events, n = [], iter(range(3))

        def queue():
            i = next(n)
            events.append(f"q{i}")
            return i
        times = timed_steps(queue, lambda i: events.append(f"w{i}"), 3, pipelined)
        assert events == want and len(times) == 3 and all(t >= 0 for t in times)
    # handles may be None (a step that is done once queued, as torch's on a CPU)
    assert len(timed_steps(lambda: None, lambda h: None, 3, True)) == 3


@pytest.mark.parametrize("compile_step", [True, False])
def test_mlx_step_handle_keeps_its_own_steps_arrays(compile_step):
    """The pipelined loop waits on step i-1 after queueing step i. Its handle must hold step i-1's
    arrays: trainer.state is updated in place by each step, so a handle holding that container would
    wait on step i (and the loop would run synchronously)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from benchmarks.peers_workers import random_batch, step_handle
    from mlx_megalodon.config import ModelArgs
    from mlx_megalodon.train import TrainConfig, Trainer, build_optimizer, new_model
    args = ModelArgs.from_dict(dict(num_layers=1, model_dim=32, z_dim=16, value_dim=32, num_heads=1,
                                    ffn_hidden_dim=64, cema_ndim=4, chunk_size=16, norm_num_groups=4,
                                    vocab_size=64))
    cfg = TrainConfig(seq_len=16, batch_size=2, compile=compile_step, compute_dtype="float32")
    trainer = Trainer(new_model(args, 0), build_optimizer(cfg), cfg)
    batch = random_batch(64, 2, 16).resident()
    loss, _, _ = trainer.step([batch])
    first = step_handle(loss, trainer.state)
    mx.eval(first)
    after_first = [np.array(v.astype(mx.float32)) for v in first[1:]]
    loss2, _, _ = trainer.step([batch])
    second = step_handle(loss2, trainer.state)
    mx.eval(second)
    assert first[0] is loss and second[0] is loss2
    assert len(first) == len(second) > len(tree_flatten(trainer.state))
    assert all(isinstance(v, mx.array) for v in first + second)
    # the first handle still holds step 1's values; the state (and the second handle) moved on
    assert all(np.array_equal(np.array(v.astype(mx.float32)), w) for v, w in zip(first[1:], after_first))
    assert {id(v) for _, v in tree_flatten(trainer.state[:2])} <= {id(v) for v in second[1:]}
    assert any(not np.array_equal(np.array(v.astype(mx.float32)), w) for v, w in zip(second[1:], after_first))


@pytest.mark.parametrize("name", ["mlx", "torch_ref", "jax"])
def test_pipelined_training_loop_trains_the_same_steps(gate_job, name):
    """--train-loop pipelined changes only when each step is waited for: every system trains the
    same steps (the same first and last loss as synchronous) and says which loop it ran. JAX
    donates the step's parameters, so its pipelined wait holds the loss only."""
    if name == "jax":
        pytest.importorskip("megalodon_jax")
    _, job, _ = gate_job
    results = {}
    for loop in ("synchronous", "pipelined"):
        cls, extra = SYSTEMS[name]
        system = cls()
        system.setup({**job, **extra, "train_loop": loop})
        results[loop] = system.train(32, 2, 1, 2)
    sync, piped = results["synchronous"], results["pipelined"]
    assert sync["train_loop"] == "synchronous" and piped["train_loop"] == "pipelined"
    assert piped["timed_steps"] == sync["timed_steps"] == 2
    assert piped["first_loss"] == pytest.approx(sync["first_loss"], rel=1e-6)
    assert piped["loss"] == pytest.approx(sync["loss"], rel=1e-6)
    assert piped["loss"] != sync["first_loss"]                  # the updates took


# ============================================================================ report: grad ckpt labels
def write_system(folder: Path, name: str, train: dict, ckpt_setting: bool, record_flag=None, rounds=None,
                 run_id=None) -> None:
    """A synthetic systems/NAME.json: ``train`` maps seq len -> tokens/s (None: an OOM error);
    ``record_flag`` is the training records' grad_checkpoint (None: an older run that lacks it);
    ``rounds`` maps seq len -> tokens/s per --train-rounds round (their median replaces ``train``'s)."""
    settings = {"model": "tiny", "mega_args": {"num_layers": 2}, "llama_args": {"num_layers": 2, "model_dim": 64,
                "num_heads": 1, "ffn_hidden_dim": 128}, "mega_parameters": 1e6, "llama_parameters": 1e6,
                "seq_lens": [4096, 32768], "tokens_per_step": 32768, "contexts": [4096], "prefill_step": 4096,
                "decode_tokens": 8, "steps": 3, "warmup": 1, "tol_fp32": 5e-4, "tol_bf16": 2e-2,
                "mlx_grad_checkpoint": ckpt_setting}
    gate = {"passed": True, "relative": 0.0}
    records = {"gate": {"job": "gate", "status": "ok", "passed": True, "float32": gate, "bfloat16": gate}}
    for L, v in train.items():
        rec = ({"job": f"train:{L}", "status": "ok", "tokens_per_s": v, "peak_memory_gb": 1.0, "compile_s": 1.0}
               if v is not None else {"job": f"train:{L}", "status": "error", "reason": "RuntimeError: out of memory"})
        if record_flag is not None and v is not None:
            rec["grad_checkpoint"] = record_flag
        if rounds and L in rounds:
            rec.update(tokens_per_s=float(np.median(rounds[L])), tokens_per_s_rounds=rounds[L],
                       round_numbers=list(range(1, len(rounds[L]) + 1)), rounds_requested=len(rounds[L]),
                       tokens_per_s_round1=rounds[L][0], round_failures=[])
        records[f"train:{L}"] = rec
    (folder / "systems").mkdir(parents=True, exist_ok=True)
    (folder / "systems" / f"{name}.json").write_text(json.dumps(
        {"system": name, "family": FAMILY[name], "settings": settings, "settings_key": "stale", "records": records,
         **({"run_id": run_id} if run_id else {})}))


def report_lines(dirs):
    from benchmarks.peers import build_report
    md = build_report(dirs, dirs[0])
    targets = {t["what"]: t for t in json.loads((dirs[0] / "peers.json").read_text())["targets"]}
    return md, targets


def test_report_labels_checkpointed_training_and_pairs_like_with_like(tmp_path):
    ckpt, plain = tmp_path / "ckpt", tmp_path / "plain"
    # an --mlx-grad-checkpoint run (mlx's records from before they said so: its settings decide) ...
    write_system(ckpt, "mlx", {4096: 100.0, 32768: 90.0}, ckpt_setting=True)
    write_system(ckpt, "llama_mlx", {4096: 200.0, 32768: 60.0}, ckpt_setting=True, record_flag=True)
    write_system(ckpt, "torch_ref", {4096: 50.0, 32768: 40.0}, ckpt_setting=True, record_flag=False)
    # ... merged with a plain one, in which mlx and llama_mlx ran out of memory at 32K
    write_system(plain, "mlx", {4096: 130.0, 32768: None}, ckpt_setting=False)
    write_system(plain, "llama_mlx", {4096: 150.0, 32768: None}, ckpt_setting=False, record_flag=False)
    write_system(plain, "jax", {4096: 65.0, 32768: 50.0}, ckpt_setting=False, record_flag=False)
    md, targets = report_lines([ckpt, plain])

    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines() if line.startswith("| ")]
    for label in ("mlx", "mlx (grad ckpt)", "llama_mlx", "llama_mlx (grad ckpt)", "torch_ref", "jax"):
        assert label in rows, label
    assert "torch_ref (grad ckpt)" not in rows          # the flag is the MLX systems' only
    assert "(measured with other settings)" not in md   # the two runs share one report

    # Megalodon / Transformer: like with like only, as both pairs exist
    assert "| mlx | llama_mlx | neither | 0.87x | – |" in md
    assert "| mlx (grad ckpt) | llama_mlx (grad ckpt) | both | 0.50x | 1.50x |" in md
    assert "unlike" not in md.split("Issue targets")[0].split("Megalodon / Transformer")[1]

    # targets: the plain mlx where it was measured, the checkpointed one labelled where not
    assert targets["mlx / jax training at 4K"]["value"] == pytest.approx(2.0)
    unlike = targets["mlx (grad ckpt) / jax training at 32K (**unlike: grad ckpt on mlx only**)"]
    assert unlike["value"] == pytest.approx(1.8) and not unlike["like_settings"]
    assert targets["mlx / llama_mlx training at 4K"]["value"] == pytest.approx(130 / 150)
    assert targets["mlx (grad ckpt) / llama_mlx (grad ckpt) training at 32K"]["value"] == pytest.approx(1.5)
    assert targets["mlx (grad ckpt) 32K / 4K training"]["value"] == pytest.approx(0.9)


def test_report_marks_an_unlike_megalodon_transformer_pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_system(a, "mlx", {4096: 100.0, 32768: 90.0}, ckpt_setting=True, record_flag=True)
    write_system(b, "llama_mlx", {4096: 200.0, 32768: 60.0}, ckpt_setting=False, record_flag=False)
    md, targets = report_lines([a, b])
    assert "| mlx (grad ckpt) | llama_mlx | **unlike**: Megalodon only | 0.50x | 1.50x |" in md
    t = targets["mlx (grad ckpt) / llama_mlx training at 4K (**unlike: grad ckpt on mlx only**)"]
    assert t["value"] == pytest.approx(0.5) and not t["like_settings"]


# ============================================================================ --train-rounds
class StubWorkers:
    """Stands in for peers.run_worker (no processes): records each call's (system, jobs) and answers
    with a passing gate (failing for ``gate_fails``) and, per training job, the next of
    ``rates[system][seq len]``: tokens/s, None (an out-of-memory error) or "hang" (the worker runs
    into the --budget-s deadline and is killed, as run_worker reports it)."""

    def __init__(self, out: Path, rates: dict, gate_fails=()):
        self.out, self.gate_fails = out, gate_fails
        self.rates = {n: {L: list(v) for L, v in r.items()} for n, r in rates.items()}
        self.calls, self.on_disk_when_hung = [], None

    def __call__(self, name, job, jobs, work, log_dir, deadline, extra_env=None, job_timeout_s=None):
        self.calls.append((name, list(jobs)))
        records = [{"job": "setup", "status": "ok", "versions": {"device": "stub"}}]
        for j in jobs:
            if j == "gate":
                passed = name not in self.gate_fails
                e = {"passed": passed, "relative": 0.0 if passed else 1.0}
                records.append({"job": j, "status": "ok", "passed": passed, "float32": e, "bfloat16": e})
                continue
            L = int(j.split(":")[1])
            rate = self.rates[name][L].pop(0)
            if rate == "hang":
                self.on_disk_when_hung = json.loads((self.out / "systems" / f"{name}.json").read_text())
                time.sleep(max(0.0, deadline - time.time()))
                records.append({"job": j, "status": "skipped", "timed_out": True,
                                "reason": "timeout: worker killed after 1 s in this job (the --budget-s deadline)"})
                return records
            records.append({"job": j, "status": "ok", "tokens_per_s": rate, "peak_memory_gb": rate / 1000,
                            "compile_s": 1.0, "grad_checkpoint": False} if rate is not None else
                           {"job": j, "status": "error", "reason": "RuntimeError: out of memory"})
        return records


def run_with_stub(tmp_path, monkeypatch, rates, extra_args, gate_fails=()):
    from benchmarks import peers
    out, weights = tmp_path / "out", tmp_path / "weights"
    (weights / "megalodon_upstream").mkdir(parents=True)
    (weights / "megalodon_upstream" / "consolidated.pth").touch()     # the stub loads no weights
    stub = StubWorkers(out, rates, gate_fails)
    monkeypatch.setattr(peers, "run_worker", stub)
    rc = peers.main(["--tiny", "--contexts", "", "--out", str(out), "--keep-weights", str(weights)] + extra_args)
    assert rc == 0
    systems = {n: json.loads((out / "systems" / f"{n}.json").read_text()) for n in rates}
    return stub, systems, out


def test_train_rounds_alternate_and_repeat_training_only(tmp_path, monkeypatch):
    rates = {"mlx": {4096: [100, 300, 200], 32768: [80, 60, 70]},
             "jax": {4096: [50, 200, 400], 32768: [None]},          # 32K fails in round 1: not repeated
             "torch_ref": {4096: [10], 32768: [10]}}   # its gate fails (its worker trains on: no rounds though)
    stub, systems, out = run_with_stub(tmp_path, monkeypatch, rates, ["--systems", "mlx,jax,torch_ref", "--seq-lens",
                                       "4K,32K", "--train-rounds", "3"], gate_fails=("torch_ref",))
    both = ["train:4096", "train:32768"]
    # the normal pass (mlx's gate alone: MLX's gate env; jax one job per worker), then rounds 2 (reversed) and 3
    assert stub.calls == [("mlx", ["gate"]), ("mlx", both), ("jax", ["gate"]), ("jax", ["train:4096"]),
                          ("jax", ["train:32768"]), ("torch_ref", ["gate"] + both),
                          ("jax", ["train:4096"]), ("mlx", both), ("mlx", both), ("jax", ["train:4096"])]
    mlx4 = systems["mlx"]["records"]["train:4096"]
    assert mlx4["tokens_per_s_rounds"] == [100, 300, 200] and mlx4["round_numbers"] == [1, 2, 3]
    assert mlx4["tokens_per_s"] == 200 and mlx4["tokens_per_s_round1"] == 100
    assert mlx4["peak_memory_gb_rounds"] == [0.1, 0.3, 0.2] and mlx4["round_failures"] == []
    assert systems["mlx"]["records"]["train:32768"]["tokens_per_s"] == 70
    assert systems["jax"]["records"]["train:4096"]["tokens_per_s"] == 200
    assert systems["jax"]["records"]["train:32768"]["status"] == "error"
    assert "tokens_per_s_rounds" not in systems["jax"]["records"]["train:32768"]
    assert "tokens_per_s_rounds" not in systems["torch_ref"]["records"]["train:4096"]
    assert systems["mlx"]["run_id"] == systems["jax"]["run_id"]
    meta = json.loads((out / "run_meta.json").read_text())
    assert [r["order"] for r in meta["rounds"]] == [["jax", "mlx"], ["mlx", "jax"]]
    assert all(r["complete"] for r in meta["rounds"]) and meta["train_rounds"] == 3

    # the report: medians with each round; per-round ratios mlx round i / jax round i
    md = (out / "peers.md").read_text()
    targets = {t["what"]: t for t in json.loads((out / "peers.json").read_text())["targets"]}
    assert "| 200 (r1 100, r2 300, r3 200) |" in md
    t = targets["mlx / jax training at 4K"]
    assert t["value"] == pytest.approx(1.0)                          # ratio of the medians, 200 / 200
    paired = t["paired_rounds"]
    assert paired["rounds"] == [1, 2, 3] and paired["ratios"] == pytest.approx([2.0, 1.5, 0.5])
    assert (paired["min"], paired["median"], paired["max"]) == pytest.approx((0.5, 1.5, 2.0))
    assert "| mlx / jax training at 4K | 3 | r1 2.00x, r2 1.50x, r3 0.50x | 0.50x | 1.50x | 2.00x | 2 of 3 |" in md
    assert targets["mlx / jax training at 32K"]["paired_rounds"] is None        # jax did not train at 32K
    assert targets["mlx / torch_ref training at 4K"]["paired_rounds"] is None
    assert targets["mlx 32K / 4K training"]["value"] == pytest.approx(70 / 200)


def test_train_rounds_budget_keeps_the_rounds_done(tmp_path, monkeypatch):
    """The budget runs out in round 3 (mlx's worker hangs into the deadline): rounds 1 and 2 stay,
    round 3 is recorded as a timeout (mlx) and as skipped (jax, not started), round 4 never runs."""
    rates = {"mlx": {4096: [100, 300, "hang"]}, "jax": {4096: [50, 200]}}
    tic = time.time()
    stub, systems, out = run_with_stub(tmp_path, monkeypatch, rates, ["--systems", "mlx,jax", "--seq-lens", "4K",
                                       "--train-rounds", "4", "--budget-s", "3"])
    assert time.time() - tic < 20
    assert stub.calls[-1] == ("mlx", ["train:4096"])                  # jax's round 3 never started
    assert stub.on_disk_when_hung["records"]["train:4096"]["tokens_per_s_rounds"] == [100, 300]   # saved per round
    mlx, jax = (systems[n]["records"]["train:4096"] for n in ("mlx", "jax"))
    assert mlx["tokens_per_s_rounds"] == [100, 300] and mlx["tokens_per_s"] == 200
    assert jax["tokens_per_s_rounds"] == [50, 200] and jax["tokens_per_s"] == 125
    assert mlx["round_failures"][0]["round"] == 3 and mlx["round_failures"][0]["timed_out"]
    assert jax["round_failures"] == [{"round": 3, "status": "skipped", "reason": "time budget exhausted",
                                      "timed_out": False}]
    meta = json.loads((out / "run_meta.json").read_text())
    assert [r["round"] for r in meta["rounds"]] == [2, 3] and not meta["rounds"][-1]["complete"]
    md = (out / "peers.md").read_text()
    assert "| mlx / jax training at 4K | 2 | r1 2.00x, r2 1.50x | 1.50x | 1.75x | 2.00x | 2 of 2 |" in md
    assert "- jax train:4096 round 3: skipped: time budget exhausted" in md
    assert "- mlx train:4096: round 4 not run (time budget exhausted or run stopped)" in md
    assert "(r1 100, r2 300; 2 missing)" in md


def test_train_rounds_must_be_positive(tmp_path, capsys):
    from benchmarks.peers import main
    assert main(["--tiny", "--train-rounds", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--train-rounds must be at least 1" in err and len(err.splitlines()) == 1


def test_report_pairs_rounds_of_one_run_only(tmp_path):
    """Rounds pair within one run; results without rounds (older folders) and rounds of another run
    merge as before, unpaired."""
    run, old, other = tmp_path / "run", tmp_path / "old", tmp_path / "other"
    write_system(run, "mlx", {4096: 0, 32768: 90.0}, ckpt_setting=False, rounds={4096: [100, 300, 200]}, run_id="a")
    write_system(run, "jax", {4096: 0, 32768: 50.0}, ckpt_setting=False, rounds={4096: [50, 200, 400]}, run_id="a")
    write_system(old, "torch_ref", {4096: 40.0, 32768: 30.0}, ckpt_setting=False)
    md, targets = report_lines([run, old])
    assert targets["mlx / jax training at 4K"]["paired_rounds"]["ratios"] == pytest.approx([2.0, 1.5, 0.5])
    assert targets["mlx / jax training at 32K"]["paired_rounds"] is None      # no rounds at 32K
    assert targets["mlx / jax training at 32K"]["value"] == pytest.approx(1.8)
    assert targets["mlx / torch_ref training at 4K"]["value"] == pytest.approx(5.0)
    assert targets["mlx / torch_ref training at 4K"]["paired_rounds"] is None
    assert "| torch_ref | ? | pass 0.0e+00 | pass 0.0e+00 | 40 | 1 | 1.0 | 30 |" in md      # as without rounds

    write_system(other, "mlx", {4096: 0, 32768: 90.0}, ckpt_setting=False, rounds={4096: [100, 100]}, run_id="b")
    md, targets = report_lines([other, run])
    assert targets["mlx / jax training at 4K"]["paired_rounds"] is None
    assert targets["mlx / jax training at 4K"]["value"] == pytest.approx(0.5)
    assert "- mlx / jax training at 4K: both ran in rounds, but in different runs" in md
    assert "Paired training rounds" not in md


def test_machine_info_records_the_gpu_identity(tmp_path, monkeypatch):
    from benchmarks.peers import machine_info
    monkeypatch.setenv("PATH", str(tmp_path))
    assert machine_info()["gpus"] is None and machine_info()["gpu"] is None          # no nvidia-smi
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB, GPU-1234abcd, 00000000:19:00.0'\n")
    smi.chmod(0o755)
    info = machine_info()
    assert info["gpus"] == [{"name": "NVIDIA H200", "memory": "143771 MiB", "uuid": "GPU-1234abcd",
                             "pci_bus_id": "00000000:19:00.0"}]
    assert info["gpu"] == "NVIDIA H200, 143771 MiB"


# Fakes for one end-to-end run in real worker processes: they stand in for mlx and jax (through
# $PEERS_EXTRA_SYSTEMS=tests.test_peers:ROUND_SYSTEMS) and return the next of their ``rates`` at each
# training call, counted in $PEERS_TEST_ROUNDS_DIR across the worker processes.
class FakeRounds(FakeMLX):
    framework = "fake-rounds"

    def train(self, seq_len, rows, warmup, steps):
        import os
        counter = Path(os.environ["PEERS_TEST_ROUNDS_DIR"]) / f"{self.job['fake_name']}-{seq_len}"
        calls = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(calls + 1))
        return {"tokens_per_s": float(self.job["rates"][calls]), "peak_memory_gb": 0.01}


ROUND_SYSTEMS = {"mlx": (FakeRounds, {"fake_name": "mlx", "rates": [100, 300]}),
                 "jax": (FakeRounds, {"fake_name": "jax", "rates": [50, 200]})}


def test_train_rounds_in_real_workers(tmp_path, monkeypatch):
    from benchmarks import peers
    monkeypatch.setenv(EXTRA_SYSTEMS_ENV, "tests.test_peers:ROUND_SYSTEMS")
    monkeypatch.setenv("PEERS_TEST_ROUNDS_DIR", str(tmp_path))
    for name, entry in ROUND_SYSTEMS.items():
        monkeypatch.setitem(SYSTEMS, name, entry)
    out, weights = tmp_path / "out", tmp_path / "weights"
    (weights / "megalodon_upstream").mkdir(parents=True)
    (weights / "megalodon_upstream" / "consolidated.pth").touch()
    assert peers.main(["--tiny", "--systems", "mlx,jax", "--seq-lens", "4K", "--contexts", "", "--train-rounds", "2",
                       "--out", str(out), "--keep-weights", str(weights), "--budget-s", "120"]) == 0
    # one worker per line: the gate only in the normal pass; round 2 in fresh workers, training only
    worker_jobs = {n: [line[4:] for line in (out / "logs" / f"{n}.log").read_text().splitlines()
                       if line.startswith("=== ")] for n in ("mlx", "jax")}
    assert worker_jobs == {"mlx": ["gate train:4096", "train:4096"], "jax": ["gate", "train:4096", "train:4096"]}
    recs = {n: json.loads((out / "systems" / f"{n}.json").read_text())["records"]["train:4096"] for n in ROUND_SYSTEMS}
    assert recs["mlx"]["tokens_per_s_rounds"] == [100, 300] and recs["mlx"]["tokens_per_s"] == 200
    assert recs["jax"]["tokens_per_s_rounds"] == [50, 200] and recs["jax"]["tokens_per_s"] == 125
    target = next(t for t in json.loads((out / "peers.json").read_text())["targets"]
                  if t["what"] == "mlx / jax training at 4K")
    assert target["paired_rounds"]["ratios"] == pytest.approx([2.0, 1.5])
