"""Export formats: which one --format auto picks, and that each reloads to moeforge's logits.

Every conversion below also runs the built-in verification (reload + logits against a reference
assembled without the key tables); these tests add independent checks: the class transformers
opens, the on-disk keys, the import back into moeforge, and the refusals.
"""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moeforge
from tests.convert.tiny import make_dense
from tests.threads import _one_thread  # noqa: F401  (autouse fixture)

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    make_dense(root / "llama")
    make_dense(root / "qwen2", family="qwen2", seed=2)
    make_dense(root / "mistral", family="mistral", seed=3, sliding_window=8, tied=False)
    return root


def keys(directory):
    out = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            out |= set(h.keys())
    return out


def run(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_shared_experts_go_to_qwen2_moe_exactly(sources, tmp_path):
    out = tmp_path / "q"
    report = moeforge.convert(sources / "llama", out, method="random", experts=3, shared_experts=1, top_k=1,
                              eval_tokens=0)
    assert report.format == "qwen2_moe"
    assert "Mixtral has no shared experts" in report.format_notes["mixtral"]
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    gate = hf.model.layers[0].mlp.shared_expert_gate.weight
    assert torch.equal(gate, torch.zeros_like(gate))  # sigmoid(0) = 1/2, compensated in down_proj
    mf = moeforge.load(out)  # the importer maps it back onto moeforge's own layer
    assert type(mf).__name__ == "MoeforgeForCausalLM" and mf.config.moe["num_shared_experts"] == 1
    ref = moeforge.convert(sources / "llama", None, method="random", experts=3, shared_experts=1, top_k=1,
                           eval_tokens=0).model
    torch.testing.assert_close(run(hf), run(ref), atol=1e-5, rtol=0)
    torch.testing.assert_close(run(mf), run(ref), atol=1e-5, rtol=0)


def test_qwen2_source_keeps_qkv_biases(sources, tmp_path):
    out = tmp_path / "q2"
    report = moeforge.convert(sources / "qwen2", out, method="random", experts=4, top_k=4, gate_init="uniform",
                              rescale=4.0, eval_tokens=0)
    assert report.format == "qwen2_moe"  # Mixtral attention has no biases
    dense = AutoModelForCausalLM.from_pretrained(str(sources / "qwen2"), dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    torch.testing.assert_close(run(hf), run(dense), atol=1e-5, rtol=0)
    assert "model.layers.0.self_attn.q_proj.bias" in keys(out)
    # the moeforge format represents Qwen2 as LLaMA attention with a zero o_proj bias
    mf = moeforge.convert(sources / "qwen2", tmp_path / "m", format="moeforge", method="random", experts=4, top_k=4,
                          gate_init="uniform", rescale=4.0, eval_tokens=0)
    assert mf.format == "moeforge"
    torch.testing.assert_close(run(moeforge.load(tmp_path / "m")), run(dense), atol=1e-5, rtol=0)


def test_mistral_sliding_window_goes_to_mixtral(sources, tmp_path):
    out = tmp_path / "mx"
    report = moeforge.convert(sources / "mistral", out, method="upcycle", experts=2, top_k=1, eval_tokens=0)
    assert report.format == "mixtral"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sliding_window"] == 8 and cfg["tie_word_embeddings"] is False
    dense = AutoModelForCausalLM.from_pretrained(str(sources / "mistral"), dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 20))  # longer than the window: the window must matter and match
    torch.testing.assert_close(run(hf, ids), run(dense, ids), atol=1e-5, rtol=0)


def test_layer_subset_and_layerwise_scales(sources, tmp_path):
    opts = dict(method="random", experts=4, top_k=2, layers="1", rescale=4.0, eval_tokens=0)
    auto = moeforge.convert(sources / "llama", tmp_path / "a", **opts)
    assert auto.format == "qwen2_moe"  # Mixtral cannot hold a dense layer; Qwen2-MoE lists it in mlp_only_layers
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0] and cfg["shared_expert_intermediate_size"] == 0
    assert "model.layers.0.mlp.gate_proj.weight" in keys(tmp_path / "a")
    own = moeforge.convert(sources / "llama", tmp_path / "b", format="moeforge", **opts)
    model = moeforge.load(tmp_path / "b")
    assert model.config.moe_layers == [1] and model.config.moe["output_scale"] == 4.0
    torch.testing.assert_close(run(model), run(moeforge.load(tmp_path / "a")), atol=1e-5, rtol=0)
    assert own.parameters["moe"]["active"] < own.parameters["dense"]["active"]


