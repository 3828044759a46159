"""The kernel benchmark scripts still run against the current kernels API: their CPU-emulation
smoke modes (the GPU measurements themselves run on the H200; see BENCHMARKS.md)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU emulation needs g++")


def run(*args, timeout=600):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@needs_gxx
def test_cema_train_shapes_smoke(tmp_path):
    r = run("benchmarks/cema_train_shapes.py", "--cpu-emulation", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "cema_train_shapes.json").read_text())
    assert {row["pass"] for row in result["rows"]} == {"fwd", "fwd+bwd"}
    assert all(row["ms"] > 0 and row["chunk"] >= 1 for row in result["rows"])
    assert result["defaults"]["BWD_MAX_NPT"] >= 1


@pytest.mark.parametrize("script", ["benchmarks/cema_backward_ab.py", "benchmarks/cross_entropy_kernel.py",
                                    "benchmarks/timestep_norm_kernel.py"])
def test_gpu_only_benchmarks_say_so_without_a_gpu(script):
    import mlx.core as mx
    if mx.default_device() == mx.gpu:
        pytest.skip("a GPU is present: the script would run its measurements")
    r = run(script, timeout=120)
    assert r.returncode != 0 and "needs a GPU backend" in (r.stdout + r.stderr)


def test_step_kernels_summarizes_an_ncu_table(tmp_path):
    """benchmarks/step_kernels.py --summarize groups Nsight Compute's per-kernel times (the units row
    and thousands separators as ncu writes them) and refuses a file without the table."""
    csv_path = tmp_path / "step.csv"
    csv_path.write_text('==PROF== Connected to process 1\n'
                        '"ID","Kernel Name","gpu__time_duration.sum"\n"","","nsecond"\n'
                        '"0","custom_kernel_mgk_cema_fwd_local_ab_float_16_1_0(const float *)","1,500,000"\n'
                        '"1","custom_kernel_mgk_cema_bwd_final_ab(const float *)","500,000"\n'
                        '"2","sm90_xmma_gemm_bf16bf16_bf16f32","3,000,000"\n'
                        '"3","binary_add_float","250,000"\n')
    out = tmp_path / "step.json"
    r = run("benchmarks/step_kernels.py", "--summarize", str(csv_path), "--json", str(out), timeout=60)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    groups = {g["group"]: g for g in result["groups"]}
    assert result["launches"] == 4 and abs(result["total_ms"] - 5.25) < 1e-9
    assert abs(groups["CEMA scan"]["ms"] - 2.0) < 1e-9 and groups["CEMA scan"]["launches"] == 2
    assert abs(groups["GEMM"]["ms"] - 3.0) < 1e-9 and [g["group"] for g in result["groups"]][0] == "GEMM"
    assert "| GEMM | 3.0 | 57% | 1 |" in r.stdout

    bad = tmp_path / "bad.csv"
    bad.write_text("==ERROR== An error occurred while trying to profile.\n")
    r = run("benchmarks/step_kernels.py", "--summarize", str(bad), timeout=60)
    assert r.returncode != 0 and "no Nsight Compute CSV table" in r.stderr
    r = run("benchmarks/step_kernels.py", "--seq-len", "0", timeout=60)
    assert r.returncode != 0 and "--seq-len" in r.stderr


def test_step_kernels_writes_and_summarizes_a_torch_profiler_trace(tmp_path):
    """--torch-profiler's CSV (kernels of a Chrome trace, with start times) reads back in --summarize,
    which then also reports the timeline: span, time with a kernel running, and the idle gaps."""
    import importlib
    step_kernels = importlib.import_module("benchmarks.step_kernels")
    events = [  # ts / dur in microseconds, as torch's Chrome trace writes them; unordered on purpose
        {"cat": "kernel", "name": "nvjet_sm90_tst_256x128_NNT", "ts": 1010.0, "dur": 5.0, "args": {"stream": 7}},
        {"cat": "kernel", "name": "custom_kernel_mgk_cema_fwd_local_ab", "ts": 1000.0, "dur": 4.0},
        {"cat": "kernel", "name": "col_reduce_looped<bf16>", "ts": 1012.0, "dur": 1.0, "args": {"stream": 9}},
        {"cat": "cpu_op", "name": "aten::zeros", "ts": 990.0, "dur": 50.0},
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 1020.0, "dur": 2.0},
    ]
    csv_path = tmp_path / "k.csv"
    step_kernels.write_kernel_csv(events, str(csv_path))
    launches = step_kernels.read_ncu_csv(str(csv_path))
    assert [(n[:6], ns, start) for n, ns, start in launches] == [
        ("custom", 4000.0, 0.0), ("nvjet_", 5000.0, 10000.0), ("col_re", 1000.0, 12000.0), ("Memcpy", 2000.0, 20000.0)]
    timeline = step_kernels.busy_summary(launches)
    assert abs(timeline["span_ms"] - 0.022) < 1e-12 and abs(timeline["busy_ms"] - 0.011) < 1e-12
    assert [round(g["ms"], 6) for g in timeline["largest_gaps"]] == [0.006, 0.005]
    assert round(timeline["largest_gaps"][0]["at_ms"], 6) == 0.004
    out = tmp_path / "k.json"
    r = run("benchmarks/step_kernels.py", "--summarize", str(csv_path), "--json", str(out), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "a kernel running in 0.0 of them" in r.stdout
    assert json.loads(out.read_text())["timeline"]["idle_ms"] > 0
    with pytest.raises(SystemExit, match="no GPU kernel"):
        step_kernels.write_kernel_csv(events[3:4], str(tmp_path / "none.csv"))


def test_step_kernels_reports_the_host_during_idle_gaps(tmp_path):
    """With --host, the marked ranges and slow CUDA API calls go into the CSV as stream "host" rows on
    the kernels' clock: they stay out of the kernel statistics, and --summarize names what the host
    was doing in each idle gap (short API calls are left out)."""
    import importlib
    step_kernels = importlib.import_module("benchmarks.step_kernels")
    events = [
        {"cat": "kernel", "name": "copy_v<float, bf16>", "ts": 1000.0, "dur": 10.0},
        {"cat": "kernel", "name": "binary_ss<Divide>", "ts": 1100.0, "dur": 10.0},
        {"cat": "user_annotation", "name": "mlx step: graph build", "ts": 980.0, "dur": 60.0},
        {"cat": "cuda_runtime", "name": "cudaMemcpy", "ts": 1040.0, "dur": 55.0},
        {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 1096.0, "dur": 3.0},
    ]
    csv_path = tmp_path / "k.csv"
    step_kernels.write_kernel_csv(events, str(csv_path))
    assert [n for n, _, _ in step_kernels.read_ncu_csv(str(csv_path))] == ["copy_v<float, bf16>", "binary_ss<Divide>"]
    host = step_kernels.read_ncu_csv(str(csv_path), host=True)
    assert [(n, ns, start) for n, ns, start in host] == [("mlx step: graph build", 60000.0, -20000.0),
                                                         ("cudaMemcpy", 55000.0, 40000.0)]
    # the one gap runs from 10 us to 100 us: the build overlaps 30 us of it, the copy 55 us
    during = step_kernels.host_during(host, 10000.0, 100000.0)
    assert [(n, round(ms * 1e3, 3)) for n, ms, _ in during] == [("mlx step: graph build", 30.0), ("cudaMemcpy", 55.0)]
    out = tmp_path / "k.json"
    r = run("benchmarks/step_kernels.py", "--summarize", str(csv_path), "--json", str(out), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "2 kernel launches" in r.stdout and "host in mlx step: graph build 0.0 ms; cudaMemcpy 0.1 ms" in r.stdout
    gap = json.loads(out.read_text())["timeline"]["largest_gaps"][0]
    assert [h["name"] for h in gap["host"]] == ["mlx step: graph build", "cudaMemcpy"]
    r = run("benchmarks/step_kernels.py", "--host", timeout=60)
    assert r.returncode != 0 and "--host needs --torch-profiler" in r.stderr


def test_step_graph_counts_fewer_operations_with_the_flat_optimizer(tmp_path):
    """benchmarks/step_graph.py counts one step's graph nodes for both optimizers; FlatAdamW's per-group
    update leaves fewer, and the same model trains in both."""
    out = tmp_path / "graph.json"
    r = run("benchmarks/step_graph.py", "--layers", "2", "--model-dim", "32", "--json", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    per_tensor, flat = result["results"]["per-tensor AdamW"], result["results"]["FlatAdamW"]
    assert result["layers"] == 2 and result["parameter_tensors"] > 20
    assert 0 < flat["non_view_nodes"] < per_tensor["non_view_nodes"] <= per_tensor["nodes"]
    assert per_tensor["by_type"]["Square"] > flat["by_type"].get("Square", 0)
    assert "| FlatAdamW |" in r.stdout
    r = run("benchmarks/step_graph.py", "--layers", "0", timeout=60)
    assert r.returncode != 0 and "--layers must be at least 1" in r.stderr


def test_train_profile_compares_lengths(tmp_path):
    """benchmarks/train_profile.py times every piece at each length and prints the differences."""
    out = tmp_path / "profile.json"
    r = run("benchmarks/train_profile.py", "--tiny", "--layers", "1", "--seq-lens", "64,128",
            "--tokens-per-step", "256", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(out.read_text())["results"]
    assert [(x["rows"], x["seq_len"]) for x in results] == [(4, 64), (2, 128)]
    assert all(x["cema"] > 0 and x["embed+head+loss"] > 0 and x["loss_path"] == "ops" for x in results)
    assert "| piece (fwd+bwd ms) | 4 x 64 | 2 x 128 | 2 x 128 - 4 x 64 |" in r.stdout


def test_train_throughput_rounds_alternate_the_order(tmp_path):
    """--rounds 2 measures A B then B A and summarizes each case over both rounds."""
    out = tmp_path / "tt.json"
    r = run("benchmarks/train_throughput.py", "--tiny", "--layers", "1", "--seq-lens", "64,128",
            "--tokens-per-step", "256", "--steps", "2", "--warmup", "1", "--rounds", "2", "--no-compile",
            "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert [(x["round"], x["seq_len"]) for x in result["results"]] == [(0, 64), (0, 128), (1, 128), (1, 64)]
    summary = {x["seq_len"]: x for x in result["summary"]}
    assert set(summary) == {64, 128} and all(len(x["tokens_per_s_by_round"]) == 2 for x in summary.values())
    steps_64 = [t for x in result["results"] if x["seq_len"] == 64 for t in x["step_s_all"]]
    assert abs(summary[64]["step_s"] - sorted(steps_64)[1:3][0] / 2 - sorted(steps_64)[1:3][1] / 2) < 1e-12
    r = run("benchmarks/train_throughput.py", "--tiny", "--rounds", "0", timeout=60)
    assert r.returncode != 0 and "--rounds" in r.stderr


def test_train_throughput_fresh_process_runs_each_case_alone(tmp_path):
    """--fresh-process: every measurement in a process of its own, with this run's options, in the
    same A B B A order; a failing case is one clear error."""
    out = tmp_path / "tt.json"
    r = run("benchmarks/train_throughput.py", "--tiny", "--layers", "1", "--seq-lens", "64,128",
            "--tokens-per-step", "256", "--steps", "1", "--warmup", "0", "--rounds", "2", "--no-compile",
            "--fresh-process", "--out", str(out), timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    rows = result["results"]
    assert [(x["round"], x["seq_len"]) for x in rows] == [(0, 64), (0, 128), (1, 128), (1, 64)]
    pids = {x["pid"] for x in rows}
    assert len(pids) == 4 and result["meta"]["pid"] not in pids
    assert all(x["rows"] * x["seq_len"] == 256 and len(x["step_s_all"]) == 1 for x in rows)  # options passed on
    # A case whose process fails: one line naming the case and the child's own error. (The parent
    # would refuse this option itself; handing it over unchecked makes the child fail.)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput as tt
    parser = tt.build_parser()
    bad = parser.parse_args(["--tiny", "--steps", "1", "--warmup", "0", "--causal-split-parts", "0"])
    with pytest.raises(SystemExit, match=r"seq 64 / kernels failed: .*--causal-split-parts must be >= 1"):
        tt.measure_in_child(parser, bad, 64, "kernels")
    r = run("benchmarks/train_throughput.py", "--tiny", "--packed-doc-len", "-5", timeout=60)
    assert r.returncode != 0 and "--packed-doc-len" in r.stderr


def test_train_throughput_names_the_gpu_it_ran_on(tmp_path, monkeypatch):
    """gpu_identity() is nvidia-smi's first line for GPU 0 (name, UUID, bus id), and '' where there
    is no nvidia-smi, as on this CPU machine and on a Mac."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import train_throughput as tt
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\necho "$1" > "{tmp_path}/asked"\n'
                    'printf "NVIDIA H200, GPU-1234, 00000000:19:00.0\\nNVIDIA H200, GPU-5678, 00000000:3B:00.0\\n"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert tt.gpu_identity() == "NVIDIA H200, GPU-1234, 00000000:19:00.0"
    assert (tmp_path / "asked").read_text().strip() == "--query-gpu=name,uuid,pci.bus_id"
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert tt.gpu_identity() == "" and tt.gpu_state() == ""


