"""Expert usage per domain (routing records) and its PNG plot."""

import pytest
import torch

from moeforge.errors import MoeforgeError
from moeforge.peft import IA3Config, MoVConfig, expert_usage, plot_expert_usage, specialisation, wrap

from .conftest import make_model, randomize_adapters


def test_expert_usage_per_domain_and_plot(tmp_path):
    adapted = wrap(make_model("llama"), MoVConfig(num_experts=4))
    randomize_adapters(adapted, scale=2.0)
    low = [torch.randint(2, 30, (2, 8)) for _ in range(2)]
    high = [{"input_ids": torch.randint(90, 128, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    usage = expert_usage(adapted, {"low": low, "high": high, "low-again": low})
    assert set(usage) == {"low", "high", "low-again"}
    assert set(usage["low"]) == set(adapted.adapter_layers())
    for table in usage.values():
        for probs in table.values():
            assert probs.shape == (4,) and abs(float(probs.sum()) - 1.0) < 1e-5
    # same batches -> same usage; different token ranges -> different usage
    assert specialisation({"a": usage["low"], "b": usage["low-again"]}) == pytest.approx(0.0, abs=1e-9)
    assert specialisation({"a": usage["low"], "b": usage["high"]}) > 1e-4
    path = plot_expert_usage(usage, tmp_path / "usage.png", title="tiny")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MoeforgeError, match="no usage recorded"):
        plot_expert_usage(usage, tmp_path / "x.png", modules=["nope"])
    with pytest.raises(MoeforgeError, match="no router"):
        expert_usage(wrap(make_model("llama"), IA3Config()), {"low": low})
