"""Tokens/s of a full training step (forward, loss, backward, AdamW step) on the converted SmolLM2 MoE.

Compares, in one run and on the same batch shape:

* ``moeforge``: the moeforge trainer's own step (:meth:`moeforge.train.Trainer.train_step`: batch
  assembly from the packed data, next-token loss + router aux loss, clipping, AdamW, bias updates);
* ``transformers mixtral/<impl>``: the same MoE weights in transformers' ``MixtralForCausalLM``
  (router aux loss on, ``output_router_logits=True``), trained with a plain loop, for every
  experts implementation transformers offers (eager, batched_mm, grouped_mm); the best counts;
* ``dense``: the dense SmolLM2 through the same moeforge step.

The moeforge trainer steps take its ``attention`` setting (``--attention``, default auto: the
block-causal attention of :mod:`moeforge.models.attention` on the CPU); ``--attention-ab`` adds a
copy of the MoE in the same trainer with ``attention: model`` (transformers' SDPA), so the
attention's share of the speed-up is measured in the same rotation.

Every contender is built first (the machine holds all their weights and optimiser states at once,
about 2.2 GB each for SmolLM2's size in float32) and, after ``--warmup`` steps each, they take one
timed step each in turn for ``--steps`` rounds, so a change in the machine's load during the run
reaches them all alike. Prints one table and the ratios the training issue sets as goals: moeforge's speed-up over the
best transformers implementation (its step time / moeforge's, goal >= 1.3) and the MoE's speed-up
over dense next to its active-FLOPs ratio.

    .venv/bin/python benchmarks/train_step.py                                   # converts smollm2 in memory
    .venv/bin/python benchmarks/train_step.py --moe runs/smollm2-moe-8x2 --threads 1 --batch 2 --seq-len 256
    python benchmarks/train_step.py --dense-config DIR --device cuda --precision bf16 --steps 20 --warmup 3

``--dense-config DIR`` (a config.json and tokenizer files, e.g. written by ``--save-dense-config``)
builds a randomly initialised model of that shape instead of loading SmolLM2's GGUF, for machines
without it: step time does not depend on the weights' values. On a GPU every contender runs in the
same precision (``--precision bf16``: bf16 autocast over float32 weights, the trainer's setting).
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
import time

import torch

import moeforge
from moeforge.eval.cost import flops_per_token, parameter_counts
from _args import positive_int  # noqa: E402  (benchmarks/ is on sys.path when run)


def dense_model(args):
    if args.dense_config:
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(args.dense_config)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return moeforge.load("smollm2")


def moeforge_moe(args, tok):
    if args.moe:
        return moeforge.load(args.moe)
    source = dense_model(args) if args.dense_config else "smollm2"
    report = moeforge.convert(source, None, tokenizer=tok, experts=args.experts, top_k=args.top_k, method="random",
                              verify=False, eval_tokens=0)
    return report.model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        # transformers' one loss over all layers = moeforge's per-layer sum / layers (see formats.export)
        router_aux_loss_coef=(1e-3 if m.get("aux_loss_coef") is None else m["aux_loss_coef"]) * c.num_hidden_layers,
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


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62


class Contender:
    """One contender's training step, ready to be called: ``step()`` runs one full step."""

    def __init__(self, name: str, model, step, cleanup=None) -> None:
        self.name, self.model, self.step, self.cleanup = name, model, step, cleanup
        self.times: list[float] = []


def plain_loop(name: str, model, ids: torch.Tensor, precision: str) -> Contender:
    """A plain transformers training loop: loss (with the router aux loss), backward, clipping, fused
    AdamW (transformers' Trainer default ``adamw_torch_fused``, and what the moeforge trainer runs,
    on the CPU as on a GPU; same betas and weight decay as the trainer's defaults), under bf16
    autocast when ``precision`` is bf16."""
    device = ids.device
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1e-5, betas=(0.9, 0.95),
                            fused=device.type in ("cpu", "cuda"))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Contender(name, model, step)