def test_per_layer_scales_are_kept_in_moeforge_and_folded_in_mixtral(sources, tmp_path):
    opts = dict(method="random", experts=4, top_k=2, rescale="fit", calibration_tokens=512, calibration_seq_len=64,
                eval_tokens=0)
    own = moeforge.convert(sources / "llama", tmp_path / "own", format="moeforge", **opts)
    scales = [r.output_scale for r in own.layers]
    assert scales[0] != scales[1]
    cfg = json.loads((tmp_path / "own" / "config.json").read_text())
    assert [cfg["moe_overrides"][str(i)]["output_scale"] for i in range(2)] == pytest.approx(scales)
    moeforge.convert(sources / "llama", tmp_path / "mx", format="mixtral", **opts)
    mixtral = AutoModelForCausalLM.from_pretrained(str(tmp_path / "mx"), dtype=torch.float32)
    torch.testing.assert_close(run(mixtral), run(moeforge.load(tmp_path / "own")), atol=1e-4, rtol=0)


def test_routers_other_than_topk_need_the_moeforge_format(sources, tmp_path):
    report = moeforge.convert(sources / "llama", tmp_path / "n", router="noisy_topk", experts=4, top_k=2, eval_tokens=0)
    assert report.format == "moeforge"
    assert "noisy_topk" in report.format_notes["mixtral"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "n"), dtype=torch.float32)  # Auto classes registered
    assert type(model).__name__ == "MoeforgeForCausalLM" and model.config.moe["router"] == "noisy_topk"
    assert model.model.layers[0].mlp.router.weight.dtype == torch.float32


def test_multi_shard_export_has_an_index(sources, tmp_path):
    out = tmp_path / "s"
    moeforge.convert(sources / "llama", out, experts=4, top_k=2, max_shard_size="20KB", eval_tokens=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert type(AutoModelForCausalLM.from_pretrained(str(out))).__name__ == "MixtralForCausalLM"


def test_qwen2_moe_with_learned_shared_gates_opens_exactly(sources, tmp_path):
    # released Qwen1.5/Qwen2-MoE checkpoints gate the shared expert with sigmoid(x . w)
    moeforge.convert(sources / "llama", tmp_path / "q", method="random", experts=3, shared_experts=1, top_k=1,
                     eval_tokens=0)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.shared_expert_gate.weight.normal_(std=0.5)
    hf.save_pretrained(str(tmp_path / "learned"))
    mf = moeforge.load(tmp_path / "learned")
    assert mf.config.moe["shared_expert_gate"] is True
    gate = mf.model.layers[0].mlp.shared_expert_gate.weight
    torch.testing.assert_close(gate, hf.model.layers[0].mlp.shared_expert_gate.weight, rtol=0, atol=0)
    torch.testing.assert_close(run(mf), run(hf), atol=1e-5, rtol=0)
    # a mutation check: the gate is really applied (an ungated layer gives other logits)
    with torch.no_grad():
        gate.zero_()
    assert not torch.allclose(run(mf), run(hf), atol=1e-3)
    # moeforge's own format keeps the gate through save_pretrained / load
    mf = moeforge.load(tmp_path / "learned")
    mf.save_pretrained(str(tmp_path / "resaved"))
    torch.testing.assert_close(run(moeforge.load(tmp_path / "resaved")), run(hf), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "router,top_k",
    [("switch", 1), ("expert_choice", 2), ("sigmoid_bias", 2)],
)
def test_every_router_exports_to_the_moeforge_format_and_verifies(sources, tmp_path, router, top_k):
    report = moeforge.convert(sources / "llama", tmp_path / router, router=router, experts=4, top_k=top_k,
                              eval_tokens=0)
    assert report.format == "moeforge" and report.verification["layers_compared"] == 2
    model = moeforge.load(tmp_path / router)
    assert model.config.moe["router"] == router
    if router == "expert_choice":  # the causal-safe variant is chosen for a decoder
        assert model.config.moe["expert_choice_causal"] is True


def test_moeforge_format_is_what_save_pretrained_writes(sources, tmp_path):
    moeforge.convert(sources / "llama", tmp_path / "a", format="moeforge", experts=3, shared_experts=1, top_k=1,
                     rescale=2.5, eval_tokens=0)
    model = moeforge.load(tmp_path / "a")
    model.save_pretrained(str(tmp_path / "b"))
    assert keys(tmp_path / "a") == keys(tmp_path / "b")
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as fa, \
            safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as fb:
        for k in fa.keys():
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), k
    a = json.loads((tmp_path / "a" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert a["moe"] == b["moe"] and a["model_type"] == b["model_type"] == "moeforge"


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
def test_balance_loss_strength_round_trips_with_transformers(sources, tmp_path, fmt):
    # moeforge sums one balance loss per MoE layer; transformers computes one over all layers' tokens
    for coef in (0.005, 0.0):
        out = tmp_path / f"{fmt}-{coef}"
        moeforge.convert(sources / "llama", out, method="random", experts=4, top_k=2, eval_tokens=0, format=fmt,
                         router_options={"aux_loss_coef": coef})
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["router_aux_loss_coef"] == pytest.approx(coef * cfg["num_hidden_layers"])  # 0 stays 0
        assert moeforge.load(out).config.moe["aux_loss_coef"] == pytest.approx(coef)


def test_router_jitter_round_trips_with_mixtral(sources, tmp_path):
    out = tmp_path / "jitter"
    report = moeforge.convert(sources / "llama", out, method="random", experts=4, top_k=2, eval_tokens=0,
                              router_options={"input_jitter": 0.05})
    assert report.format == "mixtral" and "input_jitter" in report.format_notes["qwen2_moe"]
    assert json.loads((out / "config.json").read_text())["router_jitter_noise"] == pytest.approx(0.05)
    assert moeforge.load(out).config.moe["input_jitter"] == pytest.approx(0.05)


def test_expert_widths_transformers_cannot_run_go_to_the_moeforge_format(sources, tmp_path):
    # transformers' default grouped_mm experts need 16-byte rows: FFN 64 / 16 experts = 4 neurons
    # are 16 bytes in float32 but 8 in bfloat16
    report = moeforge.convert(sources / "llama", tmp_path / "f32", method="random", experts=16, top_k=2, eval_tokens=0)
    assert report.format == "mixtral"
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "f32"), dtype=torch.float32)(IDS)  # runs
    report = moeforge.convert(sources / "llama", tmp_path / "bf16", method="random", experts=16, top_k=2,
                              eval_tokens=0, dtype="bfloat16")
    assert report.format == "moeforge" and "grouped_mm" in report.format_notes["mixtral"]
    assert "expert width 4 in bfloat16 is 8 bytes" in report.format_notes["qwen2_moe"]
    with pytest.raises(moeforge.MoeforgeError, match="--format mixtral cannot hold this model exactly: transformers runs"):
        moeforge.convert(sources / "llama", tmp_path / "x", method="random", experts=16, top_k=2, eval_tokens=0,
                         dtype="bfloat16", format="mixtral")
    run(moeforge.load(tmp_path / "bf16"))


