"""Adapter layers against hand-written references (explicit loops over experts and heads)."""

import pytest
import torch
from torch import nn

from moeforge.peft import AdapterRouter, MoLoRALayer, MoVLayer
from moeforge.peft.context import AdapterContext, prefix_mean


def _randomize(layer, scale=0.5):
    with torch.no_grad():
        for p in layer.adapter_state().values():
            p.add_(torch.randn_like(p) * scale)


def test_router_init_soft_and_topk():
    router = AdapterRouter(64, 10, init_std=0.02)
    assert router.weight.dtype == torch.float32 and router.weight.shape == (10, 64)
    assert abs(router.weight.std().item() - 0.02) < 0.004 and abs(router.weight.mean().item()) < 0.003
    assert not any(n.endswith("bias") for n, _ in router.named_parameters())
    x = torch.randn(5, 7, 64).to(torch.bfloat16)
    probs = router(x)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(x.float() @ router.weight.t(), -1))
    router.top_k = 2
    top = router(x)
    assert ((top > 0).sum(-1) == 2).all()
    kept = probs.topk(2, -1)  # kept as they are (the authors' router_probabilities * topk_mask)
    torch.testing.assert_close(top.gather(-1, kept.indices), kept.values)
    assert bool((top.sum(-1) < 1).all())


def test_top1_router_gets_gradient():
    """Renormalised, a top-1 weight would be exactly 1 and the router would never learn."""
    router = AdapterRouter(16, 4, top_k=1)
    x = torch.randn(8, 16)
    (router(x) * torch.randn(8, 4)).sum().backward()
    assert router.weight.grad.abs().max() > 1e-4


@pytest.mark.parametrize("top_k", [None, 2])
def test_molora_batched_equals_loop_over_experts(top_k):
    base = nn.Linear(12, 20)
    layer = MoLoRALayer(base, "m", AdapterContext(), num_experts=4, rank=3, alpha=6.0, router_input="input",
                        router_features=12, top_k=top_k)
    _randomize(layer)
    x = torch.randn(2, 5, 12)
    s = layer.router(x)  # (2, 5, 4)
    expected = base(x)
    for i in range(4):  # Σ_i s_i (α/r) B_i A_i x, one expert at a time
        expected = expected + s[..., i : i + 1] * (x @ layer.lora_A[i] @ layer.lora_B[i]) * 2.0
    torch.testing.assert_close(layer(x), expected)


def test_mov_per_head_equals_loop_over_heads():
    base = nn.Linear(16, 12, bias=False)  # 3 heads of 4
    layer = MoVLayer(base, "k", AdapterContext(), position="output", num_experts=5, router_input="activation",
                     heads=3, router_features=4)
    _randomize(layer)
    x = torch.randn(2, 6, 16)
    a = base(x)
    expected = torch.empty_like(a)
    for h in range(3):  # one router (5, 4) shared by the heads; each head its own vectors
        part = a[..., 4 * h : 4 * (h + 1)]
        s = torch.softmax(part @ layer.router.weight.t(), -1)
        vec = sum(s[..., i : i + 1] * layer.vectors[i, 4 * h : 4 * (h + 1)] for i in range(5))
        expected[..., 4 * h : 4 * (h + 1)] = part * vec
    torch.testing.assert_close(layer(x), expected)


def test_mov_input_position_rescales_the_linear_input():
    base = nn.Linear(8, 3)
    layer = MoVLayer(base, "down", AdapterContext(), position="input", num_experts=3, router_input="activation",
                     router_features=8)
    _randomize(layer)
    x = torch.randn(4, 8)
    s = torch.softmax(x @ layer.router.weight.t(), -1)
    torch.testing.assert_close(layer(x), base(x * (s @ layer.vectors)))


@pytest.mark.parametrize("position", ["input", "output"])
def test_single_adapters_merge_into_the_weight(position):
    base = nn.Linear(6, 5)
    ia3 = MoVLayer(base, "x", AdapterContext(), position=position, num_experts=1, router_input=None)
    lora = MoLoRALayer(nn.Linear(6, 5), "y", AdapterContext(), num_experts=1, rank=2, alpha=4.0, router_input=None)
    _randomize(ia3)
    _randomize(lora)
    x = torch.randn(3, 6)
    torch.testing.assert_close(ia3.merged_linear()(x), ia3(x))
    torch.testing.assert_close(lora.merged_linear()(x), lora(x))


def test_prefix_mean_is_causal_and_skips_padding():
    emb = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    means, total, count = prefix_mean(emb, mask)
    torch.testing.assert_close(means[0, 3], emb[0, :4].mean(0))
    torch.testing.assert_close(means[1, 4], emb[1, 2:].mean(0))
    assert torch.equal(means[1, :2], torch.zeros(2, 3))
    # carrying the running sum gives the same means as one pass
    first, t, c = prefix_mean(emb[:, :3], mask[:, :3])
    second, _, _ = prefix_mean(emb[:, 3:], mask[:, 3:], t, c)
    torch.testing.assert_close(torch.cat([first, second], 1), means)


def test_mov_top_k_gives_the_unkept_weight_to_the_identity_vector():
    """Top-k weights are not renormalised; MoV's scale is sum_{top-k} s_i l_i + (1 - sum_{top-k} s_i)."""
    torch.manual_seed(0)
    base = nn.Linear(6, 8)
    layer = MoVLayer(base, "v", AdapterContext(), position="output", num_experts=4, router_input="activation",
                     router_features=8, top_k=2)
    _randomize(layer)
    y = base(torch.randn(5, 6))
    probs = layer.router(y)
    kept = probs.sum(-1, keepdim=True)
    assert bool((kept < 1 - 1e-3).all())  # the kept weights sum to less than one
    want = probs @ layer.vectors.float() + (1 - kept)
    torch.testing.assert_close(layer.scale(y), want)


def test_a_head_dim_that_does_not_divide_the_key_width_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    from moeforge.errors import MoeforgeError
    from moeforge.peft import MoVConfig, wrap

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(MoeforgeError, match="head_dim=5 does not divide"):
        wrap(model, MoVConfig(num_experts=2, head_dim=5))
    # the refusal leaves the model as it was: it used to come back with every parameter frozen
    assert all(p.requires_grad for p in model.parameters())
    assert wrap(model, MoVConfig(num_experts=2)).parameter_summary().trainable > 0
