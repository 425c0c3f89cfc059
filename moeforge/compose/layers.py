"""CALM composition layers: projection D_A -> D_B and causal cross-attention (Bansal et al. 2024, Sec. 3.1).

For one connection, with H_A (batch, S, D_A) the augmenting model's hidden states after its
chosen layer and H_B (batch, T, D_B) the anchor's hidden states after its chosen layer:

    K, V = W_k f_proj(H_A), W_v f_proj(H_A)        f_proj: D_A -> D_B
    Q    = W_q H_B
    H_B <- H_B + W_o MultiHead(Q, K, V, mask)       heads = the anchor's head count

The mask is causal and position-aligned: both models read the same token ids, so anchor
position t may attend to augmenting positions <= t only (public implementations omit this mask
and leak future tokens). ``W_o`` starts at zero, so a fresh composition equals the anchor.

Optionally (``CALMConfig.rope``, on by default) queries and keys are rotated by their token
positions (rotary embedding, LLaMA convention), so a head can attend by relative position, e.g.
to the augmenting state at its own position. The paper does not specify positional information
in the cross-attention; LLaMA residual streams carry little absolute position, so without it a
head can only select augmenting positions by content.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cross_attention_mask(query_len: int, key_len: int, key_padding: Tensor | None = None) -> Tensor:
    """Boolean mask (batch or 1, 1, query_len, key_len); True where a query may attend.

    The queries are the last ``query_len`` positions of the ``key_len`` positions (during cached
    decoding the keys include the cache), so query i sits at absolute position
    ``key_len - query_len + i`` and sees keys at positions <= that. ``key_padding`` (batch,
    key_len), 1/True for real tokens, hides padded keys; a padded query keeps its own position
    so that no row is empty (its output is ignored downstream).
    """
    if query_len > key_len:
        raise ValueError(f"query_len {query_len} exceeds key_len {key_len}")
    device = key_padding.device if key_padding is not None else None
    q_pos = torch.arange(key_len - query_len, key_len, device=device)[:, None]
    k_pos = torch.arange(key_len, device=device)[None, :]
    allowed = k_pos <= q_pos  # (T, S)
    if key_padding is None:
        return allowed[None, None]
    allowed = allowed[None] & key_padding.bool()[:, None, :]
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions (batch|1, L) -> cos, sin (batch|1, 1, L, head_dim) of the rotary embedding (Su et al. 2021)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (b, L, hd/2)
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (batch, heads, L, head_dim) rotated pairwise (first half, second half), as LLaMA does."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class CrossAttention(nn.Module):
    """Multi-head attention from anchor states to (projected) augmenting states.

    Args:
        dim: anchor width D_B (queries, keys and values all enter at this width).
        num_heads: heads h; the inner width is h * head_dim.
        head_dim: per-head width; default D_B / h.
        rope_theta: base of the rotary embedding applied to queries and keys; None: no positions.
    """

    def __init__(
        self, dim: int, num_heads: int, head_dim: int | None = None, dropout: float = 0.0,
        rope_theta: float | None = None,
    ) -> None:
        super().__init__()
        self.rope_theta = rope_theta
        head_dim = head_dim or dim // num_heads
        if head_dim * num_heads == 0:
            raise ValueError(f"cannot split width {dim} into {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def _rotate(self, x: Tensor, positions: Tensor | None) -> Tensor:
        if self.rope_theta is None:
            return x
        if positions is None:
            positions = torch.arange(x.shape[2], device=x.device)[None]
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, x.dtype)
        return apply_rotary(x, cos, sin)

    def key_values(self, memory: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """memory (batch, S, D_B), positions (batch|1, S) -> keys (rotated), values: (batch, heads, S, head_dim)."""
        return self._rotate(self._heads(self.k_proj(memory)), positions), self._heads(self.v_proj(memory))

    def forward(
        self, queries: Tensor, keys: Tensor, values: Tensor, mask: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        """queries (batch, T, D_B) at ``positions`` (batch|1, T); keys/values (batch, heads, S, head_dim);
        mask (batch|1, 1, T, S) bool. Without positions, the queries are the last T of 0..S-1.

        Returns the attention output after ``o_proj``: (batch, T, D_B).
        """
        q = self._heads(self.q_proj(queries))
        if self.rope_theta is not None and positions is None:
            positions = torch.arange(keys.shape[2] - q.shape[2], keys.shape[2], device=q.device)[None]
        q = self._rotate(q, positions)
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class Connection(nn.Module):
    """One CALM connection: f_proj (D_A -> D_B) plus cross-attention, with optional RMS pre-norms.

    ``key_values(h_a)`` turns augmenting states into cacheable keys/values; ``forward(h_b, k, v,
    mask)`` returns the anchor states with the cross-attention output added (residual).
    """

    def __init__(
        self,
        augmenting_dim: int,
        anchor_dim: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        norm: bool = True,
        eps: float = 1e-6,
        dropout: float = 0.0,
        init_std: float = 0.02,
        rope_theta: float | None = None,
    ) -> None:
        super().__init__()
        self.augmenting_norm = nn.RMSNorm(augmenting_dim, eps=eps) if norm else nn.Identity()
        self.anchor_norm = nn.RMSNorm(anchor_dim, eps=eps) if norm else nn.Identity()
        self.proj = nn.Linear(augmenting_dim, anchor_dim, bias=False)
        self.attn = CrossAttention(anchor_dim, num_heads, head_dim, dropout, rope_theta)
        self.reset_parameters(init_std)

    @torch.no_grad()
    def reset_parameters(self, init_std: float = 0.02) -> None:
        """Normal(0, init_std) for f_proj and q/k/v; zeros for the output projection (composed == anchor)."""
        for lin in (self.proj, self.attn.q_proj, self.attn.k_proj, self.attn.v_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.attn.o_proj.weight)
        for n in (self.augmenting_norm, self.anchor_norm):
            if isinstance(n, nn.RMSNorm):
                nn.init.ones_(n.weight)

    def key_values(self, augmenting_states: Tensor, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(batch, S, D_A) at positions (batch|1, S) -> keys, values (batch, heads, S, head_dim)."""
        dtype = self.proj.weight.dtype
        return self.attn.key_values(self.proj(self.augmenting_norm(augmenting_states.to(dtype))), positions)

    def forward(
        self, anchor_states: Tensor, keys: Tensor, values: Tensor, mask: Tensor, positions: Tensor | None = None
    ) -> Tensor:
        """anchor_states (batch, T, D_B) -> anchor_states + cross-attention output, same shape and dtype."""
        x = self.anchor_norm(anchor_states.to(self.proj.weight.dtype))
        return anchor_states + self.attn(x, keys, values, mask, positions).to(anchor_states.dtype)


__all__ = ["Connection", "CrossAttention", "apply_rotary", "cross_attention_mask", "rotary_cos_sin"]
