"""Tokens/s of a full training step (forward, loss, backward, AdamW step) on the converted SmolLM2 MoE.

Compares, in one run and on the same batch shape:

* ``moeforge``: the moeforge trainer's own step (:meth:`moeforge.train.Trainer.train_step`: batch
  assembly from the packed data, next-token loss + router aux loss, clipping, AdamW, bias updates);
* ``transformers mixtral/<impl>``: the same MoE weights in transformers' ``MixtralForCausalLM``
  (router aux loss on, ``output_router_logits=True``), trained with a plain loop, for every
  experts implementation transformers offers (eager, batched_mm, grouped_mm); the best counts;
* ``dense``: the dense SmolLM2 through the same moeforge step.

Prints one table and the ratios the training issue sets as goals: moeforge / best transformers
(goal >= 1.3) and the MoE's speed-up over dense next to its active-FLOPs ratio.

    .venv/bin/python benchmarks/train_step.py                                   # converts smollm2 in memory
    .venv/bin/python benchmarks/train_step.py --moe runs/smollm2-moe-8x2 --threads 1 --batch 2 --seq-len 256
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time

import torch

import moeforge
from moeforge.eval.cost import flops_per_token, parameter_counts


def moeforge_moe(args):
    if args.moe:
        return moeforge.load(args.moe)
    report = moeforge.convert("smollm2", None, experts=args.experts, top_k=args.top_k, method="random", verify=False, eval_tokens=0)
    return report.model


def to_mixtral(moe, impl: str):
    """transformers MixtralForCausalLM with the MoE's weights (v5 stacked layout; output scale folded into down_proj)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = moe.config
    m = c.moe
    if m.get("router", "topk") != "topk" or m.get("num_shared_experts", 0) or c.moe_layers is not None:
        raise SystemExit("the MoE must be a plain top-k MoE in every layer to be run as Mixtral")
    cfg = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=m["expert_size"],
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None),
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters=c.rope_parameters,
        tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=m["num_experts"],
        num_experts_per_tok=m["top_k"],
        router_aux_loss_coef=m.get("aux_loss_coef") or 1e-3,
        output_router_logits=True,
        experts_implementation=impl,
    )
    with torch.device("meta"):
        mix = MixtralForCausalLM(cfg)
    state = {}
    for k, v in moe.state_dict().items():
        if ".mlp.router.weight" in k:
            state[k.replace(".mlp.router.weight", ".mlp.gate.weight")] = v.clone()
        elif ".mlp.experts.down_proj" in k:
            layer = int(k.split(".")[2])
            scale = moe.config.layer_moe_config(layer).output_scale
            state[k] = v.clone() * scale
        else:
            state[k] = v.clone()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = mix.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (c.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SystemExit(f"weight mapping failed: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if c.tie_word_embeddings:
        mix.tie_weights()
    for name, buf in mix.named_buffers():
        if buf.is_meta:  # rotary inv_freq
            from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

            fresh = MixtralRotaryEmbedding(config=cfg)
            mix.model.rotary_emb.inv_freq = fresh.inv_freq
            mix.model.rotary_emb.original_inv_freq = fresh.original_inv_freq
            break
    mix.set_experts_implementation(impl)
    return mix


def batched_mm_bytes(moe, args) -> int:
    """Memory transformers' batched_mm experts keep for the backward pass: per layer, for each of the
    T*k routed pairs, a copy of its expert's gate_up (2I x H) and down (H x I) matrices (float32)."""
    m = moe.config.moe
    pairs = args.batch * args.seq_len * m["top_k"]
    per_pair = 3 * m["expert_size"] * moe.config.hidden_size
    return 4 * pairs * per_pair * moe.config.num_hidden_layers


def available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62


def time_plain_loop(model, ids: torch.Tensor, steps: int, warmup: int) -> list[float]:
    """A plain transformers training loop: loss (with the router aux loss), backward, AdamW."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_moeforge_step(model, tokenizer, args, steps: int, warmup: int) -> list[float]:
    """The moeforge trainer's own step on built-in prose packed at the benchmark's shape."""
    from moeforge.train import Trainer, load_config

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            {
                "model": "benchmark",
                "output_dir": out,
                "data": [{"name": "prose", "builtin": "prose", "max_tokens": (warmup + steps + 2) * args.batch * args.seq_len * 2}],
                "steps": warmup + steps,
                "batch_size": args.batch,
                "seq_len": args.seq_len,
                "lr": 1e-5,
                "warmup_steps": 0,
                "progress": False,
                "plots": False,
                "precision": "fp32",
            }
        )
        trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
        trainer._setup()
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", help="converted MoE checkpoint (default: convert smollm2 in memory)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--force", action="store_true", help="run batched_mm even when it would not fit in memory")
    ap.add_argument("--impls", default="eager,batched_mm,grouped_mm", help="transformers experts implementations to try")
    args = ap.parse_args()

    from moeforge.eval.report import device_description

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = moeforge.load_tokenizer("smollm2")
    tokens = args.batch * args.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (args.batch, args.seq_len), generator=g)
    rows = []

    def record(name, times, model):
        med = statistics.median(times)
        counts = parameter_counts(model)
        rows.append({"name": name, "s": med, "tps": tokens / med, "active": counts["active"], "flops": flops_per_token(model, args.seq_len)})
        print(f"  {name:<34} {med:7.2f} s/step  {tokens / med:8.1f} tokens/s", flush=True)

    print(f"device: {device_description()}, threads {torch.get_num_threads()}; batch {args.batch} x {args.seq_len} tokens, "
          f"median of {args.steps} steps after {args.warmup} warm-up", flush=True)

    moe = moeforge_moe(args)
    # sanity: the Mixtral copy computes the same logits
    mix = to_mixtral(moe, "eager")
    with torch.no_grad():
        moe.eval(), mix.eval()
        diff = (moe(ids[:1, :32]).logits - mix(ids[:1, :32]).logits).abs().max().item()
    print(f"Mixtral copy vs moeforge logits: max |diff| = {diff:.2e}", flush=True)
    del mix

    moe_state = {k: v.clone() for k, v in moe.state_dict().items()}  # the Mixtral copies start from the untrained weights
    record("moeforge MoE (trainer step)", time_moeforge_step(moe, tok, args, args.steps, args.warmup), moe)
    moe.load_state_dict(moe_state)
    moe.zero_grad(set_to_none=True)
    del moe_state
    best = None
    for impl in [s for s in args.impls.split(",") if s]:
        if impl == "batched_mm" and not args.force:
            need, avail = batched_mm_bytes(moe, args), available_bytes()
            if need > 0.5 * avail:
                print(f"  transformers Mixtral (batched_mm): skipped: it gathers one expert weight matrix per routed token "
                      f"and keeps them for the backward pass, ~{need / 2**30:.0f} GiB here vs {avail / 2**30:.0f} GiB "
                      "available (--force runs it anyway)", flush=True)
                continue
        mix = to_mixtral(moe, impl)
        try:
            record(f"transformers Mixtral ({impl})", time_plain_loop(mix, ids, args.steps, args.warmup), mix)
        except Exception as err:  # an implementation transformers cannot run here
            print(f"  transformers Mixtral ({impl}): failed: {type(err).__name__}: {err}")
            continue
        finally:
            del mix
            gc.collect()
        if best is None or rows[-1]["s"] < best["s"]:
            best = rows[-1]
    del moe
    gc.collect()

    dense = moeforge.load("smollm2")
    record("dense SmolLM2 (trainer step)", time_moeforge_step(dense, tok, args, args.steps, args.warmup), dense)
    dense_plain = time_plain_loop(dense, ids, args.steps, args.warmup)
    record("dense SmolLM2 (plain loop)", dense_plain, dense)

    ours, dense_row = rows[0], rows[-2]
    print("\nsummary")
    if best is not None:
        print(f"  moeforge / best transformers Mixtral ({best['name']}): {best['s'] / ours['s']:.2f}x  (goal >= 1.3x)")
    print(f"  MoE step speed-up over dense (same trainer step): {dense_row['s'] / ours['s']:.2f}x; "
          f"dense / MoE FLOPs per token: {dense_row['flops'] / ours['flops']:.2f}x "
          f"(active parameters {ours['active']:,} vs {dense_row['active']:,})")


if __name__ == "__main__":
    main()
