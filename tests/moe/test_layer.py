"""MoELayer against references: transformers' Mixtral block, dense MLPs, degenerate cases."""

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from moeforge.errors import MoeforgeError
from moeforge.moe import MoEConfig, MoELayer


def make_layer(**kw) -> MoELayer:
    base = dict(hidden_size=16, expert_size=8, num_experts=4, top_k=2)
    base.update(kw)
    return MoELayer(MoEConfig(**base))


def dense_swiglu(x, w_gate, w_up, w_down):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def test_matches_transformers_mixtral_block():
    cfg = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    ref = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.2)
    layer = MoELayer(MoEConfig(hidden_size=32, expert_size=16, num_experts=8, top_k=2)).eval()
    with torch.no_grad():
        layer.router.weight.copy_(ref.gate.weight)
        layer.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
        layer.experts.down_proj.copy_(ref.experts.down_proj)
    x = torch.randn(3, 11, 32)
    torch.testing.assert_close(layer(x).hidden_states, ref(x.clone()), atol=1e-5, rtol=1e-5)


def test_input_jitter_matches_transformers_mixtral_block_in_training():
    """Mixtral's router_jitter_noise: in training the whole block input (router and experts) is
    scaled by U(1 - eps, 1 + eps); the same random draws give the same output."""
    cfg = MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                        router_jitter_noise=0.2)
    ref = MixtralSparseMoeBlock(cfg).train()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(std=0.2)
    layer = MoELayer(MoEConfig(hidden_size=32, expert_size=16, num_experts=8, top_k=2, input_jitter=0.2)).train()
    with torch.no_grad():
        layer.router.weight.copy_(ref.gate.weight)
        layer.experts.gate_up_proj.copy_(ref.experts.gate_up_proj)
        layer.experts.down_proj.copy_(ref.experts.down_proj)
    x = torch.randn(3, 11, 32)
    torch.manual_seed(5)
    ours = layer(x).hidden_states
    torch.manual_seed(5)
    torch.testing.assert_close(ours, ref(x.clone()), atol=1e-5, rtol=1e-5)
    layer.eval()  # inference: no jitter
    torch.testing.assert_close(layer(x).hidden_states, layer(x).hidden_states)
    assert not torch.allclose(ours, layer(x).hidden_states)
    with pytest.raises(MoeforgeError, match="input_jitter must be in"):
        MoEConfig(hidden_size=32, expert_size=16, num_experts=8, input_jitter=1.5)


