"""Pretrain the small dense testbed model that claims 1 and 2 are also run on.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/testbed.py [--tokens 1228800] [--out runs/testbed]

Why: training SmolLM2-135M on this 2-core CPU runs at ~100 tokens/s, far too slow to show how
a converted MoE recovers with training. The testbed is a LLaMA-architecture model small enough
to pretrain, convert and train here, with the same code paths (``moeforge.convert``,
``moeforge.train``) as the real model.

What it builds (written to ``OUT/dense`` as a plain transformers ``LlamaForCausalLM``
checkpoint with its tokenizer, so ``moeforge.load`` and ``moeforge convert`` open it):

* tokenizer: a byte-level BPE with 8,192 tokens trained here on the built-in domains' train
  split (SmolLM2's 49,152-token vocabulary would put 12.6M of a ~10M-parameter budget into the
  embedding alone);
* model: hidden 256, 8 layers, 4 query / 2 key-value heads (grouped-query attention like
  SmolLM2), SwiGLU FFN 1,024 (so 8 experts of 128 or 16 of 64 neurons), tied embeddings,
  RoPE, 512 positions: 9.96M parameters;
* pretraining: the built-in domains (prose 0.3, code 0.45, arithmetic 0.25 of the sampled
  rows), random 256-token crops, batch 8 (2,048 tokens/step), AdamW (0.9, 0.95), wd 0.1,
  lr 2e-3 with 60 warmup steps and cosine to 0.1x, clip 1.0, float32.

This loop exists only to create the testbed (it predates ``moeforge.train``); everything that
converts and trains the testbed afterwards goes through moeforge's own APIs. The run saves a
resumable state every 100 steps (``OUT/pretrain_state.pt``, tensors only, loaded with
``weights_only=True``); rerunning the command resumes. At the end it writes the section
``testbed`` of docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DOMAINS = {"prose": 0.30, "code": 0.45, "arithmetic": 0.25}
VOCAB = 8192
SEQ = 256
BATCH = 8
ARCH = dict(hidden_size=256, num_hidden_layers=8, intermediate_size=1024, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
            rms_norm_eps=1e-5)


def train_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from moeforge.data import builtin_documents

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    docs = [d for name in DOMAINS for d in builtin_documents(name, "train")]
    bpe.train_from_iterator(docs, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.model_max_length = ARCH["max_position_embeddings"]
    tok.save_pretrained(out)
    return tok


def domain_tokens(tok, split: str) -> dict[str, torch.Tensor]:
    from moeforge.data import builtin_documents

    out = {}
    for name in DOMAINS:
        ids: list[int] = []
        for doc in builtin_documents(name, split):
            ids.extend(tok(doc, add_special_tokens=False).input_ids)
            ids.append(tok.eos_token_id)
        out[name] = torch.tensor(ids, dtype=torch.long)
    return out


def lr_at(step: int, total: int, peak: float, warmup: int = 60, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def sample_batch(data: dict[str, torch.Tensor], rng: random.Random) -> torch.Tensor:
    names, weights = list(DOMAINS), list(DOMAINS.values())
    rows = []
    for _ in range(BATCH):
        ids = data[rng.choices(names, weights)[0]]
        start = rng.randrange(0, ids.numel() - SEQ)
        rows.append(ids[start : start + SEQ])
    return torch.stack(rows)


def valid_perplexities(model, valid: dict[str, torch.Tensor], max_tokens: int = 8192) -> dict[str, float]:
    from moeforge.eval.perplexity import perplexity

    return {name: perplexity(model, ids, seq_len=SEQ, max_tokens=max_tokens, batch_size=8) for name, ids in valid.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description="Pretrain the dense testbed model.")
    ap.add_argument("--tokens", type=int, default=600 * BATCH * SEQ, help="training tokens (default 600 steps)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "testbed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-report", action="store_true", help="do not write docs/results.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report section from a finished OUT/dense")
    ap.add_argument("--note", default="", help="a remark added to the report section")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from moeforge.utils.io import atomic_output_dir

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        from transformers import AutoTokenizer

        info = json.loads((out / "dense" / "pretrain_log.json").read_text())
        tok = AutoTokenizer.from_pretrained(out / "dense")
        model = LlamaForCausalLM.from_pretrained(out / "dense")
        write_report(args, sum(p.numel() for p in model.parameters()), tok, domain_tokens(tok, "train"),
                     domain_tokens(tok, "valid"), info["steps"], info["wall_s"], info["valid_ppl"])
        return
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        t0 = time.perf_counter()
        tok = train_tokenizer(tok_dir)
        print(f"tokenizer trained in {time.perf_counter() - t0:.0f}s", flush=True)
    train, valid = domain_tokens(tok, "train"), domain_tokens(tok, "valid")
    print("train tokens per domain:", {k: v.numel() for k, v in train.items()}, flush=True)
    print("valid tokens per domain:", {k: v.numel() for k, v in valid.items()}, flush=True)

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **ARCH)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    steps = args.tokens // (BATCH * SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    rng = random.Random(args.seed)
    state_path = out / "pretrain_state.pt"
    start, elapsed, log = 0, 0.0, []
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        version, internal, gauss = json.loads(state["rng"])
        rng.setstate((version, tuple(internal), gauss))
        log = json.loads(state["log"])
        print(f"resumed at step {start}", flush=True)
    print(f"testbed: {n_params / 1e6:.2f}M parameters, {steps} steps x {BATCH * SEQ} tokens", flush=True)
    model.train()
    t_last = time.perf_counter()
    for step in range(start, steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr)
        batch = sample_batch(train, rng)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0 or step + 1 == steps:
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            log.append({"step": step + 1, "loss": round(loss.item(), 4), "elapsed": round(elapsed, 1)})
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} {(step + 1 - start) * BATCH * SEQ / max(elapsed, 1e-9):.0f} tok/s "
                  f"elapsed {elapsed / 60:.1f} min", flush=True)
        if (step + 1) % 100 == 0 and step + 1 < steps:
            model.eval()
            print("  valid ppl:", {k: round(v, 2) for k, v in valid_perplexities(model, valid, 4096).items()}, flush=True)
            model.train()
            r = rng.getstate()
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step + 1,
                        "elapsed": elapsed, "rng": json.dumps([r[0], list(r[1]), r[2]]), "log": json.dumps(log)}, tmp)
            os.replace(tmp, state_path)
            t_last = time.perf_counter()
    model.eval()
    ppl = valid_perplexities(model, valid)
    print("final valid ppl:", ppl, flush=True)
    with atomic_output_dir(out / "dense", overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pretrain_log.json").write_text(json.dumps({"valid_ppl": ppl, "log": log, "steps": steps,
                                                            "tokens": steps * BATCH * SEQ, "wall_s": elapsed}) + "\n")
    if state_path.is_file():
        state_path.unlink()
    if not args.no_report:
        write_report(args, n_params, tok, train, valid, steps, elapsed, ppl)


def write_report(args, n_params, tok, train, valid, steps, elapsed, ppl) -> None:
    from moeforge.eval.report import device_description, update_section

    rows = "\n".join(f"| {k} | {valid[k].numel():,} | {v:.2f} |" for k, v in ppl.items())
    note = f"\n{args.note}\n" if args.note else ""
    md = f"""The second testbed for claims 1 and 2 (SmolLM2-135M trains at ~100 tokens/s here, too slow for recovery curves).

