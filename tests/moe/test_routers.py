"""Routers and their losses against hand-computed values."""

import math

import pytest
import torch

from moeforge.errors import MoeforgeError
from moeforge.moe import MoEConfig, MoELayer, update_router_biases
from moeforge.moe.losses import cv_squared, load_balancing_loss, noisy_topk_load, router_z_loss


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    index = probs.argmax(-1, keepdim=True)  # experts 0, 0, 1, 0
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert load_balancing_loss(probs, index, 2).item() == pytest.approx(1.15, abs=1e-6)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_cv_squared_hand_computed():
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(0.25, rel=1e-6)
    assert cv_squared(torch.tensor([5.0])).item() == 0.0


def test_noisy_load_estimate_hand_computed():
    clean = torch.tensor([[1.0, 0.0, -1.0]])
    noisy = torch.tensor([[1.2, -0.1, -0.5]])
    std = torch.ones(1, 3)
    top = noisy.topk(2, dim=-1).values
    load = noisy_topk_load(clean, noisy, std, top, k=1)
    # expert 0 is kept: threshold is the 2nd largest (-0.1); experts 1, 2 are out: threshold 1.2
    expected = [phi(1.0 + 0.1), phi(0.0 - 1.2), phi(-1.0 - 1.2)]
    assert load.tolist() == pytest.approx(expected, abs=1e-6)


def layer_with_router_weight(weight, **kw):
    e, h = weight.shape
    layer = MoELayer(MoEConfig(hidden_size=h, expert_size=4, num_experts=e, **kw))
    with torch.no_grad():
        layer.router.weight.copy_(weight)
    return layer


def test_topk_balance_loss_in_training_only():
    layer = layer_with_router_weight(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), top_k=1, aux_loss_coef=0.1)
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [1.0, 1.0]])
    out = layer.train()(x)
    probs = torch.softmax(x @ layer.router.weight.T, -1)
    idx = probs.argmax(-1)
    f = torch.bincount(idx, minlength=3).float() / 4
    expected = 0.1 * 3 * (f * probs.mean(0)).sum()
    assert out.aux_losses["balance_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert layer.eval()(x).aux_losses == {}


def test_switch_capacity_drops_overflow_by_position():
    # 8 tokens, 2 experts, capacity factor 1 -> capacity 4; the first 6 tokens prefer expert 0
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    layer = layer_with_router_weight(weight, top_k=1, router="switch", capacity_factor=1.0, jitter_eps=0.0).train()
    x = torch.tensor([[2.0, 0.0]] * 6 + [[0.0, 2.0]] * 2)
    out = layer(x)
    dropped = out.routing.dropped.tolist()
    assert dropped == [False] * 4 + [True] * 2 + [False] * 2
    assert out.hidden_states[4:6].abs().sum() == 0
    assert out.hidden_states[:4].abs().sum() > 0
    assert layer.router.capacity(8) == 4
    # eval mode routes every token (a decoder's output must not depend on the batch or KV cache) ...
    layer.eval()
    assert layer.router.capacity(8) is None and not layer(x).routing.dropped.any()
    # ... unless an eval capacity factor is set
    capped = layer_with_router_weight(weight, top_k=1, router="switch", capacity_factor=1.0, jitter_eps=0.0,
                                      eval_capacity_factor=1.0).eval()
    assert capped(x).routing.dropped.tolist() == dropped


def test_switch_eval_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, expert_size=4, num_experts=4, top_k=1, router="switch",
                               capacity_factor=0.5)).eval()
    x = torch.randn(2, 6, 8)
    alone = layer(x[:1]).hidden_states
    together = layer(torch.cat([x[:1], x[1:] * 5])).hidden_states[:1]
    per_token = torch.cat([layer(x[:1, t : t + 1]).hidden_states for t in range(6)], dim=1)
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(per_token, alone, rtol=1e-6, atol=1e-7)