def moeforge_trainer(name: str, model, tokenizer, args, attention: str | None = None) -> tuple[Contender, torch.Tensor]:
    """The moeforge trainer's own step on built-in prose packed at the benchmark's shape. Returns the
    contender and a (batch, seq_len) batch of that prose (full blocks), for the plain loops to train
    on the same kind of tokens: routing, hence the experts' load, depends on the tokens."""
    from moeforge.train import Trainer, load_config

    total = args.warmup + args.steps
    out = tempfile.mkdtemp(prefix="moeforge-bench-")
    cfg = load_config(
        {
            "model": "benchmark",
            "output_dir": out,
            "data": [{"name": "prose", "builtin": "prose", "max_tokens": (total + 2) * args.batch * args.seq_len * 2}],
            "steps": total,
            "batch_size": args.batch,
            "seq_len": args.seq_len,
            "lr": 1e-5,
            "warmup_steps": 0,
            "progress": False,
            "plots": False,
            "precision": args.precision,
            "attention": attention or args.attention,
        }
    )
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer)
    trainer._setup()
    blocks = trainer.domains[0].train
    full = [i for i in range(len(blocks)) if int(blocks.lengths[i]) == args.seq_len][: args.batch]
    if len(full) < args.batch:
        shutil.rmtree(out, ignore_errors=True)
        raise SystemExit(f"the built-in prose holds {len(full)} full blocks of {args.seq_len} tokens, fewer than --batch {args.batch}")
    prose = blocks.batch(full, trim=False)[0]
    return Contender(name, model, trainer.train_step, cleanup=lambda: shutil.rmtree(out, ignore_errors=True)), prose