def test_train_throughput_pipelined_loop_trains_the_same_steps(tmp_path):
    """--pipelined queues each step before reading the previous loss (the training loop's way):
    one time per step, and the same losses as evaluating every step before the next."""
    outs = {}
    for mode in ("synchronous", "pipelined"):
        out = tmp_path / f"{mode}.json"
        r = run("benchmarks/train_throughput.py", "--tiny", "--layers", "1", "--seq-lens", "64",
                "--tokens-per-step", "128", "--steps", "3", "--warmup", "1", "--out", str(out),
                *(["--pipelined"] if mode == "pipelined" else []), timeout=300)
        assert r.returncode == 0, r.stderr
        outs[mode] = json.loads(out.read_text())["results"][0]
    for mode, row in outs.items():
        assert row["loop"] == mode and len(row["step_s_all"]) == 3 and all(t > 0 for t in row["step_s_all"])
        assert len(row["host_call_s_all"]) == 3 and 0 < row["host_call_s"] < row["step_s"] * 3
        assert len(row["host_eval_call_s_all"]) == 3 and 0 < row["host_eval_call_s"] < row["step_s"] * 3
    assert outs["pipelined"]["loss"] == outs["synchronous"]["loss"]


TINY_OVERRIDES = json.dumps({"num_layers": 2, "model_dim": 64, "z_dim": 32, "value_dim": 64, "num_heads": 1,
                             "ffn_hidden_dim": 128, "cema_ndim": 4, "chunk_size": 32, "norm_num_groups": 4,
                             "vocab_size": 128})


