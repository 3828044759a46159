"""Model configuration shared by the MLX model, the PyTorch reference and the converter.

Field names are upstream's ``ModelConf`` (megalodon/config.py), so an upstream ``config.json``
``model`` section reads straight into ``ModelArgs``. This module imports no array framework.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


class ConfigError(ValueError):
    """A model configuration that cannot describe a Megalodon model."""


@dataclass
class ModelArgs:
    model_type: str = "megalodon"
    num_layers: int = 8
    model_dim: int = 1024
    z_dim: int = 256
    value_dim: int = 2048
    num_heads: int = 1
    ffn_hidden_dim: int = 2048
    cema_ndim: int = 16
    chunk_size: int = 2048
    vocab_size: int = -1
    output_size: int = -1
    norm_num_groups: int = 32
    norm_affine: bool = True
    norm_eps: float = 1e-5
    rope_base: Optional[float] = None
    swiglu: bool = False
    rescale_nffn: bool = False
    scale_emb: bool = False
    share_emb: bool = False
    quantization: Optional[dict] = None

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        """Keep the fields we know (mlx-lm convention): upstream training-only fields such as dropout
        or init_mode are dropped; the values we keep are validated."""
        if not isinstance(params, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(params).__name__}")
        known = set(inspect.signature(cls).parameters)
        args = cls(**{k: v for k, v in params.items() if k in known})
        args.validate()
        return args

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d.get("quantization") is None:
            d.pop("quantization", None)
        return d

    def upstream_dict(self) -> dict:
        """The ``model`` section of an upstream config.json (upstream ModelConf fields only)."""
        d = self.to_dict()
        for k in ("model_type", "quantization"):
            d.pop(k, None)
        return d

    # ----------------------------------------------------------------- derived sizes
    @property
    def z_head_dim(self) -> int:
        return self.z_dim // self.num_heads

    @property
    def v_head_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def output_dim(self) -> int:
        return self.vocab_size if self.output_size == -1 else self.output_size

    @property
    def rope_theta(self) -> float:
        return 10000.0 if self.rope_base is None else float(self.rope_base)

    def validate(self) -> None:
        ints = ("num_layers", "model_dim", "z_dim", "value_dim", "num_heads", "ffn_hidden_dim",
                "cema_ndim", "chunk_size", "vocab_size", "norm_num_groups")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field '{name}' must be a positive integer, got {value!r}")
        if self.model_type != "megalodon":
            raise ConfigError(f"config field 'model_type' must be 'megalodon', got {self.model_type!r}")
        if self.output_size != -1 and (not isinstance(self.output_size, int) or self.output_size <= 0):
            raise ConfigError(f"config field 'output_size' must be -1 or positive, got {self.output_size!r}")
        if self.share_emb and self.output_dim != self.vocab_size:
            raise ConfigError("config field 'share_emb' needs output_size == vocab_size")
        if self.z_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ConfigError(f"z_dim ({self.z_dim}) and value_dim ({self.value_dim}) must be divisible "
                              f"by num_heads ({self.num_heads})")
        if self.z_head_dim % 2:
            raise ConfigError(f"z_dim / num_heads ({self.z_head_dim}) must be even for RoPE")
        if self.model_dim % self.norm_num_groups:
            raise ConfigError(f"model_dim ({self.model_dim}) must be divisible by norm_num_groups "
                              f"({self.norm_num_groups})")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise ConfigError(f"config field 'norm_eps' must be a positive number, got {self.norm_eps!r}")
        if self.rope_base is not None and not (isinstance(self.rope_base, (int, float)) and self.rope_base > 1):
            raise ConfigError(f"config field 'rope_base' must be a number > 1 or null, got {self.rope_base!r}")
        for name in ("norm_affine", "swiglu", "rescale_nffn", "scale_emb", "share_emb"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field '{name}' must be true or false, got {getattr(self, name)!r}")
        if not self.norm_affine:
            raise ConfigError("norm_affine=false is not supported (no released configuration uses it)")


# --------------------------------------------------------------------------- state_dict layout
def upstream_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Every key of upstream's ``Mega.state_dict()`` (model-parallel size 1) with its shape."""
    D, Z, E, F, N, G = (args.model_dim, args.z_dim, args.value_dim, args.ffn_hidden_dim,
                        args.cema_ndim, args.norm_num_groups)
    shapes: Dict[str, Tuple[int, ...]] = {
        "embed.weight": (args.vocab_size, D),
        "rope.freqs": (args.z_head_dim // 2,),
    }

    def timestep_norm(prefix: str) -> None:
        shapes[f"{prefix}.prior_count"] = ()
        shapes[f"{prefix}.prior_mean"] = (G,)
        shapes[f"{prefix}.prior_logv"] = (G,)
        shapes[f"{prefix}.weight"] = (D,)
        shapes[f"{prefix}.bias"] = (D,)

    for i in range(args.num_layers):
        p = f"layers.{i}"
        timestep_norm(f"{p}.mega.timenorm")
        shapes.update({
            f"{p}.mega.cema.alpha": (D, N, 1),
            f"{p}.mega.cema.delta": (D, N, 1),
            f"{p}.mega.cema.theta": (D, 1, 1),
            f"{p}.mega.cema.gamma": (D, N, 2),
            f"{p}.mega.cema.omega": (D, 1),
            f"{p}.mega.rmsnorm.weight": (D,),
            f"{p}.mega.wv.weight": (E, D), f"{p}.mega.wv.bias": (E,),
            f"{p}.mega.wz.weight": (Z, D), f"{p}.mega.wz.bias": (Z,),
            f"{p}.mega.wr.weight": (E, D), f"{p}.mega.wr.bias": (E,),
            f"{p}.mega.wh1.weight": (D, D), f"{p}.mega.wh1.bias": (D,),
            f"{p}.mega.wh2.weight": (D, E),
            f"{p}.mega.gamma": (2, Z),
            f"{p}.mega.beta": (2, Z),
            f"{p}.nffn.norm.weight": (D,), f"{p}.nffn.norm.bias": (D,),
            f"{p}.nffn.fc1.weight": (F, D),
            f"{p}.nffn.fc2.weight": (D, F),
        })
        if args.swiglu:
            shapes[f"{p}.nffn.fc3.weight"] = (F, D)
        if args.rescale_nffn:
            shapes[f"{p}.nffn.alpha"] = (D,)
    timestep_norm("output.final_norm")
    shapes["output.output.weight"] = (args.output_dim, D)
    return shapes


# How upstream's model-parallel layers split each tensor across consolidated.NN.pth shards:
# the dimension that was split, or None where every shard holds the full tensor.
def model_parallel_split_dim(key: str) -> Optional[int]:
    name = key.split(".")[-1]
    if key == "embed.weight":
        return 1                                    # ParallelEmbedding splits the embedding dim
    if key in ("rope.freqs",) or name == "prior_count":
        return None
    if ".timenorm." in key or key.startswith("output.final_norm."):
        return 0                                    # TimestepNorm is per-partition features/groups
    if ".mega.cema." in key:
        return 0
    if key.endswith("mega.gamma") or key.endswith("mega.beta"):
        return 1
    if any(f".mega.{w}." in key for w in ("wv", "wz", "wr", "wh1")) or \
            any(f".nffn.{w}." in key for w in ("fc1", "fc3")):
        return 0                                    # ColumnParallelLinear: output rows
    if ".mega.wh2." in key or ".nffn.fc2." in key or key == "output.output.weight":
        return 1                                    # RowParallelLinear: input columns
    return None                                     # rmsnorm, nffn.norm, nffn.alpha: replicated


def is_full_precision_key(key: str) -> bool:
    """Parameters kept in float32 whatever the compute dtype: CEMA, every norm, the Q/K affine."""
    return (".cema." in key or "norm." in key or key.endswith("mega.gamma") or key.endswith("mega.beta")
            or key.endswith("nffn.alpha") or key == "rope.freqs")


def parameter_count(args: ModelArgs) -> int:
    """Trainable parameters (upstream counts each shared tensor once; buffers excluded)."""
    total = 0
    for key, shape in upstream_shapes(args).items():
        if key == "rope.freqs" or key.rsplit(".", 1)[-1] in ("prior_count", "prior_mean", "prior_logv"):
            continue
        if key == "output.output.weight" and args.share_emb:
            continue
        total += math.prod(shape)
    return total


# --------------------------------------------------------------------------- presets
PRESETS: Dict[str, dict] = {
    "mega200M": dict(num_layers=12, model_dim=1024, num_heads=1, z_dim=256, value_dim=2048,
                     ffn_hidden_dim=2560, chunk_size=2048, norm_num_groups=32),
    "mega1.3B": dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096,
                     ffn_hidden_dim=4864, chunk_size=2048, norm_num_groups=64),
    "mega1.3B_pg19": dict(num_layers=24, model_dim=2048, num_heads=2, z_dim=512, value_dim=4096,
                          ffn_hidden_dim=3584, chunk_size=2048, norm_num_groups=64, swiglu=True,
                          scale_emb=True, share_emb=True),
    "mega7.1B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
                     ffn_hidden_dim=11264, chunk_size=2048, norm_num_groups=64),
    "mega7.3B": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
                     ffn_hidden_dim=8192, chunk_size=2048, norm_num_groups=64, swiglu=True),
    # The paper's 7B (arXiv 2404.08801 §4.1): SwiGLU, chunk 4096, RoPE base 1e5, Llama-2 tokenizer.
    "mega7B_paper": dict(num_layers=32, model_dim=4096, num_heads=4, z_dim=1024, value_dim=8192,
                         ffn_hidden_dim=8192, chunk_size=4096, norm_num_groups=64, swiglu=True,
                         rope_base=100000.0),
}


def preset(name: str, vocab_size: int = 32000, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})")
    return ModelArgs.from_dict({**PRESETS[name], "vocab_size": vocab_size, **overrides})


def main(argv=None) -> None:
    """``python -m mlx_megalodon.config``: print every preset's parameter count."""
    import argparse
    parser = argparse.ArgumentParser(description="Parameter counts of the Megalodon presets")
    parser.add_argument("--vocab-size", type=int, default=32000)
    a = parser.parse_args(argv)
    for name in PRESETS:
        n = parameter_count(preset(name, vocab_size=a.vocab_size))
        print(f"{name:14s} {n:>15,d}  ({n / 1e9:.3f}B)")


if __name__ == "__main__":
    main()
