"""Tiny models and a tiny tokenizer for evaluation and analysis tests (built in milliseconds, no download)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def _bpe_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moeforge.data import builtin_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"], show_progress=False)
    bpe.train_from_iterator([builtin_text(d, "train")[:8000] for d in ("prose", "code", "arithmetic")], trainer)
    return bpe.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer with a 300-token vocabulary, trained on built-in text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json()), eos_token="<eos>")


def tiny_moe(vocab_size: int = 300, *, experts: int = 4, top_k: int = 2, moe_layers=(0, 2), router: str = "topk", seed: int = 0, **moe):
    """A 3-layer moeforge MoE model (hidden 32) with random weights, in eval mode."""
    from moeforge.models import MoeforgeConfig, MoeforgeForCausalLM

    torch.manual_seed(seed)
    cfg = MoeforgeConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
        moe={"num_experts": experts, "top_k": top_k, "expert_size": 16, "router": router, **moe},
        moe_layers=list(moe_layers),
    )
    return MoeforgeForCausalLM(cfg).eval()


def tiny_llama(vocab_size: int = 300, seed: int = 0):
    """A 2-layer plain transformers LLaMA (hidden 32) with random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()
