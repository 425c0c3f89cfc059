"""The ``peft:`` section through ``moeforge.train`` (SFT on a tiny LLaMA), and the shipped PEFT configs."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moeforge.peft import AdaptedModel, config_from_dict, load_adapter, wrap_from_config

from .conftest import make_model

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("peft_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_peft_configs_load_and_wrap(path):
    from moeforge.train.config import load_config

    cfg = load_config(path)
    assert cfg.model == "smollm2" and cfg.peft is not None
    peft = config_from_dict(cfg.peft)
    assert peft.num_experts == 10
    adapted = wrap_from_config(make_model("llama"), cfg.peft)  # the same section on a tiny LLaMA
    assert adapted.parameter_summary().trainable > 0
    overridden = load_config(path, ["--peft.top_k", "2"])
    assert config_from_dict(overridden.peft).top_k == 2


def test_assert_shipped_configs_exist():
    assert {p.name for p in CONFIGS} >= {"peft_mov10_smollm2.yaml", "peft_molora10_smollm2.yaml"}


@pytest.mark.parametrize("method", ["mov", "molora"])
def test_trainer_sft_with_peft_section(method, tmp_path):
    from moeforge.train import train
    from tests.train.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a} + {a}", "a": str(2 * a)}) + "\n" for a in range(40)))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    section = {"method": method, "num_experts": 3}
    result = train(
        {
            "model": "tiny", "output_dir": str(tmp_path / "run"), "steps": 3, "batch_size": 2, "seq_len": 32,
            "lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.0, "save_every": 3, "log_every": 1,
            "progress": False, "plots": False, "cache_dir": "off", "device": "cpu",
            "data": [{"name": "qa", "path": str(data), "prompt_field": "q", "response_field": "a", "valid_fraction": 0.0}],
            "peft": section,
        },
        model=model,
        tokenizer=tok,
    )
    adapted = result.model
    assert isinstance(adapted, AdaptedModel) and result.steps == 3
    base = adapted.base_model.state_dict()
    for key, value in before.items():  # frozen base weights, bit for bit
        head, leaf = key.rsplit(".", 1)
        assert torch.equal(base.get(f"{head}.base_layer.{leaf}", base.get(key)), value), key
    final = result.final_dir
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    fresh = LlamaForCausalLM(cfg).eval()
    fresh.load_state_dict(before)
    ids = torch.randint(3, len(tok), (2, 12))
    with torch.no_grad():
        untrained = fresh(ids).logits
    loaded = load_adapter(fresh, final)
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, adapted(ids).logits, rtol=0, atol=0)
        assert not torch.allclose(loaded(ids).logits, untrained)  # the adapters did train


def _sft_run(tmp_path, section, **overrides):
    """(config dict, model, tokenizer) of a 3-step SFT run with a peft section on a tiny LLaMA."""
    from tests.train.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"{a} + {a}", "a": str(2 * a)}) + "\n" for a in range(40)))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    cfg = {
        "model": "tiny", "output_dir": str(tmp_path / "run"), "steps": 3, "batch_size": 2, "seq_len": 32,
        "lr": 1e-2, "warmup_steps": 0, "save_every": 3, "log_every": 1,
        "progress": False, "plots": False, "cache_dir": "off", "device": "cpu",
        "data": [{"name": "qa", "path": str(data), "prompt_field": "q", "response_field": "a", "valid_fraction": 0.0}],
        "peft": section, **overrides,
    }
    return cfg, model, tok


def test_weight_decay_leaves_ia3_vectors_alone(tmp_path):
    # decay pulls parameters toward 0; an (IA)^3/MoV vector's neutral value is 1, so they are exempt
    from moeforge.train import train

    vectors = {}
    for wd in (0.0, 0.5):
        cfg, model, tok = _sft_run(tmp_path / f"wd{wd}", {"method": "ia3"}, weight_decay=wd)
        adapted = train(cfg, model=model, tokenizer=tok).model
        vectors[wd] = {k: v.clone() for k, v in adapted.adapter_state_dict().items()}
    assert vectors[0.0].keys() == vectors[0.5].keys() and vectors[0.0]
    for k in vectors[0.0]:
        assert torch.equal(vectors[0.5][k], vectors[0.0][k]), k
    assert any(not torch.all(v == 1) for v in vectors[0.0].values())  # they did train


def test_failed_final_adapter_save_leaves_no_final_dir_and_a_rerun_writes_it(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from moeforge.errors import MoeforgeError
    from moeforge.train import train

    real = safetensors.torch.save_file

    def failing(tensors, path, metadata=None):
        if Path(path).name.startswith(".adapter_model.safetensors"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    cfg, model, tok = _sft_run(tmp_path, {"method": "mov", "num_experts": 2})
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(MoeforgeError, match="could not write the final model.*No space left"):
        train(cfg, model=model, tokenizer=tok)
    final = Path(cfg["output_dir"]) / "final"
    assert not final.exists() and not list(final.parent.glob(".final*"))  # no partial final/, no temp dir
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    again, model, tok = _sft_run(tmp_path, {"method": "mov", "num_experts": 2})
    result = train(again, model=model, tokenizer=tok)  # the same run: resumes at step 3, writes final/
    assert result.resumed_from == 3 and result.final_dir == final
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()


def test_resume_with_another_peft_section_names_the_changed_key(tmp_path):
    from moeforge.errors import MoeforgeError
    from moeforge.train import train

    cfg, model, tok = _sft_run(tmp_path, {"method": "mov", "num_experts": 2})
    train(cfg, model=model, tokenizer=tok)
    cfg, model, tok = _sft_run(tmp_path, {"method": "mov", "num_experts": 3}, steps=6)
    with pytest.raises(MoeforgeError, match=r"different config: peft.num_experts 2 -> 3"):
        train(cfg, model=model, tokenizer=tok)


def test_mov_in_bfloat16_and_its_router_in_float32_under_autocast():
    from moeforge.peft import MoVConfig, wrap

    model = make_model("llama")
    ids = torch.randint(2, 128, (2, 9))
    adapted = wrap(model, MoVConfig(num_experts=3))
    with torch.no_grad():
        for layer in adapted.adapter_layers().values():
            layer.vectors.uniform_(0.5, 1.5)
        reference = adapted(ids).logits
        low = adapted.to(torch.bfloat16)(ids).logits  # a cast model runs (probs float32, vectors bf16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, atol=0.1, rtol=0.05)
    router = next(layer.router for layer in adapted.adapter_layers().values() if layer.router is not None).float()
    x = torch.randn(5, router.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = router(x)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, router(x))


@pytest.mark.parametrize("router", ["sigmoid_bias", "switch", "noisy_topk"])
def test_a_frozen_moe_base_keeps_its_inference_behaviour(tmp_path, router):
    """PEFT on a moeforge MoE model: its routers are frozen, so training adds no noise, jitter,
    capacity dropping, aux losses or aux-loss-free bias updates, and the saved adapter reproduces
    the trained model on the untouched base."""
    from moeforge.train import train
    from tests.train.tiny import tiny_model

    cfg, _, tok = _sft_run(tmp_path, {"method": "mov", "num_experts": 2, "target_modules": ["k_proj", "v_proj"],
                                      "feedforward_modules": []},
                           aux_loss_scale=1.0)
    top_k = 1 if router == "switch" else 2
    moe = {"num_experts": 4, "top_k": top_k, "expert_size": 16, "router": router, "bias_update_rate": 0.01,
           "z_loss_coef": 1e-3}
    model = tiny_model(len(tok), moe=moe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(cfg, model=model, tokenizer=tok)
    records = [r for r in result.history if r.get("kind") == "train"]
    assert all(r["aux_loss"] == 0 for r in records)
    adapted = result.model.train()
    ids = torch.randint(3, len(tok), (2, 12))
    out = adapted(ids, labels=ids)
    assert not out.aux_loss  # nothing from the frozen routers reaches the objective
    torch.testing.assert_close(adapted(ids).logits, adapted(ids).logits, rtol=0, atol=0)  # no router noise
    base = adapted.base_model.state_dict()
    for key, value in before.items():  # router biases included
        head, leaf = key.rsplit(".", 1)
        assert torch.equal(base.get(f"{head}.base_layer.{leaf}", base.get(key)), value), key
    fresh = tiny_model(len(tok), moe=moe).eval()
    fresh.load_state_dict(before)
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(load_adapter(fresh, result.final_dir)(ids).logits, adapted(ids).logits, rtol=0, atol=0)


def test_vector_targets_on_a_model_without_defaults_need_feedforward_modules():
    """Without family defaults, a down_proj target would have its output rescaled instead of its
    input (the FFN activation, as the paper applies it); PEFT refuses this case too."""
    from moeforge.errors import MoeforgeError
    from moeforge.peft import IA3Config, wrap
    from tests.train.tiny import tiny_model

    model = tiny_model(300, moe={"num_experts": 4, "top_k": 2, "expert_size": 16, "num_shared_experts": 1})
    with pytest.raises(MoeforgeError, match="no default feedforward_modules for model_type 'moeforge'"):
        wrap(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"]))
    adapted = wrap(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    layer = adapted.adapter_layers()["model.layers.0.mlp.shared_experts.down_proj"]
    assert layer.position == "input" and layer.vectors.shape[-1] == 16
