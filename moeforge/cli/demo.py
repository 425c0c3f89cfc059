"""``moeforge demo``: convert the real model into an MoE and compare it with the dense one (what ``make demo`` runs)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        model: str = typer.Option("smollm2", help="Dense model path or alias."),
        out: str = typer.Option("runs/demo/smollm2-moe", help="Where the converted model is written (replaced)."),
        experts: int = typer.Option(8, help="Routed experts per layer."),
        top_k: int = typer.Option(2, "--top-k", help="Experts per token."),
        method: str = typer.Option("coactivation", help="Expert construction (see moeforge convert --help)."),
        gate_init: str = typer.Option("activation", "--gate-init", help="Router initialisation."),
        rescale: str = typer.Option("fit", help="Output scale of the routed experts."),
        refine: str = typer.Option("down", help="Layer-wise refinement: none, router, down, router+down, all."),
        calibration_tokens: int = typer.Option(8192, "--calibration-tokens", help="Calibration tokens."),
        max_tokens: int = typer.Option(4096, help="Held-out tokens used for perplexity."),
        prompt: str = typer.Option("What is a mixture of experts in machine learning?", help="Chat prompt."),
        new_tokens: int = typer.Option(48, help="Tokens to generate."),
    ) -> None:
        """Convert MODEL into an MoE, export it, and print the dense-vs-MoE table and a reply from each."""
        from ..recipes.demo import run_demo

        run_demo(model=model, out=out, experts=experts, top_k=top_k, method=method, gate_init=gate_init,
                 rescale=rescale, refine=refine, calibration_tokens=calibration_tokens, max_tokens=max_tokens, prompt=prompt,
                 new_tokens=new_tokens)
