"""MoLoRA's batched expert computation vs a Python loop over experts (forward + backward).

The layer computes all E LoRA experts with two matmuls, x @ A (d_in, E*r) then (N, E*r) @ B
(E*r, d_out), with the router weights applied to the E*r intermediate; the reference loops
over experts, computing s_i * B_i A_i x one expert at a time. Shapes are SmolLM2's FFN up
projection (576 -> 1536), rank 4, 10 experts (the paper's MoLoRA-10).

    OMP_NUM_THREADS=1 python benchmarks/peft_molora.py [--repeats 5]

The two contenders are timed in rotation and the best of ``--repeats`` calls of each is
reported (the least disturbed call on a shared machine).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from moeforge.peft import MoLoRALayer
from moeforge.peft.context import AdapterContext


def loop_delta(layer: MoLoRALayer, x: torch.Tensor) -> torch.Tensor:
    probs = layer.router(x)
    out = 0
    for i in range(layer.num_experts):
        out = out + probs[..., i : i + 1] * ((x @ layer.lora_A[i]) @ layer.lora_B[i])
    return out * layer.scaling


def once(fn, x) -> float:
    t = time.perf_counter()
    fn(x).sum().backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="calls per contender (best is reported)")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    torch.manual_seed(0)
    print("| experts | tokens | batched (ms) | loop (ms) | loop / batched |")
    print("|---|---|---|---|---|")
    for experts in (4, 10, 30):
        layer = MoLoRALayer(nn.Linear(576, 1536), "up_proj", AdapterContext(), num_experts=experts, rank=4,
                            alpha=16.0, router_input="input", router_features=576)
        nn.init.normal_(layer.lora_B, std=0.02)
        for tokens in (128, 1024):
            x = torch.randn(tokens, 576, requires_grad=True)
            torch.testing.assert_close(layer.delta(x), loop_delta(layer, x), rtol=1e-4, atol=1e-5)
            fast = slow = float("inf")
            for _ in range(args.repeats):  # in rotation: drift in machine load hits both alike
                fast = min(fast, once(layer.delta, x))
                slow = min(slow, once(lambda v: loop_delta(layer, v), x))
            print(f"| {experts} | {tokens} | {fast * 1e3:.2f} | {slow * 1e3:.2f} | {slow / fast:.2f}x |")


if __name__ == "__main__":
    main()
