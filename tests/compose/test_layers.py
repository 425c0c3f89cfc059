"""Cross-attention against a hand-written reference; causality of the mask; zero-init output."""

import math

import torch

from moeforge.compose.layers import Connection, CrossAttention, cross_attention_mask


def test_mask_by_hand():
    # 2 new queries after 1 cached position: queries sit at positions 1 and 2 of 3
    m = cross_attention_mask(2, 3)[0, 0]
    assert m.tolist() == [[True, True, False], [True, True, True]]
    # left padding: key 0 is padding; a padded query keeps only itself
    pad = torch.tensor([[0, 1, 1]])
    m = cross_attention_mask(3, 3, pad)[0, 0]
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def reference_attention(attn: CrossAttention, queries, memory, mask):
    """Plain softmax(QK^T / sqrt(d) + mask) V per head, written out with einsum."""
    b, t, _ = queries.shape
    h, d = attn.num_heads, attn.head_dim
    q = (queries @ attn.q_proj.weight.T).view(b, t, h, d)
    k = (memory @ attn.k_proj.weight.T).view(b, -1, h, d)
    v = (memory @ attn.v_proj.weight.T).view(b, -1, h, d)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, h * d)
    return out @ attn.o_proj.weight.T


def test_cross_attention_matches_reference():
    attn = CrossAttention(16, num_heads=4)
    torch.nn.init.normal_(attn.o_proj.weight)
    queries, memory = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    mask = cross_attention_mask(5, 5)
    out = attn(queries, *attn.key_values(memory), mask)
    torch.testing.assert_close(out, reference_attention(attn, queries, memory, mask))


def test_fresh_connection_is_identity():
    conn = Connection(8, 16, num_heads=4)
    h_b, h_a = torch.randn(2, 6, 16), torch.randn(2, 6, 8)
    assert torch.equal(conn(h_b, *conn.key_values(h_a), cross_attention_mask(6, 6)), h_b)


def test_cross_attention_is_causal():
    """Anchor position t only sees augmenting positions <= t."""
    conn = Connection(8, 16, num_heads=4)
    torch.nn.init.normal_(conn.attn.o_proj.weight)
    h_b, h_a = torch.randn(1, 7, 16), torch.randn(1, 7, 8)
    t = 3
    later = h_a.clone()
    later[:, t + 1 :] = torch.randn(1, 7 - t - 1, 8)
    mask = cross_attention_mask(7, 7)
    out = conn(h_b, *conn.key_values(h_a), mask)
    out_later = conn(h_b, *conn.key_values(later), mask)
    assert torch.equal(out[:, : t + 1], out_later[:, : t + 1])
    assert not torch.allclose(out[:, t + 1 :], out_later[:, t + 1 :])
    # and the test can fail: an earlier change does reach position t
    earlier = h_a.clone()
    earlier[:, t] += 1.0
    assert not torch.allclose(conn(h_b, *conn.key_values(earlier), mask)[:, t], out[:, t])


def test_rotary_cross_attention_matches_reference():
    """Rotary positions by hand: pairs (x_i, x_{i+d/2}) rotated by angle p * theta^(-2i/d)."""
    attn = CrossAttention(16, num_heads=2, rope_theta=100.0)
    torch.nn.init.normal_(attn.o_proj.weight)
    queries, memory = torch.randn(1, 4, 16), torch.randn(1, 4, 16)
    mask = cross_attention_mask(4, 4)
    out = attn(queries, *attn.key_values(memory), mask)

    def rotate(x):  # x (b, L, h, d), position = index along L
        d = x.shape[-1]
        freq = 100.0 ** (-torch.arange(0, d, 2).float() / d)
        ang = torch.arange(x.shape[1]).float()[:, None] * freq  # (L, d/2)
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([a * c - b * s, a * s + b * c], dim=-1)

    b, t, h, d = 1, 4, 2, 8
    q = rotate((queries @ attn.q_proj.weight.T).view(b, t, h, d))
    k = rotate((memory @ attn.k_proj.weight.T).view(b, t, h, d))
    v = (memory @ attn.v_proj.weight.T).view(b, t, h, d)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(b, t, h * d) @ attn.o_proj.weight.T
    torch.testing.assert_close(out, ref)
    # only relative positions matter: shifting every position by 5 changes nothing
    pos = torch.arange(4)[None] + 5
    shifted = attn(queries, *attn.key_values(memory, pos), mask, pos)
    torch.testing.assert_close(shifted, out, atol=1e-5, rtol=1e-5)
