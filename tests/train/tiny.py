"""Tiny tokenizer and models for training tests (built in milliseconds, no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from moeforge.data.builtin import arithmetic_lines, builtin_documents
from moeforge.data.chat import CHATML_TEMPLATE

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a little built-in text, with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = builtin_documents("prose", "train")[:20] + ["\n".join(arithmetic_lines(200))]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(vocab_size: int, *, moe: dict | None = None, hidden: int = 32, layers: int = 2, **kw):
    from moeforge.models import MoeforgeConfig

    return MoeforgeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        moe=moe or {"num_experts": 4, "top_k": 2, "expert_size": 16},
        **kw,
    )


def tiny_model(vocab_size: int, seed: int = 0, **kw):
    from moeforge.models import MoeforgeForCausalLM

    torch.manual_seed(seed)
    return MoeforgeForCausalLM(tiny_config(vocab_size, **kw))


def save_tiny(directory: Path, tokenizer, seed: int = 0, **kw) -> Path:
    model = tiny_model(len(tokenizer), seed=seed, **kw)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
