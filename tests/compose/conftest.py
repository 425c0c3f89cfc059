"""Tiny models for the composition tests: a LLaMA anchor and a moeforge MoE augmenting model of
different widths and depths (64 wide x 4 layers vs 32 wide x 2 layers), sharing a character tokenizer.

The MoE model's decoder layers return tuples and LLaMA's return bare tensors, so every test that
runs both roles covers both layer-output conventions.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moeforge.compose.kv_task import char_tokenizer
from moeforge.models import MoeforgeConfig, MoeforgeForCausalLM

VOCAB = len(char_tokenizer())


def llama(hidden=64, layers=4, heads=4, vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def moe(hidden=32, layers=2, heads=2, vocab=VOCAB, seed=1):
    torch.manual_seed(seed)
    cfg = MoeforgeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         moe={"num_experts": 4, "top_k": 2, "expert_size": 16})
    return MoeforgeForCausalLM(cfg).eval()


def randomize_outputs(composed, std=0.3, seed=2):
    """Give the zero-initialised output projections (and the rest) non-trivial values, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in composed.connections.parameters():
            p.copy_(p + std * torch.randn(p.shape, generator=gen))
    return composed


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def anchor():
    return llama()


@pytest.fixture
def augmenting():
    return moe()


@pytest.fixture
def saved_models(tmp_path, tokenizer):
    """Anchor and augmenting checkpoints on disk, each with the shared tokenizer."""
    paths = {}
    for name, model in (("anchor", llama()), ("augmenting", moe())):
        path = tmp_path / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths
