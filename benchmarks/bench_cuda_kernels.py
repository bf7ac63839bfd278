"""CUDA timings of one decode row's matmuls: dense bfloat16 against pipeserve's int4 and int8 weights.

Run by `make test-gpu` on a GPU machine (needs only torch). Shapes are SmolLM2-135M's and Llama-3-70B's
(hidden 8192, one TP=8 shard of its MLP), one row (one user's decode) and 32 rows (a batch).
"""

from __future__ import annotations

import torch

from pipeserve.bench.kernel_count import cuda_time_us
from pipeserve.layers.quantization import QuantizedWeight

SHAPES = {"smollm2 gate_up": (3072, 576), "smollm2 lm_head": (49152, 576), "llama70b gate_up/8": (7168, 8192),
          "llama70b down/8": (8192, 3584)}


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'matmul':<20} {'rows':>4} {'bf16 us':>8} {'int4 us':>8} {'int8 us':>8}")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        q4, q8 = QuantizedWeight("int4", w.float(), "cuda"), QuantizedWeight("int8", w.float(), "cuda")
        for rows in (1, 32):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            dense = cuda_time_us(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
            int4 = cuda_time_us(lambda: q4.mm(x))  # noqa: B023
            int8 = cuda_time_us(lambda: q8.mm(x))  # noqa: B023
            print(f"{name:<20} {rows:>4} {dense:>8.1f} {int4:>8.1f} {int8:>8.1f}")


if __name__ == "__main__":
    main()