def test_switch_drops_lowest_probability_with_batch_priority():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    layer = layer_with_router_weight(
        weight, top_k=1, router="switch", capacity_factor=1.0, jitter_eps=0.0, drop_policy="probability",
        allow_future_tokens=True,
    ).train()
    strengths = [3.0, 1.0, 4.0, 0.5, 2.0, 5.0]  # expert-0 tokens; the two weakest (0.5 and 1.0) drop
    x = torch.tensor([[s, 0.0] for s in strengths] + [[0.0, 2.0]] * 2)
    dropped = layer(x).routing.dropped.tolist()
    assert dropped == [False, True, False, True, False, False, False, False]


def test_switch_loss_and_weight_hand_computed():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    layer = layer_with_router_weight(weight, top_k=1, router="switch", capacity_factor=2.0, jitter_eps=0.0).train()
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    out = layer(x)
    p = torch.softmax(x, -1)  # logits equal x
    f = torch.tensor([2 / 3, 1 / 3])
    expected = 1e-2 * 2 * (f * p.mean(0)).sum()
    assert out.aux_losses["balance_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.routing.weight.tolist() == pytest.approx(p.max(-1).values.tolist())


def test_switch_init_is_truncated_normal_scale_point_one():
    layer = MoELayer(MoEConfig(hidden_size=400, expert_size=4, num_experts=50, top_k=1, router="switch"))
    w = layer.router.weight
    std = math.sqrt(0.1 / 400)  # the std after truncation (TF VarianceScaling, scale 0.1, fan-in H)
    sigma = std / 0.87962566103423978  # of the normal before truncation at 2 sigma
    assert w.abs().max() <= 2 * sigma + 1e-7 and w.abs().max() > 1.9 * sigma
    assert abs(float(w.std()) - std) < 0.03 * std  # 20,000 draws


def test_expert_choice_capacity_and_weights():
    layer = MoELayer(
        MoEConfig(hidden_size=8, expert_size=4, num_experts=4, router="expert_choice", allow_future_tokens=True)
    ).eval()
    x = torch.randn(2, 8, 8)
    r = layer(x).routing
    # capacity = S * c / E = 8 * 2 / 4 = 4 tokens per expert per sequence
    counts = torch.bincount(r.expert_index * 2 + r.token_index // 8, minlength=8)
    assert counts.tolist() == [4] * 8
    torch.testing.assert_close(r.weight, r.probs[r.token_index, r.expert_index])
    for e in range(4):
        for b in range(2):
            picked = r.token_index[(r.expert_index == e) & (r.token_index // 8 == b)]
            scores = r.probs[b * 8 : (b + 1) * 8, e]
            assert set(picked.tolist()) == {b * 8 + i for i in scores.topk(4).indices.tolist()}


def test_expert_choice_causal_variant_ignores_future_tokens():
    cfg = dict(hidden_size=8, expert_size=4, num_experts=4, router="expert_choice")
    causal = MoELayer(MoEConfig(**cfg, expert_choice_causal=True)).eval()
    leaky = MoELayer(MoEConfig(**cfg, allow_future_tokens=True)).eval()
    leaky.load_state_dict(causal.state_dict())
    x = torch.randn(3, 10, 8)
    y = x.clone()
    y[:, 6:] = torch.randn(3, 4, 8) * 5
    torch.testing.assert_close(causal(x).hidden_states[:, :6], causal(y).hidden_states[:, :6])
    assert not torch.allclose(leaky(x).hidden_states[:, :6], leaky(y).hidden_states[:, :6])
    # capacity per position: ceil(B * c / E) = ceil(3 * 2 / 4) = 2 of the 3 batch rows
    r = causal(x).routing
    assert r.expert_index.numel() == 10 * 4 * 2


def test_noisy_topk_eval_weights_are_softmax_over_kept_logits():
    layer = MoELayer(MoEConfig(hidden_size=6, expert_size=4, num_experts=5, top_k=2, router="noisy_topk")).eval()
    x = torch.randn(7, 6)
    r = layer(x).routing
    logits = x @ layer.router.weight.T
    top = logits.topk(2, dim=-1)
    idx, w = r.topk_view()
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, torch.softmax(top.values, -1))


def test_noisy_topk_training_loss_is_cv_of_importance_and_load():
    torch.manual_seed(1)
    layer = MoELayer(MoEConfig(hidden_size=6, expert_size=4, num_experts=4, top_k=2, router="noisy_topk")).train()
    out = layer(torch.randn(32, 6))
    loss = out.aux_losses["balance_loss"]
    assert loss.item() > 0 and loss.requires_grad
    loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_noisy_topk_router_mlp_gate():
    layer = MoELayer(MoEConfig(hidden_size=6, expert_size=4, num_experts=4, top_k=2, router="noisy_topk", router_mlp=True)).eval()
    x = torch.randn(5, 6)
    expected = torch.tanh(x @ layer.router.weight.T) @ layer.router.mlp_out.T
    torch.testing.assert_close(layer(x).routing.logits, expected)


def test_sigmoid_bias_selects_with_bias_weights_without():
    layer = MoELayer(MoEConfig(hidden_size=4, expert_size=4, num_experts=4, top_k=1, router="sigmoid_bias"))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    r = layer.eval()(x).routing
    assert r.expert_index.tolist() == [3]  # chosen through the bias
    assert r.weight.tolist() == [1.0]  # renormalised sigmoid(0)=0.5 over one expert


def test_sigmoid_bias_update_moves_toward_balance():
    layer = MoELayer(MoEConfig(hidden_size=4, expert_size=4, num_experts=4, top_k=1, router="sigmoid_bias", bias_update_rate=0.01))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    x = torch.tensor([[3.0, 0.0, 0.0, 0.0]] * 6 + [[0.0, 3.0, 0.0, 0.0]] * 2)
    layer.train()(x)  # loads: 6, 2, 0, 0 (mean 2)
    assert update_router_biases(layer) == 1
    assert layer.router.bias.tolist() == pytest.approx([-0.01, 0.0, 0.01, 0.01])


@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(top_k=5), "top_k=5 is greater than num_experts=4"),
        (dict(router="topkk"), "Did you mean 'topk'"),
        (dict(router="switch", top_k=1, capacity_factor=0.0), "capacity_factor must be > 0"),
        (dict(router="switch", top_k=1, drop_policy="probability"), "depends on later tokens.*allow_future_tokens"),
        (dict(router="switch", top_k=1, eval_capacity_factor=0.0), "eval_capacity_factor must be > 0"),
        (dict(router="switch", top_k=2), "set top_k=1"),
        (dict(router="expert_choice"), "expert_choice_causal=True"),
        (dict(activation="tanhh"), "unknown activation"),
        (dict(num_experts=0), "num_experts must be a positive integer"),
    ],
)
def test_bad_configs_fail_at_construction(kw, fragment):
    base = dict(hidden_size=8, expert_size=4, num_experts=4, top_k=2)
    base.update(kw)
    with pytest.raises(MoeforgeError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(**base)


@pytest.mark.parametrize("name", ["topk", "noisy_topk", "switch", "expert_choice", "sigmoid_bias"])
def test_router_computes_in_float32_under_bf16_autocast(name):
    """Selective precision (Switch Transformer sec. 2.4): bf16 autocast must not reach the router."""
    kw = dict(hidden_size=16, expert_size=8, num_experts=4, top_k=1 if name == "switch" else 2, router=name)
    if name == "expert_choice":
        kw["allow_future_tokens"] = True
    router = MoELayer(MoEConfig(**kw)).router.eval()
    x = torch.randn(40, 16)
    reference = router(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = router(x)
    assert routed.logits.dtype == torch.float32 and routed.weight.dtype == torch.float32
    torch.testing.assert_close(routed.logits, reference, atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True], ids=["sequence", "causal"])
def test_expert_choice_output_does_not_depend_on_padding(causal):
    """Each group's capacity counts its real tokens (Zhou et al.: k = n * c / e over the tokens
    routed), so padding a batch changes neither the choices nor the outputs of its real tokens."""
    kw = {"expert_choice_causal": True} if causal else {"allow_future_tokens": True}
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=16, expert_size=8, num_experts=4, router="expert_choice",
                               capacity_factor=1.0, **kw)).eval()
    x = torch.randn(2, 4, 16)
    ref = layer(x)
    if causal:  # extra all-padding rows in the batch
        padded, mask = torch.cat([x, torch.zeros(3, 4, 16)]), torch.zeros(5, 4, dtype=torch.bool)
        mask[:2] = True
        out = layer(padded, token_mask=mask)
        real = out.hidden_states[:2]
    else:  # right padding of every sequence
        padded, mask = torch.cat([x, torch.zeros(2, 5, 16)], dim=1), torch.zeros(2, 9, dtype=torch.bool)
        mask[:, :4] = True
        out = layer(padded, token_mask=mask)
        real = out.hidden_states[:, :4]
    assert out.routing.token_index.numel() == ref.routing.token_index.numel()
    torch.testing.assert_close(real, ref.hidden_states, atol=1e-6, rtol=1e-5)
    assert bool(out.hidden_states[~mask].eq(0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sigmoid_bias_state_stays_float32_when_the_model_is_cast(dtype):
    layer = MoELayer(MoEConfig(hidden_size=8, expert_size=4, num_experts=4, top_k=2, router="sigmoid_bias"))
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.6, -0.6, 0.25, 0.0]))
    layer = layer.to(dtype).train()
    assert layer.router.bias.dtype == layer.router.pending_load.dtype == torch.float32
    assert layer.router.bias.tolist() == pytest.approx([0.6, -0.6, 0.25, 0.0])  # not rounded through dtype
    for _ in range(20):  # 81,920 token-slots per expert on average: fp16 counts would overflow
        layer(torch.randn(8192, 8, dtype=dtype))
    assert torch.isfinite(layer.router.pending_load).all() and layer.router.pending_load.sum() == 20 * 8192 * 2
    before = layer.router.bias.clone()
    update_router_biases(layer)
    assert (layer.router.bias - before).abs().tolist() == pytest.approx([1e-3] * 4, rel=1e-4)  # each moved by gamma


