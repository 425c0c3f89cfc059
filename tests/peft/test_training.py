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
