"""wrap() on tiny LLaMA and T5 models: identity at init, frozen base, degenerate equalities,
save/load, bad input, disable/remove/merge, generation, routing records."""

import copy

import pytest
import torch
from torch import nn

from moeforge.errors import MoeforgeError
from moeforge.peft import IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig, load_adapter, wrap

from .conftest import batch, frozen, make_model, randomize_adapters

CONFIGS = {
    "mov": lambda: MoVConfig(num_experts=4),
    "mov-top2": lambda: MoVConfig(num_experts=4, top_k=2),
    "mov-block": lambda: MoVConfig(num_experts=3, router_input="block"),
    "mov-sentence": lambda: MoVConfig(num_experts=3, router_input="sentence"),
    "ia3": lambda: IA3Config(),
    "molora": lambda: MoLoRAConfig(num_experts=3, rank=2),
    "molora-top1": lambda: MoLoRAConfig(num_experts=3, rank=2, top_k=1),
    "molora-sentence": lambda: MoLoRAConfig(num_experts=3, rank=2, router_input="sentence"),
    "lora": lambda: LoRAConfig(rank=2),
}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_identity_at_init(kind, name):
    inputs = batch(kind)
    reference = logits(frozen(make_model(kind)), inputs)
    adapted = wrap(make_model(kind), CONFIGS[name]())
    assert torch.equal(logits(adapted, inputs), reference)


@pytest.mark.parametrize(
    "kind, name",
    [("llama", n) for n in ("mov", "mov-block", "mov-sentence", "ia3", "molora", "lora")] + [("t5", "mov"), ("t5", "molora")],
)
def test_only_adapters_train_and_base_stays_bit_identical(kind, name):
    model = make_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = wrap(model, CONFIGS[name]())
    adapted.train()
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if ".base_layer." in n or not
               any(t in n for t in ("vectors", "lora_", "router.")))
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        opt.zero_grad()
        adapted(**batch(kind, seed=step)).loss.backward()
        graded = {n for n, p in adapted.named_parameters() if p.grad is not None}
        assert graded == {n for n, p in adapted.named_parameters() if p.requires_grad}
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(start, trainable))  # the adapters did move
    after = adapted.base_model.state_dict()
    for key, value in before.items():
        path = key.rsplit(".", 1)
        moved = f"{path[0]}.base_layer.{path[1]}"
        assert torch.equal(after[moved] if moved in after else after[key], value), key


def test_mov_one_expert_equals_ia3_and_mixture_of_equal_vectors_equals_ia3(kind):
    inputs = batch(kind)
    ia3 = wrap(make_model(kind), IA3Config())
    randomize_adapters(ia3)
    expected = logits(ia3, inputs)
    one = wrap(make_model(kind), MoVConfig(num_experts=1))
    many = wrap(make_model(kind), MoVConfig(num_experts=5))
    randomize_adapters(many, seed=9)  # random routers: the soft mixture weights differ per token, and sum to one
    with torch.no_grad():
        for name, layer in ia3.adapter_layers().items():
            one.adapter_layers()[name].vectors.copy_(layer.vectors)
            many.adapter_layers()[name].vectors.copy_(layer.vectors.expand(5, -1))
    torch.testing.assert_close(logits(one, inputs), expected)
    torch.testing.assert_close(logits(many, inputs), expected)


def test_molora_one_expert_equals_lora_and_mixture_of_equal_experts_equals_lora(kind):
    inputs = batch(kind)
    lora = wrap(make_model(kind), LoRAConfig(rank=2))
    randomize_adapters(lora)
    expected = logits(lora, inputs)
    one = wrap(make_model(kind), MoLoRAConfig(num_experts=1, rank=2))
    many = wrap(make_model(kind), MoLoRAConfig(num_experts=4, rank=2))
    randomize_adapters(many, seed=9)
    with torch.no_grad():
        for name, layer in lora.adapter_layers().items():
            for target in (one, many):
                t = target.adapter_layers()[name]
                t.lora_A.copy_(layer.lora_A.expand_as(t.lora_A))
                t.lora_B.copy_(layer.lora_B.expand_as(t.lora_B))
    torch.testing.assert_close(logits(one, inputs), expected)
    # the mixture sums four equal updates with weights that add to one up to rounding
    torch.testing.assert_close(logits(many, inputs), expected, rtol=1e-4, atol=1e-4)


