"""Where one MoE layer's forward+backward spends its time: torch.profiler's table of kernels
(GPU) or operators (CPU), then the wall time per call, for one shape.

Usage::

    python benchmarks/moe_layer_profile.py [--device cuda] [--dtype bfloat16] [--tokens 32768]
                                           [--shape 8,2,192] [--rows 30]

On a GPU, compare the profile's "Self CUDA time total" (divided by --steps) with the wall time
printed last: when the wall time is the larger, the layer is bound by launching kernels, not by
running them.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moeforge.moe import MoEConfig, MoELayer
from _args import int_tuple, positive_int  # noqa: E402  (benchmarks/ is on sys.path when run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=positive_int, default=32768)
    ap.add_argument("--hidden", type=positive_int, default=576)
    ap.add_argument("--shape", type=int_tuple(3), default=(8, 2, 192), help="experts,top-k,expert size")
    ap.add_argument("--steps", type=positive_int, default=10, help="profiled calls")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    experts, top_k, size = args.shape
    if top_k > experts:
        ap.error(f"--shape: top-k {top_k} exceeds the {experts} experts")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=args.hidden, expert_size=size, num_experts=experts, top_k=top_k))
    layer = layer.to(device, dtype).train()
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype)
    g = torch.randn_like(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def call():
        inp = x.detach().requires_grad_(True)
        out = layer(inp)
        (out.hidden_states * g).sum().add(out.aux_loss).backward()

    for _ in range(5):
        call()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            call()
        sync()
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.steps} calls of forward+backward, {args.tokens} tokens, shape {','.join(map(str, args.shape))}, {args.dtype} on {device}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        call()
    sync()
    print(f"wall time per forward+backward: {(time.perf_counter() - t0) / 20 * 1000:.2f} ms")


if __name__ == "__main__":
    main()
