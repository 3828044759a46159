"""CEMA kernel backward, A/B on a GPU: the gamma-free backward (GHT0 = 1, what a training step runs:
no final-state cotangent) against the general one (GHT0 = 0, final state returned), for the
backward's lanes per (b, d) (BWD_MAX_NPT 4 and 8), bf16 x at mega200M's D = 1024.

    python3 benchmarks/cema_backward_ab.py

Prints median ms per call: forward, forward+backward y-only, forward+backward with the state out.
Result on the H200: benchmarks/results/cema_ght0_ab_h200.log.
"""
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import mlx.core as mx  # noqa: E402

from kernels import coeffs, timeit  # noqa: E402  (benchmarks/kernels.py)
from mlx_megalodon import kernels as K  # noqa: E402
from mlx_megalodon.complex_exponential_moving_average import CEMACoefficients  # noqa: E402


def main():
    if K.gpu_backend() is None:
        sys.exit("needs a GPU backend (MLX with CUDA or Metal)")
    for npt in (4, 8):
        K.BWD_MAX_NPT = npt
        for B, L, D in [(8, 4096, 1024), (1, 32768, 1024)]:
            c = coeffs(D)
            xs = [mx.random.normal((B, L, D)).astype(mx.bfloat16) for _ in range(3)]
            mx.eval(xs)
            row = {"fwd": timeit(lambda x: K.cema_kernel_scan(x, c)[0], xs) * 1e3}
            for name, with_state in (("fwd_bwd_y_only_GHT0=1", False), ("fwd_bwd_state_out_GHT0=0", True)):
                def loss(x, cs, with_state=with_state):
                    return (K.cema_kernel_scan(x, CEMACoefficients(*cs), None, with_state)[0] ** 2).sum()
                grad = mx.grad(loss, argnums=(0, 1))
                row[name] = timeit(lambda x, grad=grad: grad(x, list(c)), xs, max_reps=20) * 1e3
            print(f"B={B} L={L} D={D} BWD_MAX_NPT={npt}", {k: round(v, 3) for k, v in row.items()}, flush=True)


if __name__ == "__main__":
    main()