* Architecture: LLaMA (`LlamaForCausalLM`), hidden 256, 8 layers, 4 query / 2 key-value heads, SwiGLU FFN 1,024,
  tied embeddings, RoPE: **{n_params / 1e6:.2f}M parameters**.
* Tokenizer: byte-level BPE, {len(tok):,} tokens, trained by this script on the built-in domains' train split
  (not SmolLM2's: its 49,152-token embedding alone would be 12.6M parameters).
* Data: built-in domains, train split (train tokens: {", ".join(f"{k} {v.numel():,}" for k, v in train.items())}),
  rows sampled prose 0.30 / code 0.45 / arithmetic 0.25, random 256-token crops.
* Budget: {steps} steps x {BATCH * SEQ:,} tokens = **{steps * BATCH * SEQ:,} tokens**, {elapsed / 60:.0f} min wall time
  (AdamW 0.9/0.95, wd 0.1, lr {args.lr:g}, 60 warmup steps, cosine to 0.1x, clip 1.0, float32, one thread, niced,
  on a machine shared with other jobs).
* Device: {device_description()}.
* Command: `OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/testbed.py --tokens {steps * BATCH * SEQ}`
{note}
Held-out perplexity of the dense testbed (valid split, 256-token windows, first 8,192 tokens):

| domain | valid tokens | perplexity |
|---|---|---|
{rows}
"""
    update_section("testbed", md, title="Testbed: a 10M-parameter dense LLaMA pretrained here")
    print("wrote docs/results.md section testbed")


if __name__ == "__main__":
    main()