def test_one_expert_top1_equals_dense_mlp():
    layer = make_layer(num_experts=1, top_k=1).eval()
    gu, down = layer.experts.gate_up_proj[0], layer.experts.down_proj[0]
    x = torch.randn(2, 5, 16)
    expected = dense_swiglu(x, gu[:8], gu[8:], down)
    torch.testing.assert_close(layer(x).hidden_states, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("router", ["topk", "sigmoid_bias"])
def test_identical_experts_renormalised_equal_dense(router):
    layer = make_layer(num_experts=6, top_k=3, router=router).eval()
    with torch.no_grad():
        layer.experts.gate_up_proj.copy_(layer.experts.gate_up_proj[:1].expand_as(layer.experts.gate_up_proj))
        layer.experts.down_proj.copy_(layer.experts.down_proj[:1].expand_as(layer.experts.down_proj))
    gu, down = layer.experts.gate_up_proj[0], layer.experts.down_proj[0]
    x = torch.randn(4, 7, 16)
    torch.testing.assert_close(layer(x).hidden_states, dense_swiglu(x, gu[:8], gu[8:], down), atol=1e-6, rtol=1e-5)


def test_all_experts_selected_is_weighted_sum_of_every_expert():
    layer = make_layer(num_experts=4, top_k=4, normalize_weights=False).eval()
    x = torch.randn(9, 16)
    probs = F.softmax(F.linear(x, layer.router.weight), dim=-1)
    gu, down = layer.experts.gate_up_proj, layer.experts.down_proj
    expected = sum(probs[:, e : e + 1] * dense_swiglu(x, gu[e, :8], gu[e, 8:], down[e]) for e in range(4))
    torch.testing.assert_close(layer(x).hidden_states, expected, atol=1e-6, rtol=1e-5)


def test_plain_mlp_experts_and_shared_expert():
    layer = make_layer(num_experts=1, top_k=1, glu=False, activation="gelu", num_shared_experts=2, shared_expert_size=4).eval()
    x = torch.randn(6, 16)
    up, down = layer.experts.up_proj[0], layer.experts.down_proj[0]
    sh = layer.shared_experts
    expected = F.linear(F.gelu(F.linear(x, up)), down) + sh.down_proj(F.gelu(sh.up_proj(x)))
    torch.testing.assert_close(layer(x).hidden_states, expected, atol=1e-6, rtol=1e-5)
    assert sh.up_proj.weight.shape == (8, 16)


def test_output_scale_multiplies_routed_part_only():
    layer = make_layer(num_shared_experts=1).eval()
    x = torch.randn(5, 16)
    base = layer(x).hidden_states
    shared = layer.shared_experts(x)
    layer.config.output_scale = 2.5
    torch.testing.assert_close(layer(x).hidden_states, 2.5 * (base - shared) + shared, atol=1e-6, rtol=1e-5)


def test_router_runs_in_float32_under_bfloat16():
    layer = make_layer().to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.hidden_states.dtype == torch.bfloat16
    assert out.routing.logits.dtype == torch.float32 and out.routing.weight.dtype == torch.float32
    out.hidden_states.float().sum().backward()
    assert layer.router.weight.grad is not None


@pytest.mark.parametrize(
    "kw",
    [
        dict(router="topk"),
        dict(router="noisy_topk"),
        dict(router="switch", top_k=1),
        dict(router="sigmoid_bias"),
        dict(router="expert_choice", expert_choice_causal=True),
        dict(router="expert_choice", allow_future_tokens=True),
    ],
)
def test_gradients_reach_router_and_experts(kw):
    layer = make_layer(**kw).train()
    out = layer(torch.randn(3, 8, 16))
    (out.hidden_states.square().sum() + out.aux_loss).backward()
    assert layer.experts.gate_up_proj.grad.abs().sum() > 0
    assert layer.experts.down_proj.grad.abs().sum() > 0
    assert layer.router.weight.grad.abs().sum() > 0


def test_gradcheck_float64_tiny_layer():
    layer = MoELayer(MoEConfig(hidden_size=4, expert_size=3, num_experts=3, top_k=2)).double().eval()
    names = ["router.weight", "experts.gate_up_proj", "experts.down_proj"]
    params = dict(layer.named_parameters())

    def f(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,)).hidden_states

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    inputs = (x, *[params[n].detach().clone().requires_grad_() for n in names])
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_dropless_execution_builds_no_per_expert_token_mask(monkeypatch):
    """The experts run once per projection on contiguous slices: count grouped-linear calls."""
    from moeforge.moe import experts as experts_mod

    calls = []
    real = experts_mod.grouped_linear

    def spy(x, w, offsets, counts=None):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, offsets, counts)

    monkeypatch.setattr(experts_mod, "grouped_linear", spy)
    layer = make_layer(num_experts=8, top_k=2)
    layer.experts.execution = "grouped"
    layer(torch.randn(50, 16))
    assert calls == [((100, 16), (8, 16, 16)), ((100, 8), (8, 16, 8))]


