#!/usr/bin/env python
"""Convert an upstream Megalodon checkpoint into an MLX model directory (or back).

    python convert.py SRC DST [--dtype float32|bfloat16|float16] [--to mlx|upstream]
                              [--config FILE] [--tokenizer FILE]
"""
import sys

from mlx_megalodon.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
