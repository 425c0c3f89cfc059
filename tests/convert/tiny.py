"""Tiny dense checkpoints (LLaMA, Mistral, Qwen2) with a byte-level tokenizer, written to a directory."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 260  # 256 bytes + 4 specials


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: every UTF-8 byte is one token (ids 0-255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for i, special in enumerate(("<s>", "</s>", "<pad>", "<unk>")):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_dense(
    path: Path,
    *,
    family: str = "llama",
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    tied: bool = True,
    seed: int = 0,
    max_shard_size: str = "5GB",
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **extra,
):
    """Write a randomly initialised dense model (weights ~ N(0, 0.1^2), norms ~ 1) to ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    fields.update(extra)
    config = AutoConfig.for_model(family, **fields)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    if tokenizer:
        byte_tokenizer().save_pretrained(str(path))
    return model.eval()
