"""Block-causal attention for CPU training, registered with transformers as ``"moeforge"``.

On the CPU, PyTorch's fused (flash) attention walks small query/key tiles and recomputes the
attention probabilities in its backward; at SmolLM2's shape (9 query heads, 3 key/value heads of
64, 512 tokens, batch 8) its forward+backward runs several times below the machine's matmul
rate. This module computes exact causal attention in query blocks of ``block`` rows instead:

forward   for each query block [s0, s1):
              S = Q[s0:s1] K[:s1]^T * scale            (keys past s1 are masked anyway: skipped)
              S[i, j] = -inf for j > i                 (only the diagonal tile needs the mask)
              P = softmax(S)                           (kept for the backward)
              O[s0:s1] = P V[:s1]
backward  per block, from the kept P (no recomputation):
              dV[:s1] += P^T dO;   dP = dO V^T;   dS = P * (dP - rowsum(dP * P)) * scale
              dQ[s0:s1] = dS K[:s1];   dK[:s1] += dS^T Q[s0:s1]

The query heads that share a key/value head (grouped-query attention) are stacked into one
matrix per KV head, so K and V are never copied per query head. Skipping the masked key
columns does about (S + block) / 2S of the full product's work. Keeping P costs
B * Hq * S * (S + block) / 2 floats per layer (40 MB at 8 x 512 for SmolLM2, block 32); above
:data:`MAX_SAVED_BYTES` the call falls back to SDPA, whose memory is linear in S.

:func:`moeforge_attention_forward` has transformers' attention-function signature. It takes the
block path only where it is exact and pays off: CPU, float32/float64 without autocast, gradients wanted, causal
self-attention without a mask tensor (no padding), no dropout, softcap, position bias or
sliding window. Everything else (inference, padding, decoding with a cache, GPUs) goes to
transformers' own ``sdpa`` function unchanged. Masks are built as for ``sdpa``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ATTENTION_NAME = "moeforge"
BLOCK = 32
MAX_SAVED_BYTES = 128 << 20
"""Most bytes of attention probabilities one call may keep for its backward."""


def saved_bytes(batch: int, heads: int, seq: int, block: int, itemsize: int) -> int:
    """Bytes of P the block path keeps for (batch, heads, seq) queries: sum over blocks of rows x keys."""
    keys = sum(min(seq, s0 + block) * (min(seq, s0 + block) - s0) for s0 in range(0, seq, block))
    return batch * heads * keys * itemsize


def _causal_tile(n: int, device: torch.device) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


class BlockCausalAttention(torch.autograd.Function):
    """softmax(Q K^T * scale + causal) V for q (B, Hq, S, D), k, v (B, Hkv, S, D); out (B, S, Hq, D)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float, block: int) -> Tensor:
        batch, heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        k, v = k.contiguous(), v.contiguous()
        qg = q.unflatten(1, (kv_heads, groups))  # (B, Hkv, G, S, D), a view
        out = q.new_empty(batch, seq, kv_heads, groups, dim)  # transformers' (B, S, Hq, D) layout
        og = out.permute(0, 2, 3, 1, 4)  # (B, Hkv, G, S, D) view of it
        probs = []
        for s0 in range(0, seq, block):
            s1 = min(seq, s0 + block)
            n = s1 - s0
            qb = qg[:, :, :, s0:s1].reshape(batch, kv_heads, groups * n, dim)
            scores = torch.matmul(qb, k[:, :, :s1].transpose(-1, -2)).mul_(scale)  # (B, Hkv, G*n, s1)
            scores.view(batch, kv_heads, groups, n, s1)[..., s0:s1].masked_fill_(_causal_tile(n, q.device), float("-inf"))
            p = torch.softmax(scores, dim=-1)
            og[:, :, :, s0:s1] = torch.matmul(p, v[:, :, :s1]).view(batch, kv_heads, groups, n, dim)
            probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.scale, ctx.block = scale, block
        return out.view(batch, seq, heads, dim)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        q, k, v, *probs = ctx.saved_tensors
        scale, block = ctx.scale, ctx.block
        batch, heads, seq, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        qg = q.unflatten(1, (kv_heads, groups))
        dog = grad_out.reshape(batch, seq, kv_heads, groups, dim).permute(0, 2, 3, 1, 4)
        grad_q = torch.empty_like(q, memory_format=torch.contiguous_format)
        dqg = grad_q.unflatten(1, (kv_heads, groups))
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        for s0, p in zip(range(0, seq, block), probs):
            s1 = min(seq, s0 + block)
            n = s1 - s0
            qb = qg[:, :, :, s0:s1].reshape(batch, kv_heads, groups * n, dim)
            dob = dog[:, :, :, s0:s1].reshape(batch, kv_heads, groups * n, dim)
            grad_v[:, :, :s1] += torch.matmul(p.transpose(-1, -2), dob)
            dp = torch.matmul(dob, v[:, :, :s1].transpose(-1, -2))
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype).mul_(scale)
            dqg[:, :, :, s0:s1] = torch.matmul(ds, k[:, :, :s1]).view(batch, kv_heads, groups, n, dim)
            grad_k[:, :, :s1] += torch.matmul(ds.transpose(-1, -2), qb)
        return grad_q, grad_k, grad_v, None, None


