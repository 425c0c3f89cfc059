"""``moeforge demo``: the main job on the real model and embedded text (what ``make demo`` runs)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        model: str = typer.Option("smollm2", help="Model path or alias."),
        max_tokens: int = typer.Option(4096, help="Held-out tokens used for perplexity."),
        prompt: str = typer.Option("What is a mixture of experts in machine learning?", help="Chat prompt."),
        new_tokens: int = typer.Option(48, help="Tokens to generate."),
    ) -> None:
        """Load MODEL, report its size and held-out perplexity, and generate a reply."""
        from ..recipes.demo import run_demo

        run_demo(model=model, max_tokens=max_tokens, prompt=prompt, new_tokens=new_tokens)
