"""``moeforge convert MODEL --out DIR``: dense model -> MoE checkpoint (thin wrapper over moeforge.convert)."""

from __future__ import annotations

import sys
import time

import typer


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        model: str = typer.Argument(..., metavar="MODEL", help="Dense model: checkpoint directory, GGUF file or alias (smollm2)."),
        out: str = typer.Option(..., "--out", "-o", help="Output directory (must not exist unless --overwrite)."),
        method: str = typer.Option("random", help="random, cluster, coactivation, importance, upcycle, granular-upcycle, "
                                   "or merge (experts = the FFNs of the --expert-model models)."),
        experts: int = typer.Option(None, "--experts", "-e", show_default=False,
                                    help="Routed experts per layer (E). [default: 8; merge: one per --expert-model]"),
        top_k: int = typer.Option(2, "--top-k", "-k", help="Experts per token (k); expert_choice ignores it (see --router-option capacity_factor=C)."),
        shared_experts: int = typer.Option(0, "--shared-experts", help="Always-on shared experts (split methods)."),
        router: str = typer.Option("topk", help="Router: topk, noisy_topk, switch, expert_choice, sigmoid_bias."),
        rescale: str = typer.Option("auto", help="auto (E/k for split methods), none, layerwise, fit, or a number."),
        gate_init: str = typer.Option("random", "--gate-init", help="random, uniform, centroid, activation, or domain "
                                      "(merge: fitted to send each --expert-data text to its expert)."),
        refine: str = typer.Option("none", help="Layer-wise local distillation: none, router, down, router+down, all."),
        refine_steps: int = typer.Option(None, "--refine-steps", help="Optimiser steps per layer for --refine router, router+down or all (default 200)."),
        refine_lr: float = typer.Option(None, "--refine-lr", help="Learning rate for --refine (default 3e-3 router only, 1e-4 with experts)."),
        layers: str = typer.Option("all", help="Layers to convert, e.g. '0-11' or '0,2,4'; default all."),
        fmt: str = typer.Option("auto", "--format", help="auto, mixtral, qwen2_moe or moeforge."),
        seed: int = typer.Option(0, help="Seed for shuffles, k-means and router init."),
        calibration: str = typer.Option(None, help="Calibration text: prose, code, arithmetic (join with +) or a .txt/.jsonl file."),
        calibration_tokens: int = typer.Option(8192, "--calibration-tokens", help="Calibration tokens for data-driven steps."),
        calibration_seq_len: int = typer.Option(256, "--calibration-seq-len", help="Window length of the calibration sequences."),
        kmeans_iters: int = typer.Option(None, "--kmeans-iters", help="cluster/coactivation: balanced k-means iterations (default 20)."),
        normalize_weights: bool = typer.Option(
            True, "--normalize-weights/--no-normalize-weights",
            help="Renormalise the k routing weights to sum to 1 (Mixtral); --no-normalize-weights keeps the raw softmax mass (Qwen-MoE)."),
        router_option: list[str] = typer.Option(
            None, "--router-option", metavar="KEY=VALUE",
            help="Another MoE layer setting, e.g. aux_loss_coef=0.01, capacity_factor=1.25, z_loss_coef=1e-3; repeat for several."),
        granularity: int = typer.Option(None, help="granular-upcycle: parts per dense FFN (G, default 2)."),
        upcycle_noise: float = typer.Option(0.0, "--upcycle-noise", help="upcycle: relative noise std on expert copies."),
        upcycle_reinit: float = typer.Option(0.0, "--upcycle-reinit", help="upcycle: fraction of neurons re-initialised."),
        expert_model: list[str] = typer.Option(
            None, "--expert-model", metavar="MODEL",
            help="merge: a model whose FFNs become one expert (same architecture as MODEL, e.g. a fine-tune of it); "
            "repeat once per expert, in order."),
        merge_shared: str = typer.Option(
            "base", "--merge-shared",
            help="merge: attention, norms, embeddings and head from MODEL (base) or the mean of the expert models (average)."),
        expert_data: list[str] = typer.Option(
            None, "--expert-data", metavar="TEXT",
            help="--gate-init domain: each expert's text (prose, code, arithmetic or a .txt/.jsonl file); repeat once per expert."),
        dtype: str = typer.Option(None, help="Output dtype: float32, bfloat16, float16 (default: the model's)."),
        max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Largest safetensors shard written (e.g. 500MB)."),
        eval_tokens: int = typer.Option(4096, "--eval-tokens", help="Held-out tokens for dense vs MoE perplexity (0 skips)."),
        verify: str = typer.Option(
            "auto", help="Check the export before reporting success: auto (whole model up to 4 GiB in float32, else its "
            "first layer, or up to the first converted one with --layers), full, layers, or off (no check and no dense-vs-MoE perplexity: saves the memory and time "
            "they take)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier moeforge conversion at --out (only once the new one is complete and verified; never the input model or other folders)."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept a pickle-only (.bin) dense checkpoint."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    ) -> None:
        """Convert a dense LLaMA/Mistral/Qwen2/SmolLM model into a Mixture-of-Experts model and export it."""
        from ..convert.api import convert as run_convert
        from ..errors import MoeforgeError
        from ..train.config import parse_value
        from . import sigterm_as_interrupt

        options = {}
        for item in router_option or ():
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise MoeforgeError(f"--router-option {item!r} is not KEY=VALUE (e.g. --router-option aux_loss_coef=0.01).")
            options[key.strip()] = parse_value(text.strip())
        start = time.perf_counter()

        def progress(message: str) -> None:
            if not quiet:
                print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

        with sigterm_as_interrupt():  # a killed conversion removes its temporary directory, as after Ctrl-C
            report = run_convert(
                model,
                out,
                overwrite=overwrite,
                allow_pickle=allow_pickle,
                verify={"auto": True, "off": False}.get(verify, verify),
                eval_tokens=eval_tokens,
                progress=progress,
                method=method,
                experts=experts,
                top_k=top_k,
                shared_experts=shared_experts,
                router=router,
                rescale=rescale,
                gate_init=gate_init,
                refine=refine,
                refine_steps=refine_steps,
                refine_lr=refine_lr,
                layers=layers,
                format=fmt,
                seed=seed,
                calibration=calibration,
                calibration_tokens=calibration_tokens,
                calibration_seq_len=calibration_seq_len,
                kmeans_iters=kmeans_iters,
                normalize_weights=normalize_weights,
                router_options=options,
                max_shard_size=max_shard_size,
                granularity=granularity,
                upcycle_noise=upcycle_noise,
                upcycle_reinit=upcycle_reinit,
                dtype=dtype,
                expert_models=expert_model or None,
                merge_shared=merge_shared,
                expert_data=expert_data or None,
            )
        print(f"wrote {report.out} (format {report.format}) in {report.seconds.get('total', 0):.1f}s")
        if report.verification:
            v = report.verification
            scope = "" if v.get("whole_model", True) else f" (first {v['layers_compared']} layer(s) only)"
            print(f"verified: {v['tensors_checked']} tensors re-read, reloaded with {v['loaded_with']}{scope}, "
                  f"max |logit difference| {v['max_abs_logit_diff']:.2e} over {v['tokens']} tokens")
        print(report.summary())