@pytest.mark.parametrize(
    "kw",
    [
        dict(router="switch", top_k=1, capacity_factor=math.inf),
        dict(router="expert_choice", allow_future_tokens=True, capacity_factor=math.inf),
        dict(router="switch", top_k=1, eval_capacity_factor=math.inf),
        dict(output_scale=math.nan),
        dict(output_scale=-math.inf),
        dict(aux_loss_coef=math.inf),
        dict(z_loss_coef=math.inf),
        dict(router_init_std=math.inf),
        dict(router="noisy_topk", noise_floor=math.inf),
        dict(router="sigmoid_bias", bias_update_rate=math.inf),
    ],
)
def test_non_finite_numbers_are_refused_at_construction(kw):
    """inf passes the range checks (capacity_factor=inf crashed at the first forward with an
    OverflowError; output_scale=nan made every output NaN): refused, naming the field."""
    name = next(k for k, v in kw.items() if isinstance(v, float))
    base = dict(hidden_size=8, expert_size=4, num_experts=4, top_k=2)
    base.update(kw)
    with pytest.raises(MoeforgeError, match=rf"MoEConfig\.{name} must be a finite number, got (nan|inf|-inf)"):
        MoEConfig(**base)


def test_capacity_is_the_ceil_of_the_exact_product():
    """ceil(T / E * c) of the decimal factor: 100 / 2 * 1.1 evaluates to 55.00000000000001 in floating
    point, and a plain ceil gave 56 slots (one token too many kept per expert)."""
    switch = layer_with_router_weight(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), top_k=1, router="switch",
                                      capacity_factor=1.1, jitter_eps=0.0).train()
    assert switch.router.capacity(100) == 55 and switch.router.capacity(10) == 6  # 5.5 still rounds up
    dropped = switch(torch.tensor([[2.0, 0.0]] * 100)).routing.dropped  # every token prefers expert 0
    assert int((~dropped).sum()) == 55
    # expert choice: ceil(S * c / E) = 50 * 1.1 / 5 = 11 tokens per expert, with and without a token mask
    for kw in ({}, {"token_mask": torch.ones(1, 50, dtype=torch.bool)}):
        layer = MoELayer(MoEConfig(hidden_size=8, expert_size=4, num_experts=5, router="expert_choice",
                                   allow_future_tokens=True, capacity_factor=1.1)).eval()
        routing = layer(torch.randn(1, 50, 8), **kw).routing
        assert routing.expert_load().tolist() == [11] * 5