def test_a_bf16_source_written_as_float32_is_rounded_once(tmp_path):
    """The output scale is folded into the down projections in float32, so a bfloat16 checkpoint
    exported as float32 is exact: the Mixtral export (scale folded) and the moeforge export (scale
    kept) give the same logits."""
    from tests.convert.tiny import make_dense

    make_dense(tmp_path / "bf16", dtype=torch.bfloat16)
    for fmt in ("mixtral", "moeforge"):
        moeforge.convert(tmp_path / "bf16", tmp_path / fmt, method="random", experts=4, top_k=2, rescale=3.3,
                         dtype="float32", format=fmt, eval_tokens=0)
    with torch.no_grad():
        a = moeforge.load(tmp_path / "mixtral")(IDS).logits
        b = moeforge.load(tmp_path / "moeforge")(IDS).logits
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


def test_settings_a_stock_format_cannot_hold_send_auto_to_the_moeforge_format(sources, tmp_path):
    report = moeforge.convert(sources / "llama", tmp_path / "z", method="random", experts=4, top_k=2, eval_tokens=0,
                              router_options={"z_loss_coef": 1e-3, "expert_dropout": 0.1, "router_init_std": 0.5})
    assert report.format == "moeforge"
    assert "no field for expert_dropout, z_loss_coef" in report.format_notes["mixtral"]
    model = moeforge.load(tmp_path / "z")
    assert model.config.moe["z_loss_coef"] == 1e-3 and model.config.moe["expert_dropout"] == 0.1
    assert 0.3 < float(model.model.layers[0].mlp.router.weight.std()) < 0.7  # router_init_std is the random init's std
    with pytest.raises(moeforge.MoeforgeError, match="router option 'shared_expert_gate' is set by the conversion"):
        moeforge.convert(sources / "llama", None, experts=3, shared_experts=1, top_k=1, eval_tokens=0,
                         router_options={"shared_expert_gate": True})