def block_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, block: int = BLOCK) -> Tensor:
    """Exact causal attention with grouped KV heads, computed in query blocks (see module docstring).

    Args:
        q: (B, Hq, S, D) queries; k, v: (B, Hkv, S, D), Hq a multiple of Hkv.
        scale: logit scale, 1 / sqrt(D) when None.
        block: query rows per block.
    Returns:
        (B, S, Hq, D), the layout transformers' attention functions return.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"expected q (B, Hq, S, D) and k, v (B, Hkv, S, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads do not split into groups over {k.shape[1]} key/value heads")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return BlockCausalAttention.apply(q, k, v, scale, block)


def _takes_block_path(module, query: Tensor, key: Tensor, attention_mask, dropout: float, is_causal, kwargs) -> bool:
    if query.device.type != "cpu" or query.dtype not in (torch.float32, torch.float64):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # the matmuls would run in the autocast dtype; SDPA handles mixed precision
    if not torch.is_grad_enabled() or not (query.requires_grad or key.requires_grad):
        return False  # inference: the fused kernel's forward is as fast and keeps no probabilities
    if attention_mask is not None or dropout or kwargs.get("softcap") is not None:
        return False
    if kwargs.get("position_bias") is not None or kwargs.get("sliding_window") or kwargs.get("cache") is not None:
        return False
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return False
    if key.dtype != query.dtype or query.shape[1] % key.shape[1]:
        return False
    batch, heads, seq, _ = query.shape
    return saved_bytes(batch, heads, seq, BLOCK, query.element_size()) <= MAX_SAVED_BYTES


def moeforge_attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                               dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                               **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: the block path for CPU causal training, else ``sdpa``.

    query (B, Hq, S, D), key/value (B, Hkv, S_kv, D); returns ((B, S, Hq, D), None).
    """
    if _takes_block_path(module, query, key, attention_mask, dropout, is_causal, kwargs):
        return block_causal_attention(query, key, value, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_block_attention(model: torch.nn.Module, mode: str, device: torch.device) -> int:
    """Point the transformers models inside ``model`` at the ``"moeforge"`` attention for training.

    ``mode`` is the training config's ``attention``: "model" changes nothing; "auto" switches models
    that run ``sdpa`` when training on the CPU; "blocked" switches ``sdpa`` and ``eager`` models on any
    device (the block path itself runs on the CPU only). The implementation is a runtime setting:
    checkpoints do not record it. Returns the number of model configs switched.
    """
    from transformers import PreTrainedModel

    if mode == "model" or (mode == "auto" and device.type != "cpu"):
        return 0
    register_attention()
    switchable = ("sdpa", "eager") if mode == "blocked" else ("sdpa",)
    seen: set[int] = set()
    changed = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        if not isinstance(module, PreTrainedModel) or config is None or id(config) in seen:
            continue
        seen.add(id(config))
        if getattr(config, "_attn_implementation", None) in switchable:
            config._attn_implementation = ATTENTION_NAME
            changed += 1
    return changed


def register_attention() -> None:
    """Register ``"moeforge"`` with transformers' attention and mask interfaces (masks as for sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, moeforge_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
