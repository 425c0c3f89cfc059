"""The demo job: the real model on embedded text."""

from __future__ import annotations

import time

import torch

from ..data.builtin import builtin_text
from ..eval.cost import parameter_counts
from ..eval.perplexity import perplexity
from ..loading import load_with_tokenizer


def chat_reply(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy reply to one user message, rendered with the tokenizer's chat template."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def run_demo(*, model: str, max_tokens: int, prompt: str, new_tokens: int) -> None:
    t0 = time.perf_counter()
    m, tok = load_with_tokenizer(model)
    counts = parameter_counts(m)
    print(f"model: {model} ({type(m).__name__}), loaded in {time.perf_counter() - t0:.1f}s")
    print(f"parameters: {counts['total']:,} total, {counts['active']:,} active per token")
    ids = tok(builtin_text("prose", "valid"), return_tensors="pt").input_ids[0]
    t0 = time.perf_counter()
    ppl = perplexity(m, ids, max_tokens=max_tokens)
    n = min(ids.numel(), max_tokens)
    print(f"perplexity on held-out embedded prose ({n} tokens, 512-token windows): {ppl:.2f} "
          f"({n / (time.perf_counter() - t0):.0f} tokens/s)")
    print(f"prompt: {prompt}")
    print(f"reply: {chat_reply(m, tok, prompt, new_tokens)}")
