"""MoeforgeForCausalLM against plain transformers models."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from moeforge.models import MoeforgeConfig, MoeforgeForCausalLM

TINY = dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_moe(**moe) -> MoeforgeForCausalLM:
    spec = {"num_experts": 4, "top_k": 2, "expert_size": 12}
    spec.update(moe)
    return MoeforgeForCausalLM(MoeforgeConfig(**TINY, moe=spec)).eval()


def _checkpointing(model, kwargs: dict | None) -> None:
    """Activation checkpointing on with ``kwargs``, or off for None (transformers 5's names, else the old ones)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if kwargs is None:
            model.activation_checkpointing_disable()
        else:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif kwargs is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def test_single_full_expert_model_equals_llama():
    llama = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    moe = MoeforgeForCausalLM(MoeforgeConfig(**TINY, moe={"num_experts": 1, "top_k": 1, "expert_size": 48})).eval()
    state = llama.state_dict()
    for i in range(2):
        p = f"model.layers.{i}.mlp."
        gate, up, down = (state.pop(p + n + ".weight") for n in ("gate_proj", "up_proj", "down_proj"))
        state[p + "experts.gate_up_proj"] = torch.cat([gate, up])[None]
        state[p + "experts.down_proj"] = down[None]
        state[p + "router.weight"] = torch.zeros(1, 32)
    moe.load_state_dict(state)
    ids = torch.randint(0, 120, (2, 9))
    torch.testing.assert_close(moe(ids).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)


def test_dense_layers_outside_moe_layers():
    model = MoeforgeForCausalLM(MoeforgeConfig(**TINY, moe={"num_experts": 4, "top_k": 1, "expert_size": 12}, moe_layers=[1]))
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"
    assert len(model.moe_layers()) == 1
    out = model(torch.randint(0, 120, (1, 5)), output_routing=True)
    assert out.routing[0] is None and out.routing[1].num_tokens == 5


def test_save_load_roundtrip_through_auto_class(tmp_path):
    model = tiny_moe(router="noisy_topk", num_shared_experts=1)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again, MoeforgeForCausalLM)
    ids = torch.randint(0, 120, (2, 7))
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_aux_loss_added_to_loss_in_training_only():
    model = tiny_moe(aux_loss_coef=0.5)
    ids = torch.randint(0, 120, (2, 8))
    model.train()
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    assert out.aux_losses["balance_loss"] > 0
    model.eval()
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_cached_generation_equals_uncached():
    model = tiny_moe()
    ids = torch.randint(0, 120, (1, 6))
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_hidden_states_are_recorded():
    out = tiny_moe()(torch.randint(0, 120, (1, 4)), output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[1].shape == (1, 4, 32)


def test_aux_losses_keep_their_gradient_under_reentrant_activation_checkpointing():
    """Reentrant checkpointing tracks gradients through a layer's top-level output tensors only."""

    torch.manual_seed(0)
    model = tiny_moe(router="switch", top_k=1, aux_loss_coef=1e-2, z_loss_coef=1e-2).train()
    ids = torch.randint(0, 120, (2, 8))
    grads = []
    for kwargs in (None, {"use_reentrant": True}, {"use_reentrant": False}):
        if kwargs is not None:
            _checkpointing(model, kwargs)
        model.zero_grad()
        torch.manual_seed(1)  # the same router jitter in every run
        out = model(ids, labels=ids)
        assert out.aux_loss.requires_grad and all(v.requires_grad for v in out.aux_losses.values())
        out.aux_losses["balance_loss"].backward()
        grads.append(model.model.layers[0].mlp.router.weight.grad.clone())
        _checkpointing(model, None)
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])
    assert grads[0].abs().sum() > 0


def test_moe_overrides_that_name_no_moe_layer_are_refused():
    """Overrides are looked up by the layer index as a string: an int key, an index past the last
    layer or a dense layer's index was silently never applied."""
    import pytest

    from moeforge.errors import MoeforgeError

    moe = {"num_experts": 4, "top_k": 2, "expert_size": 12}
    model = MoeforgeForCausalLM(MoeforgeConfig(**TINY, moe=moe, moe_overrides={"1": {"output_scale": 4.0}}))
    assert [layer.config.output_scale for layer in model.moe_layers()] == [1.0, 4.0]
    for overrides, layers, message in [
        ({1: {"output_scale": 4.0}}, None, r"key 1 names no MoE layer of this model \(write '1'\)"),
        ({"7": {"output_scale": 4.0}}, None, r"key '7' names no MoE layer.*here '0', '1'"),
        ({"1": {"output_scale": 4.0}}, [0], r"key '1' names no MoE layer.*here '0'\."),
    ]:
        with pytest.raises(MoeforgeError, match=message):
            MoeforgeConfig(**TINY, moe=moe, moe_layers=layers, moe_overrides=overrides)


def test_sigmoid_bias_update_is_the_same_under_activation_checkpointing():
    """The recomputed forward counts its tokens again (every expert's load doubles), which leaves
    the sign-based bias step unchanged."""
    from moeforge.moe.layer import update_router_biases

    torch.manual_seed(0)
    model = tiny_moe(router="sigmoid_bias", num_experts=8, top_k=2, bias_update_rate=0.1).train()
    ids = torch.randint(0, 120, (2, 16))
    biases, loads = [], []
    for kwargs in (None, {"use_reentrant": False}, {"use_reentrant": True}):
        for layer in model.model.layers:
            layer.mlp.router.bias.zero_()
        if kwargs is not None:
            _checkpointing(model, kwargs)
        model(ids, labels=ids).loss.backward()
        loads.append(model.model.layers[0].mlp.router.pending_load.clone())
        update_router_biases(model)
        biases.append(torch.stack([layer.mlp.router.bias.clone() for layer in model.model.layers]))
        _checkpointing(model, None)
    for load in loads[1:]:
        torch.testing.assert_close(load, 2 * loads[0])
    for b in biases[1:]:
        torch.testing.assert_close(b, biases[0])
    assert biases[0].abs().sum() > 0
