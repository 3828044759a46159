#!/usr/bin/env python3
"""Generate text with a Megalodon model: see ``python generate.py --help``."""
import sys

from mlx_megalodon.generate import main

if __name__ == "__main__":
    sys.exit(main())