def test_train_loop_throughput_runs_the_library_training_loop(tmp_path):
    """benchmarks/train_loop_throughput.py times mlx_megalodon.train.train itself: every length gets
    its rows of the same tokens per step, all the iterations run and the loss falls below uniform."""
    import math
    out = tmp_path / "loop.json"
    r = run("benchmarks/train_loop_throughput.py", "--seq-lens", "64,128", "--tokens-per-step", "256",
            "--iters", "6", "--overrides", TINY_OVERRIDES, "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(x["seq_len"], x["rows"], x["iters"]) for x in rows] == [(64, 4, 6), (128, 2, 6)]
    assert all(x["tokens_per_s"] > 0 and x["peak_memory_gb"] > 0 for x in rows)
    assert all(x["last_loss"] < math.log(128) + 0.5 for x in rows)
    # --batches resident converts the same batches up front, staged writes them into MLX arrays made
    # once: the same training, the same losses
    for mode in ("resident", "staged"):
        r = run("benchmarks/train_loop_throughput.py", "--seq-lens", "64", "--tokens-per-step", "256", "--iters", "6",
                "--overrides", TINY_OVERRIDES, "--batches", mode, "--out", str(out), timeout=300)
        assert r.returncode == 0, r.stderr
        other = json.loads(out.read_text())["results"][0]
        assert other["batches"] == mode and rows[0]["batches"] == "numpy"
        assert other["last_loss"] == rows[0]["last_loss"], mode
    for bad in (["--seq-lens", "4096"], ["--iters", "2"], ["--overrides", "[1]"], ["--seq-lens", "a"],
                ["--batches", "gpu"]):
        r = run("benchmarks/train_loop_throughput.py", "--tokens-per-step", "256", *bad, timeout=120)
        assert r.returncode == 2 and "error:" in r.stderr, bad


def test_step_kernels_library_loop_marks_the_training_loop(tmp_path):
    """step_kernels.py --library-loop records train.train itself: recording starts once, when the
    warm-up steps' losses have been read, and with --host every step's batch draw, graph build and
    async_eval are marked, in that order (here with a recording mark and no GPU profiler)."""
    import argparse
    import contextlib
    import importlib
    import mlx_megalodon.train as T
    step_kernels = importlib.import_module("benchmarks.step_kernels")
    events, calls = [], []

    @contextlib.contextmanager
    def mark(name):
        events.append(name)
        yield
    a = argparse.Namespace(preset="mega200M", seq_len=32, rows=2, warmup=2, steps=3, dtype="float32", batches="numpy",
                           overrides=json.loads(TINY_OVERRIDES))
    plain = (T.Trainer, T.BatchIterator, T.mx)
    r = step_kernels.profile_library_loop(a, lambda: calls.append(("start", len(events))),
                                          lambda: calls.append(("stop", len(events))), mark)
    assert (T.Trainer, T.BatchIterator, T.mx) == plain               # the loop's names are put back
    assert r["iters"] == 5 and r["batches"] == "numpy"
    phases = ["mlx step: data", "mlx step: graph build", "mlx step: async_eval"]
    assert events == phases * 5
    # step 2's loss is read after step 3 is queued: recording starts there and stops at the end
    assert calls == [("start", 9), ("stop", 15)]
    r = run("benchmarks/step_kernels.py", "--library-loop", "--overrides", "[1]", timeout=60)
    assert r.returncode == 2 and "--overrides: not a JSON object" in r.stderr


def test_staged_batches_write_each_draw_into_reused_arrays():
    """--batches staged: the arrays a batch arrives in are made once per set and reused every
    STAGING_SETS draws, and each draw holds that draw's tokens."""
    import mlx.core as mx
    import numpy as np
    from benchmarks.train_loop_throughput import STAGING_SETS, staged_iterator_class
    from mlx_megalodon.data import BatchIterator, PackedDataset, TokenStream
    tokens = np.arange(40 * 16 + 1, dtype=np.int32) % 97
    data = PackedDataset(TokenStream(tokens, np.zeros(1, np.int64), 97), 16)
    plain, staged = BatchIterator(data, 4, 0), staged_iterator_class()(data, 4, 0)
    seen = []
    for i in range(2 * STAGING_SETS + 1):
        want, got = next(plain), next(staged)
        assert isinstance(got.inputs, mx.array) and got.num_tokens == want.num_tokens == 64
        for field in ("inputs", "targets", "mask"):
            assert np.array_equal(np.array(getattr(got, field)), getattr(want, field)), (i, field)
        seen.append(id(got.inputs))
    assert len(set(seen)) == STAGING_SETS and seen[STAGING_SETS] == seen[0]