@pytest.mark.parametrize(("glu", "activation"), [(True, "silu"), (False, "silu"), (True, "gelu")])
@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice"])
@pytest.mark.parametrize("phased", [True, False])
def test_fused_cpu_path_equals_grouped_autograd_path(glu, activation, router, phased, monkeypatch):
    # SwiGLU has a hand-written backward in the fused path; other activations go through autograd.
    # The fused forward activates per expert (large experts) or the whole block at once (small ones).
    from moeforge.moe import fused as fused_module

    monkeypatch.setattr(fused_module, "_PHASED_BELOW", 1 << 30 if phased else 0)
    kw = dict(num_experts=8, top_k=1 if router == "switch" else 2, glu=glu, activation=activation, router=router,
              expert_size=8)
    if router == "expert_choice":
        kw["allow_future_tokens"] = True
    if router == "switch":
        kw["capacity_factor"] = 0.5  # some tokens are dropped
    fused, grouped = make_layer(**kw).train(), make_layer(**kw).train()
    grouped.load_state_dict(fused.state_dict())
    fused.experts.execution, grouped.experts.execution = "fused", "grouped"
    x = torch.randn(3, 10, 16)
    g = torch.randn(3, 10, 16)
    outs = []
    for layer in (fused, grouped):
        torch.manual_seed(5)
        inp = x.clone().requires_grad_()
        y = layer(inp).hidden_states
        y.backward(g)
        outs.append((y, inp.grad, {n: p.grad for n, p in layer.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-5)
    for name, grad in outs[0][2].items():
        torch.testing.assert_close(grad, outs[1][2][name], atol=1e-5, rtol=1e-5, msg=name)


def test_fused_path_skips_gradients_of_frozen_experts():
    layer = make_layer().train()
    layer.experts.requires_grad_(False)
    y = layer(torch.randn(20, 16)).hidden_states
    y.sum().backward()
    assert layer.experts.gate_up_proj.grad is None and layer.router.weight.grad is not None


@pytest.mark.parametrize("execution", ["fused", "grouped"])
def test_bfloat16_forward_and_backward_track_float32(execution):
    """Both CPU execution paths in bfloat16 stay within bf16 rounding of the float32 layer, grads included."""
    torch.manual_seed(0)
    ref = make_layer(num_experts=8, top_k=2, hidden_size=64, expert_size=32).train()
    low = make_layer(num_experts=8, top_k=2, hidden_size=64, expert_size=32).train()
    low.load_state_dict(ref.state_dict())
    low = low.to(torch.bfloat16)
    low.experts.execution = execution
    x = torch.randn(4, 16, 64)
    g = torch.randn(4, 16, 64)
    results = []
    for layer, dtype in ((ref, torch.float32), (low, torch.bfloat16)):
        inp = x.detach().to(dtype).clone().requires_grad_()
        out = layer(inp)
        assert out.hidden_states.dtype == dtype and out.routing.weight.dtype == torch.float32
        out.hidden_states.backward(g.to(dtype))
        results.append((out.hidden_states.float(), inp.grad.float(), layer.experts.down_proj.grad.float(),
                        layer.router.weight.grad.float()))
    # the same experts must be chosen for the comparison to be meaningful
    with torch.no_grad():
        same = torch.equal(ref(x).routing.expert_index, low(x.to(torch.bfloat16)).routing.expert_index)
    assert same
    for a, b in zip(results[0], results[1]):
        scale = a.abs().max()
        assert (a - b).abs().max() <= 0.05 * scale, float((a - b).abs().max() / scale)


def test_fused_inference_with_lower_precision_expert_weights():
    # float16 experts on float32 inputs: upcast one expert at a time, same result as float32 weights
    layer = make_layer(num_experts=4, top_k=2).eval()
    x = torch.randn(20, 16)
    layer.experts.gate_up_proj.data = layer.experts.gate_up_proj.data.half()
    layer.experts.down_proj.data = layer.experts.down_proj.data.half()
    assert layer.experts.upcasts_weights_per_expert
    with torch.no_grad():
        got = layer(x).hidden_states
        layer.experts.float()
        want = layer(x).hidden_states
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    layer.experts.half().train()
    assert not layer.experts.upcasts_weights_per_expert
    with pytest.raises(RuntimeError, match="inference only"):
        layer(x.requires_grad_()).hidden_states.sum().backward()


def test_unknown_execution_is_refused():
    layer = make_layer()
    layer.experts.execution = "grouped"
    with pytest.raises(MoeforgeError, match="unknown expert execution 'bogus'; choose one of auto, fused, grouped"):
        layer.experts.execution = "bogus"
    assert layer.experts.execution == "grouped"


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(glu="no"), "glu must be true or false, got 'no'"),
        (dict(normalize_weights="false"), "normalize_weights must be true or false"),
        (dict(output_scale="2"), "output_scale must be a number, got '2'"),
        (dict(num_shared_experts=1.5), "num_shared_experts must be an integer, got 1.5"),
        (dict(num_experts=True), "num_experts must be an integer, got True"),
        (dict(router_init_std=-1.0), "router_init_std must be >= 0"),
        (dict(bias_update_rate=-1.0), "bias_update_rate must be >= 0"),
        (dict(shared_expert_gate=True), "shared_expert_gate needs shared experts"),
    ],
)
def test_config_values_of_the_wrong_type_or_sign_are_refused(kw, message):
    with pytest.raises(MoeforgeError, match=message):
        make_layer(**kw)


def test_layer_takes_a_dict_and_checks_the_input_width():
    layer = MoELayer(dict(hidden_size=16, expert_size=8, num_experts=4, top_k=2))
    assert layer(torch.randn(3, 16)).hidden_states.shape == (3, 16)
    with pytest.raises(MoeforgeError, match=r"expects inputs of shape \(\.\.\., 16\) \(hidden_size\), got \(3, 15\)"):
        layer(torch.randn(3, 15))
    with pytest.raises(MoeforgeError, match="unknown MoE setting 'topk'"):
        MoELayer(dict(hidden_size=16, expert_size=8, num_experts=4, topk=2))


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch", "sigmoid_bias"])
def test_padding_is_not_routed(router):
    # padded tokens get no routed output and no share of capacity, aux losses or loads:
    # the layer on a padded batch equals the layer on the real tokens alone
    torch.manual_seed(0)
    kw = {"capacity_factor": 1.0} if router == "switch" else {}
    layer = make_layer(router=router, num_experts=4, top_k=1 if router == "switch" else 2, z_loss_coef=1e-3, **kw).train()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    torch.manual_seed(1)
    padded = layer(x, token_mask=mask)
    torch.manual_seed(1)
    alone = layer(x[mask])
    torch.testing.assert_close(padded.hidden_states[mask], alone.hidden_states)
    assert torch.equal(padded.hidden_states[~mask], torch.zeros(2, 16))
    assert padded.aux_losses.keys() == alone.aux_losses.keys() and padded.aux_losses
    for name in padded.aux_losses:
        torch.testing.assert_close(padded.aux_losses[name], alone.aux_losses[name])
    assert torch.equal(padded.routing.expert_load(), alone.routing.expert_load())
    if router != "switch":  # (switch drops overflow at capacity factor 1)
        assert padded.routing.expert_load().sum() == mask.sum() * layer.config.top_k


