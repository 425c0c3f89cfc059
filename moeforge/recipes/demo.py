"""The demo job: convert the real model into an MoE, export it, and compare it with the dense model."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..eval.corpora import resolve_corpus, tokenize_corpus
from ..eval.cost import parameter_counts
from ..eval.perplexity import evaluate_nll
from ..errors import MoeforgeError
from ..loading import load, load_with_tokenizer


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


def _row(name: str, dense: str, moe: str, width: tuple[int, int, int]) -> str:
    return f"{name:<{width[0]}}  {dense:>{width[1]}}  {moe:>{width[2]}}"


def run_demo(
    *,
    model: str,
    out: str,
    experts: int,
    top_k: int,
    method: str,
    gate_init: str,
    rescale: str,
    refine: str,
    calibration_tokens: int,
    max_tokens: int,
    prompt: str,
    new_tokens: int,
) -> None:
    """Convert ``model`` into an MoE (exported to ``out``), then print the dense-vs-MoE table and replies."""
    from ..convert.api import convert

    if max_tokens < 2:
        raise MoeforgeError(f"--max-tokens must be at least 2 (a perplexity needs a token and its successor), got {max_tokens}.")
    if new_tokens < 1:
        raise MoeforgeError(f"--new-tokens must be at least 1, got {new_tokens}.")
    t0 = time.perf_counter()
    dense, tok = load_with_tokenizer(model)
    print(f"dense model: {model} ({type(dense).__name__}), loaded in {time.perf_counter() - t0:.1f}s")
    print(f"converting: {experts} experts, top-{top_k}, --method {method} --gate-init {gate_init} --rescale {rescale} "
          f"--refine {refine}")
    t0 = time.perf_counter()
    last = [t0]

    def progress(message: str) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or not message.startswith("layer"):  # keep the demo's output short
            print(f"  [{now - t0:5.0f}s] {message}", flush=True)
            last[0] = now

    report = convert(model, out, overwrite=True, experts=experts, top_k=top_k, method=method, gate_init=gate_init,
                     rescale=rescale, refine=refine, calibration_tokens=calibration_tokens, eval_tokens=0,
                     progress=progress)
    v = report.verification
    print(f"exported to {report.out} as {report.format} in {time.perf_counter() - t0:.0f}s; verified: "
          f"reloaded with plain {v['loaded_with']}, max |logit difference| {v['max_abs_logit_diff']:.1e}")
    moe = load(out)
    ids = tokenize_corpus(tok, resolve_corpus("prose"), max_tokens)
    seq_len = min(512, ids.numel())
    results = {}
    for name, m in (("dense", dense), ("moe", moe)):
        r = evaluate_nll(m, ids, seq_len=seq_len)
        results[name] = (parameter_counts(m), r)
    (pd, rd), (pm, rm) = results["dense"], results["moe"]
    rows = [
        ("", "dense", f"MoE {experts}x top-{top_k}"),
        ("parameters", f"{pd['total']:,}", f"{pm['total']:,}"),
        ("active parameters / token", f"{pd['active']:,}", f"{pm['active']:,}"),
        (f"perplexity, held-out prose ({ids.numel()} tokens)", f"{rd.perplexity:.2f}", f"{rm.perplexity:.2f}"),
        ("tokens/s (forward, this CPU)", f"{rd.tokens_per_second:.0f}", f"{rm.tokens_per_second:.0f}"),
    ]
    width = tuple(max(len(r[i]) for r in rows) for i in range(3))
    print()
    for r in rows:
        print(_row(*r, width))
    print("(the MoE is measured right after conversion, before any training)")
    print()
    print(f"prompt: {prompt}")
    print(f"dense reply: {chat_reply(dense, tok, prompt, new_tokens)}")
    print(f"MoE reply:   {chat_reply(moe, tok, prompt, new_tokens)}")
    print()
    print(f"The export opens without moeforge: AutoModelForCausalLM.from_pretrained({str(Path(out))!r})")
