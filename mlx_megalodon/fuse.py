"""Fold LoRA / DoRA adapters (or full fine-tuned layers) into a model and write a new MLX model
directory: ``python -m mlx_megalodon.fuse --model PATH --adapter-path DIR --save-path DST``.

Follows ``mlx_lm.fuse``. A quantized base model is re-quantized with its own group size and bits
(only the adapted layers change) unless ``--de-quantize``, which writes a float model (every
quantized layer dequantized, no ``quantization`` entry in config.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .lora import fuse_model, load_adapters


def fuse(model_path, adapter_path, save_path, dequantize: bool = False) -> Path:
    """Load ``model_path``, apply and fold the adapters in ``adapter_path``, write ``save_path``
    (atomically; it must not exist yet)."""
    from .quantize import save_model
    from .utils import load_model
    save_path = Path(save_path)
    if save_path.exists():
        raise FileExistsError(f"{save_path}: destination already exists")
    model, tokenizer_path = load_model(model_path)
    load_adapters(model, adapter_path)
    fuse_model(model, dequantize=dequantize)
    return save_model(model, tokenizer_path, save_path)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m mlx_megalodon.fuse",
                       description="Fuse fine-tuned adapters into the base model.")
    p.add_argument("--model", default="mlx_model",
                   help="MLX model directory, upstream checkpoint directory or Hub repo id")
    p.add_argument("--adapter-path", default="adapters", help="directory with adapters.safetensors and "
                                                              "adapter_config.json (default: adapters)")
    p.add_argument("--save-path", default="fused_model", help="new model directory (default: fused_model)")
    p.add_argument("--de-quantize", "--dequantize", dest="dequantize", action="store_true",
                   help="write a float model even if the base model is quantized")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    try:
        print("Loading pretrained model")
        dst = fuse(args.model, args.adapter_path, args.save_path, args.dequantize)
        print(f"Saved fused model to {dst}")
        return 0
    except (ValueError, OSError, KeyError, CheckpointError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
