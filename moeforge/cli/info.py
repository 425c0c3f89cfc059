"""``moeforge info MODEL``: what a model is, its size and, for MoE models, its routing setup."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        model: str = typer.Argument(..., help="Model path, GGUF file or alias (smollm2)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle (.bin) checkpoints."),
    ) -> None:
        """Load MODEL and print its class, parameter counts and MoE layout."""
        from ..loading import load
        from ..eval.cost import parameter_counts

        m = load(model, allow_pickle=allow_pickle)
        counts = parameter_counts(m)
        report = {"model": model, "class": type(m).__name__, "parameters": counts}
        moe = getattr(m.config, "moe", None)
        if moe:
            report["moe"] = moe
            report["moe_layers"] = m.config.moe_layers
        if as_json:
            print(json.dumps(report))
            return
        print(f"{model}: {report['class']}")
        print(f"  parameters: {counts['total']:,} total, {counts['active']:,} active per token")
        if moe:
            print(f"  MoE: {json.dumps(moe)}")
