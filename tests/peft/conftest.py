"""Tiny LLaMA and T5 models (hidden 32, 2 layers, vocab 128) shared by the PEFT tests."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

VOCAB = 128


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )


def t5_config() -> T5Config:
    return T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )


def make_model(kind: str, seed: int = 0):
    """A tiny randomly initialised model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config()) if kind == "llama" else T5ForConditionalGeneration(t5_config())
    return model.eval()


def frozen(model):
    """The model with requires_grad off everywhere (T5's SDPA path rounds differently when weights need grads)."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def batch(kind: str, seed: int = 1, batch_size: int = 2, length: int = 9) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch_size, length), generator=g)
    if kind == "llama":
        return {"input_ids": ids, "labels": ids}
    return {"input_ids": ids, "labels": torch.randint(2, VOCAB, (batch_size, 5), generator=g)}


def randomize_adapters(adapted, seed: int = 3, scale: float = 0.3) -> None:
    """Move every adapter and router tensor away from its init so equalities are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(adapted.adapter_state_dict().items()):
            noise = torch.randn(p.shape, generator=g) * scale
            p.add_(noise)


@pytest.fixture(params=["llama", "t5"])
def kind(request):
    return request.param
