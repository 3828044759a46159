"""The correctness gate of benchmarks/peers.py on a tiny config: mlx-megalodon and torch_ref (and
megalodon-jax when installed) pass it on the same upstream-format weights, a deliberately perturbed
weight fails it; the MLX and PyTorch Llama baselines agree on shared weights. CPU, a few seconds."""
from __future__ import annotations

import importlib.util
import shutil
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