def run_in_rotation(contenders: list[Contender], steps: int, warmup: int, device: torch.device) -> list[Contender]:
    """Warm every contender up, then time one step of each in turn, ``steps`` rounds: a change in the
    machine's load during the run then reaches every contender alike instead of whichever ran at
    the time. A contender that fails (an implementation transformers cannot run here) is reported
    and dropped; the others go on."""
    alive = []
    for c in contenders:
        try:
            for _ in range(warmup):
                c.step()
            sync(device)
        except Exception as err:
            print(f"  {c.name}: failed: {type(err).__name__}: {err}", flush=True)
            continue
        alive.append(c)
    for _ in range(steps):
        for c in alive:
            sync(device)
            t0 = time.perf_counter()
            c.step()
            sync(device)
            c.times.append(time.perf_counter() - t0)
    return alive


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moe", help="converted MoE checkpoint (default: convert smollm2 in memory)")
    ap.add_argument("--experts", type=positive_int, default=8)
    ap.add_argument("--top-k", type=positive_int, default=2)
    ap.add_argument("--batch", type=positive_int, default=2)
    ap.add_argument("--seq-len", type=positive_int, default=256)
    ap.add_argument("--steps", type=positive_int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps per contender first (the allocator settles over the first two: "
                         "the first step of a run page-faults its activations in)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--force", action="store_true", help="run batched_mm even when it would not fit in memory")
    ap.add_argument("--impls", default="eager,batched_mm,grouped_mm", help="transformers experts implementations to try")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="fp32, or bf16 autocast over float32 weights (default: bf16 on a GPU, fp32 on the CPU)")
    ap.add_argument("--attention", choices=["auto", "blocked", "model"], default="auto",
                    help="the moeforge trainer's attention setting (auto: its block-causal attention on the CPU)")
    ap.add_argument("--attention-ab", action="store_true",
                    help="also time a copy of the MoE in the moeforge trainer with attention: model (transformers' SDPA)")
    ap.add_argument("--dense-config", help="directory with config.json + tokenizer: random weights of that shape, no GGUF")
    ap.add_argument("--save-dense-config", metavar="DIR", help="write SmolLM2's config and tokenizer to DIR and exit")
    args = ap.parse_args()
    unknown = [i for i in args.impls.split(",") if i and i not in ("eager", "batched_mm", "grouped_mm")]
    if unknown:
        ap.error(f"--impls: unknown experts implementation(s) {', '.join(unknown)}; choose from eager, batched_mm, grouped_mm")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    device = torch.device(args.device)
    if args.save_dense_config:
        dense = dense_model(args)
        dense.config.save_pretrained(args.save_dense_config)
        moeforge.load_tokenizer("smollm2").save_pretrained(args.save_dense_config)
        print(f"wrote SmolLM2's config and tokenizer to {args.save_dense_config}")
        return

    from moeforge.eval.report import device_description

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.dense_config:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.dense_config)
    else:
        tok = moeforge.load_tokenizer("smollm2")
    tokens = args.batch * args.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tok), (args.batch, args.seq_len), generator=g).to(device)
    rows = []

    def record(name, times, model):
        med = statistics.median(times)
        counts = parameter_counts(model)
        rows.append({"name": name, "s": med, "tps": tokens / med, "active": counts["active"], "flops": flops_per_token(model, args.seq_len)})
        print(f"  {name:<34} {med:8.4f} s/step  {tokens / med:10.1f} tokens/s", flush=True)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device_description()
    print(f"device: {where}, threads {torch.get_num_threads()}, precision {args.precision}; batch {args.batch} x "
          f"{args.seq_len} tokens, median of {args.steps} steps after {args.warmup} warm-up", flush=True)

    moe = moeforge_moe(args, tok)
    # sanity: the Mixtral copy computes the same logits
    mix = to_mixtral(moe, "eager")
    with torch.no_grad():
        moe.eval(), mix.eval()
        probe = ids[:1, :32].cpu()
        ref = moe(probe).logits
        diff = (ref - mix(probe).logits).abs().max().item()
        scale = ref.abs().max().item()
    print(f"Mixtral copy vs moeforge logits: max |diff| = {diff:.2e} (logits up to {scale:.1f})", flush=True)
    if not diff <= 1e-4 * scale:  # float32 sums in another order over 30 layers: ~1e-5 of the logits' scale
        raise SystemExit("the Mixtral copy does not compute the moeforge model's logits; the comparison would be meaningless")
    del mix

    # every contender is built first and they then run in rotation, one step each; the Mixtral
    # copies take the MoE's untrained weights (to_mixtral copies them) before the trainer moves them
    copies = []
    for impl in [s for s in args.impls.split(",") if s]:
        if impl == "batched_mm" and not args.force:
            need, avail = batched_mm_bytes(moe, args), available_bytes(device)
            if need > 0.5 * avail:
                print(f"  transformers Mixtral (batched_mm): skipped: it gathers one expert weight matrix per routed token "
                      f"and keeps them for the backward pass, ~{need / 2**30:.0f} GiB here vs {avail / 2**30:.0f} GiB "
                      "available (--force runs it anyway)", flush=True)
                continue
        copies.append((impl, to_mixtral(moe, impl)))
    moe_sdpa = copy.deepcopy(moe) if args.attention_ab else None
    contenders: list[Contender] = []
    try:  # the trainers' scratch output directories go whatever happens
        ours, prose = moeforge_trainer("moeforge MoE (trainer step)", moe, tok, args)
        contenders.append(ours)
        if moe_sdpa is not None:
            contenders.append(moeforge_trainer("moeforge MoE (attention: model)", moe_sdpa, tok, args, "model")[0])
            del moe_sdpa
        ids = prose.to(device)  # the plain loops train on the trainer's prose, not on uniformly random ids
        contenders += [plain_loop(f"transformers Mixtral ({impl})", mix, ids, args.precision) for impl, mix in copies]
        del copies
        dense = dense_model(args)
        dense_ours, _ = moeforge_trainer("dense SmolLM2 (trainer step)", dense, tok, args)
        # the plain loop gets its own copy: the trainer switched its model's attention implementation
        contenders += [dense_ours, plain_loop("dense SmolLM2 (plain loop)", dense_model(args), ids, args.precision)]
        alive = run_in_rotation(contenders, args.steps, args.warmup, device)
    finally:
        for c in contenders:
            if c.cleanup is not None:
                c.cleanup()
    for c in alive:
        record(c.name, c.times, c.model)
    names = [r["name"] for r in rows]
    if ours.name not in names or dense_ours.name not in names:
        raise SystemExit("the moeforge trainer failed on the MoE or the dense model; no ratios to report")
    hf = [r for r in rows if r["name"].startswith("transformers Mixtral")]
    best = min(hf, key=lambda r: r["s"]) if hf else None
    ours, dense_row = rows[names.index(ours.name)], rows[names.index(dense_ours.name)]
    print("\nsummary")
    if best is not None:
        print(f"  speed-up over the best transformers Mixtral ({best['name']}; its time / moeforge's): "
              f"{best['s'] / ours['s']:.2f}x  (goal >= 1.3x)")
    print(f"  MoE step speed-up over dense (same trainer step): {dense_row['s'] / ours['s']:.2f}x; "
          f"dense / MoE FLOPs per token: {dense_row['flops'] / ours['flops']:.2f}x "
          f"(active parameters {ours['active']:,} vs {dense_row['active']:,})")


if __name__ == "__main__":
    main()