def test_topk_balance_loss_with_padding_equals_transformers_with_an_attention_mask():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    layer = make_layer(num_experts=4, top_k=2, aux_loss_coef=1.0).train()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    ours = layer(x, token_mask=mask.bool()).aux_losses["balance_loss"]
    logits = layer.router.logits(x.reshape(-1, 16))
    theirs = load_balancing_loss_func((logits,), num_experts=4, top_k=2, attention_mask=mask)
    torch.testing.assert_close(ours, theirs)


def test_expert_choice_never_picks_padding():
    torch.manual_seed(0)
    layer = make_layer(router="expert_choice", expert_choice_causal=True, num_experts=4, capacity_factor=2.0).eval()
    x = torch.randn(3, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 2:] = False
    mask[2, 4] = False
    out = layer(x, token_mask=mask)
    picked = out.routing.token_index
    assert bool(mask.reshape(-1)[picked].all()) and picked.numel() > 0
    assert torch.equal(out.hidden_states[~mask], torch.zeros(int((~mask).sum()), 16))
    assert not bool(out.routing.dropped[~mask.reshape(-1)].any())  # padding is not counted as dropped


def test_inference_mode_then_grad_mode_calls_work():
    """The fused CPU path's per-thread workspace, first allocated (or grown) under inference_mode,
    stays writable by later calls outside it."""
    layer = make_layer()
    with torch.inference_mode():
        layer(torch.randn(2, 5, 16))
    with torch.no_grad():
        layer(torch.randn(2, 5, 16))
    with torch.inference_mode():  # grows the workspace
        layer(torch.randn(4, 50, 16))
    out = layer(torch.randn(4, 50, 16))
    out.hidden_states.sum().backward()
    assert layer.experts.down_proj.grad is not None


@pytest.mark.parametrize("execution", ["fused", "grouped"])
def test_lower_precision_input_than_weights(execution):
    layer = make_layer()
    layer.experts.execution = execution
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(MoeforgeError, match="input is bfloat16 but its expert weights are float32"):
        layer(x)
    if execution == "fused":  # CPU autocast: the experts compute in the weights' float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x).hidden_states
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert x.grad is not None and layer.experts.gate_up_proj.grad is not None


@pytest.mark.parametrize("execution", ["fused", "grouped"])
def test_input_and_weights_in_different_16_bit_formats_are_one_clear_error(execution):
    """float16 into bfloat16 experts (same width, so not 'lower precision') reached torch.mm as a
    dtype mismatch (grouped) or failed in backward saying the weights were lower precision (fused);
    a float32 input into bfloat16 experts on the grouped path, which has no inference upcast, the same."""
    layer = make_layer().to(torch.bfloat16)
    layer.experts.execution = execution
    with pytest.raises(MoeforgeError, match="input is float16 but its expert weights are bfloat16"):
        layer(torch.randn(2, 5, 16, dtype=torch.float16))
    x = torch.randn(2, 5, 16)
    if execution == "grouped":
        with pytest.raises(MoeforgeError, match="input is float32 but its expert weights are bfloat16"):
            layer(x)
    else:  # the fused path's inference upcast, one expert at a time
        assert layer.eval()(x).hidden_states.dtype == torch.float32


@pytest.mark.parametrize(
    "kw",
    [
        dict(router="topk", aux_loss_coef=0.1, z_loss_coef=0.1),
        dict(router="topk", normalize_weights=False, aux_loss_coef=0.1),
        dict(router="switch", top_k=1, jitter_eps=0.0, capacity_factor=1.0, aux_loss_coef=0.1, z_loss_coef=0.1),
        dict(router="sigmoid_bias", aux_loss_coef=0.1),
    ],
)
def test_gradcheck_float64_aux_losses_and_output_through_the_router(kw):
    """In float64 the router computes in float64 too (never below float32), so the balance and z-losses
    and the routed output pass a float64 gradcheck with respect to the router weight."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=4, expert_size=3, num_experts=3, **{"top_k": 2, **kw})).double().train()
    x = torch.randn(6, 4, dtype=torch.float64)

    def f(weight):
        out = torch.func.functional_call(layer, {"router.weight": weight}, (x,))
        assert out.routing.logits.dtype == torch.float64
        return out.hidden_states.sum() + out.aux_loss

    w = layer.router.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-7)
