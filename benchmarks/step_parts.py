"""Where one decoder layer's training time goes: the parts of a SmolLM2-shaped layer, timed alone.

Forward+backward of each part on a (batch, seq_len, 576) block, SmolLM2's shape (9 query heads,
3 key/value heads of 64, FFN 1536), contenders in rotation, medians:

* ``rmsnorm``: transformers' ``LlamaRMSNorm`` (a layer has two);
* ``rotary q,k``: ``apply_rotary_pos_emb`` on the query and key heads;
* ``sdpa (flash)``: ``F.scaled_dot_product_attention``, causal, grouped KV heads (what
  transformers' ``sdpa`` attention calls on the CPU);
* ``attention (explicit)``: the same attention written as two matmuls and one masked softmax, with
  the query heads that share a KV head stacked (no KV copies), to see whether the fused kernel
  can be beaten on this machine;
* ``attention (blocked)``: moeforge's block-causal attention
  (:func:`moeforge.models.attention.block_causal_attention`), which the trainer uses on the CPU;
* ``LlamaAttention (blocked)``: the whole block with transformers dispatching to it;
* ``q,k,v,o projections``: the four linear maps of ``LlamaAttention``;
* ``LlamaAttention``: the whole block (projections, rotary, SDPA);
* ``moe 8x2x192``: :class:`moeforge.moe.MoELayer`, SmolLM2's FFN split into 8 experts, top-2;
* ``dense mlp``: ``LlamaMLP`` of width 1536, the FFN the MoE layer replaces.

    .venv/bin/python benchmarks/step_parts.py [--batch 8] [--seq-len 512] [--repeats 7]

The numbers say which parts an MoE leaves untouched (everything but the FFN), which bounds both
the MoE step's speed-up over the dense step and a faster MoE layer's speed-up over transformers.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from moeforge.eval.report import device_description
from moeforge.models.attention import ATTENTION_NAME, block_causal_attention, register_attention
from moeforge.moe import MoEConfig, MoELayer
from moeforge.utils.memory import tune_cpu_allocator
from _args import positive_int  # noqa: E402  (benchmarks/ is on sys.path when run)


def parts(batch: int, seq: int) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                      max_position_embeddings=max(2048, seq))
    cfg._attn_implementation = "sdpa"
    hidden, heads, kv, dim = 576, 9, 3, 64
    attn, norm, mlp = LlamaAttention(cfg, 0), LlamaRMSNorm(hidden), LlamaMLP(cfg)
    register_attention()
    cfg_blocked = LlamaConfig(**cfg.to_dict())
    cfg_blocked._attn_implementation = ATTENTION_NAME
    attn_blocked = LlamaAttention(cfg_blocked, 0)
    attn_blocked.load_state_dict(attn.state_dict())
    moe = MoELayer(MoEConfig(hidden_size=hidden, expert_size=192, num_experts=8, top_k=2))
    x0 = torch.randn(batch, seq, hidden)
    cos, sin = LlamaRotaryEmbedding(cfg)(x0, torch.arange(seq)[None])
    q0, k0, v0 = torch.randn(batch, heads, seq, dim), torch.randn(batch, kv, seq, dim), torch.randn(batch, kv, seq, dim)
    causal = torch.full((seq, seq), float("-inf")).triu(1)

    def leaf(t):
        return t.detach().clone().requires_grad_(True)

    def explicit(q, k, v):
        groups = heads // kv
        s = torch.matmul(q.view(batch, kv, groups * seq, dim), k.transpose(-1, -2)) / math.sqrt(dim)
        p = torch.softmax(s.view(batch, kv, groups, seq, seq) + causal, dim=-1)
        return torch.matmul(p.view(batch, kv, groups * seq, seq), v).view(batch, heads, seq, dim)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def attention(fn):
        def run():
            q, k, v = leaf(q0), leaf(k0), leaf(v0)
            fn(q, k, v).backward(q0)
        return run

    def module(m, call=lambda m, x: m(x)):
        def run():
            for p in m.parameters():
                p.grad = None
            x = leaf(x0)
            call(m, x).backward(x0)
        return run

    def rotary():
        q, k = leaf(q0), leaf(k0)
        a, b = apply_rotary_pos_emb(q, k, cos, sin)
        (a.sum() + b.sum()).backward()

    def projections(x):
        return sum(lin(x).sum() for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))

    fns = {
        "rmsnorm": module(norm),
        "rotary q,k": rotary,
        "sdpa (flash)": attention(sdpa),
        "attention (explicit)": attention(explicit),
        "attention (blocked)": attention(lambda q, k, v: block_causal_attention(q, k, v).transpose(1, 2)),
        "q,k,v,o projections": module(attn, lambda m, x: projections(x).expand_as(x)),
        "LlamaAttention": module(attn, lambda m, x: m(x, position_embeddings=(cos, sin), attention_mask=None)[0]),
        "LlamaAttention (blocked)": module(attn_blocked, lambda m, x: m(x, position_embeddings=(cos, sin),
                                                                        attention_mask=None)[0]),
        "moe 8x2x192": module(moe, lambda m, x: m(x).hidden_states),
        "dense mlp": module(mlp),
    }
    with torch.no_grad():
        diff = (sdpa(q0, k0, v0) - explicit(q0, k0, v0)).abs().max().item()
    q, k, v = leaf(q0), leaf(k0), leaf(v0)
    diff = max(diff, (sdpa(q, k, v).transpose(1, 2) - block_causal_attention(q, k, v)).abs().max().item())
    if not diff < 1e-4:
        raise SystemExit(f"the explicit or blocked attention differs from SDPA by {diff:.1e}; the comparison would be meaningless")
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--seq-len", type=positive_int, default=512)
    ap.add_argument("--repeats", type=positive_int, default=7)
    args = ap.parse_args()
    tune_cpu_allocator()  # as the trainer does: freed blocks are reused, not page-faulted back in
    fns = parts(args.batch, args.seq_len)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn(), fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"{device_description()}, threads {torch.get_num_threads()}; {args.batch} x {args.seq_len} tokens, "
          f"forward+backward, median of {args.repeats} (ms)")
    for name, ts in times.items():
        print(f"  {name:<24} {1000 * statistics.median(ts):8.1f}")


if __name__ == "__main__":
    main()
