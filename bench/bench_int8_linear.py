"""CPU: the int8 linear as (A) dequantize the weight then matmul, or (B) matmul on the cast int8 weight
then scale the product's columns; beside the float32 linear. Interleaved rounds, one process.

    .venv/bin/python bench/bench_int8_linear.py [--tokens 4096] [--dim 1024] [--rounds 5]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    from stepvideo_ms import runtime
    runtime.init("CPU")
    import mindspore as ms
    from mindspore import Tensor
    from stepvideo_ms.ops.linear import linear, _matmul_bt
    from stepvideo_ms.ops.linear import dequantize
    from stepvideo_ms.ops.quant import quantize_rows

    rng = np.random.default_rng(0)
    shapes = [(a.dim, a.dim), (4 * a.dim, a.dim), (a.dim, 4 * a.dim)]
    cases = []
    for n, k in shapes:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
        q, s = quantize_rows(w)
        x = Tensor(rng.standard_normal((a.tokens, k)).astype(np.float32))
        cases.append((x, Tensor(w), Tensor(q), Tensor(s)))

    def float32(x, w, q, s):
        return linear(x, w)

    def dequant_then_matmul(x, w, q, s):
        return linear(x, dequantize(q, s, ms.float32))

    def matmul_then_scale(x, w, q, s):
        return _matmul_bt(x, q.astype(ms.float32)) * s.reshape(1, -1)

    ways = {"float32 weight": float32, "A dequantize then matmul": dequant_then_matmul,
            "B matmul then scale": matmul_then_scale}
    ref = [float32(*c).asnumpy() for c in cases]
    for name, fn in ways.items():
        for c, r in zip(cases, ref):
            err = np.abs(fn(*c).asnumpy() - r).max()
            assert name == "float32 weight" or err < 0.05 * np.abs(r).max(), (name, err)
    times = {name: [] for name in ways}
    for _ in range(a.rounds):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for c in cases:
                fn(*c).asnumpy()
            times[name].append(time.perf_counter() - t0)
    base = np.median(times["float32 weight"])
    print(f"load: {os.getloadavg()[0]:.1f}; {a.tokens} tokens, weights {shapes}; median of {a.rounds} interleaved rounds")
    for name, t in times.items():
        print(f"  {name:26s} {np.median(t) * 1e3:8.1f} ms  x{np.median(t) / base:.2f} of float32")


if __name__ == "__main__":
    main()