def test_single_adapters_match_a_plain_transformers_model_with_merged_weights(kind):
    """Reference: the unmodified transformers class with the adapter folded into its weights by hand."""
    inputs = batch(kind)
    for config in (IA3Config(), LoRAConfig(rank=2, alpha=8)):
        adapted = wrap(make_model(kind), config)
        randomize_adapters(adapted)
        reference = frozen(make_model(kind))
        sd = reference.state_dict()
        with torch.no_grad():
            for name, layer in adapted.adapter_layers().items():
                w = sd[f"{name}.weight"]
                if isinstance(config, IA3Config):
                    v = layer.vectors[0]
                    w.mul_(v[None, :] if layer.position == "input" else v[:, None])
                else:  # W + (alpha/r) B A, with A (in, r) and B (r, out) stored transposed
                    w.add_((layer.lora_A[0] @ layer.lora_B[0]).t() * 4.0)
        # (W x) * l vs (W * l) x and W x + B A x vs (W + B A) x differ only by float rounding
        tol = {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(logits(adapted, inputs), logits(reference, inputs), **tol)
        merged = adapted.merge_and_unload()
        torch.testing.assert_close(logits(merged, inputs), logits(reference, inputs), **tol)
        assert not any("base_layer" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize(
    "kind, name",
    [("llama", n) for n in ("mov", "mov-block", "mov-sentence", "molora-top1", "ia3", "lora")] + [("t5", "mov"), ("t5", "molora")],
)
def test_save_then_load_on_a_fresh_base_reproduces_logits(kind, name, tmp_path):
    inputs = batch(kind)
    adapted = wrap(make_model(kind), CONFIGS[name]())
    randomize_adapters(adapted)
    expected = logits(adapted, inputs)
    adapted.save_adapter(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(adapted.adapter_state_dict())  # adapter and router weights only
    assert all(k.endswith(("vectors", "lora_A", "lora_B", "router.weight")) for k in keys)
    assert not torch.equal(expected, logits(frozen(make_model(kind)), inputs))
    loaded = load_adapter(make_model(kind), tmp_path / "adapter")
    assert type(loaded.peft_config) is type(adapted.peft_config)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    with pytest.raises(MoeforgeError, match="already holds an adapter"):
        adapted.save_adapter(tmp_path / "adapter")
    adapted.save_trained(tmp_path / "adapter")  # the trainer's hook replaces it


def test_load_adapter_refuses_another_base_model_naming_the_shapes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    adapted = wrap(make_model("llama"), MoLoRAConfig(num_experts=2, rank=2))
    adapted.save_adapter(tmp_path / "a")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(MoeforgeError) as err:
        load_adapter(other, tmp_path / "a")
    message = str(err.value)
    assert "saved for another base model" in message
    assert "model.layers.0.self_attn.q_proj: adapter made for Linear(32 -> 32), this model has Linear(48 -> 48)" in message
    assert not any("base_layer" in k for k in other.state_dict())  # left untouched
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(MoeforgeError, match="no such module"):
        load_adapter(make_model("t5"), tmp_path / "a")
    with pytest.raises(MoeforgeError, match="adapter_config.json is missing"):
        load_adapter(make_model("llama"), tmp_path)


def test_targets_that_match_nothing_list_the_modules_that_exist():
    with pytest.raises(MoeforgeError) as err:
        wrap(make_model("llama"), LoRAConfig(target_modules=["q_proj", "query"]))
    message = str(err.value)
    assert "'query' matches no module" in message
    for name in ("q_proj", "k_proj", "down_proj", "lm_head"):
        assert name in message
    with pytest.raises(MoeforgeError, match="nn.Linear modules only"):
        wrap(make_model("llama"), LoRAConfig(target_modules=["mlp"]))
    with pytest.raises(MoeforgeError, match="matches no module.*wi.*wo"):
        wrap(make_model("t5"), IA3Config(target_modules=r".*\.nothing"))
    model = make_model("llama")
    wrap(model, IA3Config())
    with pytest.raises(MoeforgeError, match="already carries an adapter"):
        wrap(model, IA3Config())


def test_disable_remove_and_parameter_count():
    inputs = batch("llama")
    model = make_model("llama")
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    base_logits = logits(frozen(copy.deepcopy(model)), inputs)
    adapted = wrap(model, MoVConfig(num_experts=4))
    randomize_adapters(adapted)
    assert not torch.equal(logits(adapted, inputs), base_logits)
    with adapted.adapters_disabled():
        assert torch.equal(logits(adapted, inputs), base_logits)
    assert not torch.equal(logits(adapted, inputs), base_logits)
    # hand count: per layer k, v: vectors 4x16 + router 4x8 (per head, head_dim 8); down_proj: 4x64 + 4x64
    summary = adapted.parameter_summary()
    assert summary.trainable == 2 * (2 * (4 * 16 + 4 * 8) + (4 * 64 + 4 * 64))
    assert summary.base == sum(p.numel() for p in make_model("llama").parameters())
    assert summary.percent == pytest.approx(100 * summary.trainable / summary.base)
    base = adapted.remove()
    assert base is model
    assert all(m is originals[n] for n, m in base.named_modules() if isinstance(m, nn.Linear))
    assert all(p.requires_grad for p in base.parameters())
    assert torch.equal(logits(base, inputs), base_logits)
    with pytest.raises(MoeforgeError, match="removed"):
        adapted(**inputs)
    with pytest.raises(MoeforgeError, match="cannot be merged"):
        wrap(make_model("llama"), MoLoRAConfig(num_experts=2)).merge_and_unload()


@pytest.mark.parametrize("name", ["mov", "molora", "mov-sentence", "molora-sentence"])
def test_cached_generation_matches_full_forward(name):
    """Greedy decoding with the KV cache picks the tokens a full (uncached) forward would, also with
    sentence routing, whose prefix mean is carried across cached steps."""
    adapted = wrap(make_model("llama"), CONFIGS[name]())
    randomize_adapters(adapted, scale=1.0)
    prompt = torch.tensor([[5, 17, 33, 2, 90, 41]])
    out = adapted.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                           pad_token_id=0)
    with torch.no_grad():
        full = adapted(out[:, :-1]).logits
    assert torch.equal(full[0, prompt.shape[1] - 1 :].argmax(-1), out[0, prompt.shape[1] :])


def test_sentence_routing_uses_the_mean_of_the_prefix():
    adapted = wrap(make_model("llama"), MoVConfig(num_experts=3, router_input="sentence"))
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    adapted(ids)
    emb = adapted.get_input_embeddings()(ids)
    torch.testing.assert_close(adapted.context.sentence[0, 2], emb[0, :3].mean(0))
    t5 = wrap(make_model("t5"), MoVConfig(num_experts=3, router_input="sentence"))
    out = t5.generate(ids, max_new_tokens=3)
    assert out.shape[0] == 1
    torch.testing.assert_close(t5.context.sentence[0, 0], t5.get_input_embeddings()(ids)[0].mean(0))


def test_routing_records_skip_padding_and_are_per_module():
    adapted = wrap(make_model("llama"), MoLoRAConfig(num_experts=3, rank=2, top_k=1))
    randomize_adapters(adapted, scale=1.0)
    ids = torch.tensor([[0, 0, 7, 9], [3, 4, 7, 9]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with adapted.record_routing() as rec:
        adapted(ids, attention_mask=mask)
    assert set(rec.usage) == set(adapted.adapter_layers())
    usage = rec.usage["model.layers.0.self_attn.q_proj"]
    assert usage.decisions == 6 and int(usage.top1.sum()) == 6
    assert 0 < float(usage.mean_probs.sum()) < 1  # top-1 weights are kept as they are, not renormalised to 1
    assert adapted.context.recorder is None  # nothing records outside the block
    adapted(ids)
    assert usage.decisions == 6


@pytest.mark.parametrize("name", ["mov-block", "mov-sentence", "molora"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    """Recomputed forwards (activation checkpointing) see the same block inputs and sentence embeddings."""
    inputs = batch("llama")
    grads = []
    for checkpointing in (False, True):
        adapted = wrap(make_model("llama"), CONFIGS[name]())
        randomize_adapters(adapted)
        adapted.train()
        if checkpointing:
            if hasattr(adapted, "activation_checkpointing_enable"):  # the transformers >= 5.2x name
                adapted.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                adapted.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        adapted(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapted.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], msg=key)


def test_paths_and_objects_in_the_wrong_place(tmp_path):
    base = make_model("llama")
    base.save_pretrained(tmp_path / "base")
    # a path where a model goes is opened with moeforge.load
    adapted = wrap(str(tmp_path / "base"), MoVConfig(num_experts=2))
    ids = batch("llama")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, base(input_ids=ids).logits)
    adapted.save_adapter(tmp_path / "adapter")
    again = load_adapter(str(tmp_path / "base"), tmp_path / "adapter")
    assert set(again.adapter_state_dict()) == set(adapted.adapter_state_dict())
    with pytest.raises(MoeforgeError, match="arguments are swapped"):
        load_adapter(str(tmp_path / "adapter"), make_model("llama"))
    with pytest.raises(MoeforgeError, match="wrap\\(\\) adapts a model .* got int"):
        wrap(3, MoVConfig(num_experts=2))
    with pytest.raises(MoeforgeError, match="MoVConfig.num_experts must be an integer, got '10'"):
        MoVConfig(num_experts="10")


def test_a_plain_name_string_selects_like_a_one_item_list():
    as_string = wrap(make_model("llama"), MoLoRAConfig(num_experts=2, rank=2, target_modules="q_proj"))
    as_list = wrap(make_model("llama"), MoLoRAConfig(num_experts=2, rank=2, target_modules=["q_proj"]))
    assert list(as_string.adapter_layers()) == list(as_list.adapter_layers()) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_load_adapter_refuses_a_base_with_other_weights(tmp_path):
    adapted = wrap(make_model("llama", seed=0), MoVConfig(num_experts=2))
    randomize_adapters(adapted)
    adapted.save_adapter(tmp_path / "adapter")
    with pytest.raises(MoeforgeError, match="trained on another base model.*allow_other_base=True"):
        load_adapter(make_model("llama", seed=1), tmp_path / "adapter")
    other = load_adapter(make_model("llama", seed=1), tmp_path / "adapter", allow_other_base=True)
    assert set(other.adapter_state_dict()) == set(adapted.adapter_state_dict())
    # the same weights in bfloat16 or float16 are the same base
    load_adapter(make_model("llama", seed=0).to(torch.bfloat16), tmp_path / "adapter")
    load_adapter(make_model("llama", seed=0).to(torch.float16), tmp_path / "adapter")
    with pytest.raises(MoeforgeError, match="trained on another base model"):
        load_adapter(make_model("llama", seed=1).to(torch.float16), tmp_path / "adapter")


@pytest.mark.parametrize("name", ["mov-sentence", "molora-sentence"])
def test_beam_search_with_sentence_routing_scores_the_beams_it_returns(name):
    """Beam search reorders the KV cache between steps; the running prefix sums of sentence routing
    must follow the rows, so each returned beam's score equals a full forward over it."""
    adapted = wrap(make_model("llama"), CONFIGS[name]())
    randomize_adapters(adapted, scale=3.0)
    prompt = torch.tensor([[5, 17, 33, 2]])
    out = adapted.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6, num_beams=3,
                           num_return_sequences=3, do_sample=False, pad_token_id=0, length_penalty=0.0,
                           output_scores=True, return_dict_in_generate=True)
    seqs = out.sequences
    with torch.no_grad():
        logp = torch.log_softmax(adapted(seqs[:, :-1]).logits, -1)
    recomputed = logp[:, prompt.shape[1] - 1 :].gather(-1, seqs[:, prompt.shape[1] :, None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, recomputed, rtol=0, atol=1e-4)


@pytest.mark.parametrize("damage", ["no_modules", "no_in_features", "no_config", "a_list", "version_text"])
def test_a_damaged_adapter_config_is_refused_with_one_message(tmp_path, damage):
    import json

    adapted = wrap(make_model("llama"), MoVConfig(num_experts=2))
    adapted.save_adapter(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    meta = json.loads(path.read_text())
    if damage == "no_modules":
        del meta["modules"]
    elif damage == "no_in_features":
        del meta["modules"][0]["in_features"]
    elif damage == "no_config":
        del meta["config"]
    elif damage == "version_text":
        meta["format_version"] = "1"
    else:
        meta = [meta]
    path.write_text(json.dumps(meta))
    base = make_model("llama")
    with pytest.raises(MoeforgeError, match="adapter_config.json is (damaged|not an adapter config)"):
        load_adapter(base, tmp_path / "a")
    assert not any(isinstance(m, type(adapted.adapter_layers()["model.layers.0.mlp.down_proj"])) for m in base.modules())
