"""moeforge's block-causal training attention against PyTorch's SDPA and transformers' LLaMA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import moeforge.models.attention as attention
from moeforge.errors import MoeforgeError
from moeforge.models.attention import block_causal_attention, saved_bytes, use_block_attention


def _qkv(batch, heads, kv_heads, seq, dim, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("heads,kv_heads,seq,block", [(4, 4, 37, 8), (6, 2, 37, 8), (9, 3, 64, 64), (2, 1, 5, 64)])
def test_matches_sdpa_forward_and_backward(heads, kv_heads, seq, block):
    q, k, v = _qkv(2, heads, kv_heads, seq, 16)
    grad = torch.randn(2, seq, heads, 16, dtype=torch.float64)
    out = block_causal_attention(q, k, v, block=block)  # (B, S, Hq, D)
    out.backward(grad)
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for mine, t in zip(ours, (q, k, v)):
        torch.testing.assert_close(mine, t.grad, atol=1e-12, rtol=1e-10)


def test_gradcheck_on_a_tiny_input():
    q, k, v = _qkv(1, 4, 2, 7, 3)
    assert torch.autograd.gradcheck(lambda a, b, c: block_causal_attention(a, b, c, scale=0.7, block=3), (q, k, v))


def test_takes_non_contiguous_heads_and_future_tokens_do_not_leak():
    # transformers hands (B, S, H, D) projections transposed to (B, H, S, D): not contiguous
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 12, 6, 8, generator=g).transpose(1, 2)
    k = torch.randn(2, 12, 3, 8, generator=g).transpose(1, 2)
    v = torch.randn(2, 12, 3, 8, generator=g).transpose(1, 2)
    out = block_causal_attention(q, k, v, block=5)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:] += 5.0
    v2[:, :, 7:] -= 3.0
    moved = block_causal_attention(q, k2, v2, block=5)
    torch.testing.assert_close(moved[:, :7], out[:, :7], atol=0, rtol=0)
    assert not torch.allclose(moved[:, 7:], out[:, 7:])


def test_bad_shapes_are_refused():
    q, k, v = _qkv(1, 5, 2, 4, 3)
    with pytest.raises(ValueError, match="query heads"):
        block_causal_attention(q, k, v)
    q, k, v = _qkv(1, 4, 2, 4, 3)
    with pytest.raises(ValueError, match="block"):
        block_causal_attention(q, k, v, block=0)


def test_saved_bytes_counts_the_kept_probabilities():
    # 2 blocks of 4 over 6 queries: rows 0-3 see 4 keys, rows 4-5 see 6
    assert saved_bytes(1, 1, 6, 4, 4) == (4 * 4 + 2 * 6) * 4
    assert saved_bytes(8, 9, 512, 64, 4) == 8 * 9 * 64 * sum(range(64, 513, 64)) * 4


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=64, num_hidden_layers=2, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).double()


@pytest.fixture
def block_calls(monkeypatch):
    calls = []
    real = attention.BlockCausalAttention.apply
    monkeypatch.setattr(attention.BlockCausalAttention, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def _loss_and_grads(model, ids, mask=None):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    return out.loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_llama_training_step_equals_sdpa(block_calls):
    model = _llama()
    ids = torch.randint(0, 97, (3, 150), generator=torch.Generator().manual_seed(2))
    ref_loss, ref_grads = _loss_and_grads(model, ids)
    assert use_block_attention(model, "auto", torch.device("cpu")) == 1
    loss, grads = _loss_and_grads(model, ids)
    assert len(block_calls) == 2  # one per layer: the block path ran
    torch.testing.assert_close(loss, ref_loss, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


def test_padding_inference_and_large_calls_fall_back_to_sdpa(block_calls, monkeypatch):
    model = _llama()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0  # left padding: needs a mask tensor
    ref = _loss_and_grads(model, ids, mask)
    with torch.no_grad():
        ref_logits = model(ids).logits
    use_block_attention(model, "auto", torch.device("cpu"))
    padded = _loss_and_grads(model, ids, mask)
    with torch.no_grad():
        logits = model(ids).logits
    monkeypatch.setattr(attention, "MAX_SAVED_BYTES", 1000)
    _loss_and_grads(model, ids)
    assert block_calls == []
    torch.testing.assert_close(padded[0], ref[0])
    torch.testing.assert_close(logits, ref_logits)


def test_bf16_autocast_keeps_sdpa(block_calls):
    model = _llama().float()
    use_block_attention(model, "auto", torch.device("cpu"))
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert block_calls == [] and torch.isfinite(loss)


def test_modes_switch_what_they_say():
    model = _llama()
    assert use_block_attention(model, "model", torch.device("cpu")) == 0
    assert use_block_attention(model, "auto", torch.device("cuda")) == 0
    assert model.config._attn_implementation == "sdpa"
    model.config._attn_implementation = "eager"
    assert use_block_attention(model, "auto", torch.device("cpu")) == 0  # auto leaves eager alone
    assert use_block_attention(model, "blocked", torch.device("cpu")) == 1
    assert model.config._attn_implementation == "moeforge"


def test_train_config_refuses_an_unknown_attention():
    from moeforge.train.config import TrainConfig

    with pytest.raises(MoeforgeError, match="attention must be one of auto, blocked, model.*blocked"):
        TrainConfig.from_dict({"model": "smollm2", "output_dir": "out", "data": [{"name": "p", "builtin": "prose"}],
                               "attention": "blockd"})
