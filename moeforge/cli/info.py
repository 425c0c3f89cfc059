"""``moeforge info MODEL``: what a model is, its size and, for MoE models, its routing setup."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import typer

#: MoE settings the layout line of ``moeforge info`` already shows
_SHOWN = ("num_experts", "expert_size", "top_k", "router", "num_shared_experts", "shared_expert_gate")


def other_settings(moe: dict[str, Any]) -> dict[str, Any]:
    """The MoE settings besides those on the layout line that differ from :class:`MoEConfig`'s
    defaults. A moeforge-format checkpoint records every setting (and the conversion's record in
    ``extra``), an imported Mixtral or Qwen2-MoE only a few: listing the non-default ones reads
    the same for both."""
    from ..moe.config import MoEConfig

    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig) if f.default is not dataclasses.MISSING}
    return {k: v for k, v in moe.items()
            if k not in _SHOWN and k != "extra" and (k not in defaults or v != defaults[k])}


def register(app: typer.Typer) -> None:
    @app.command("info")
    def info(
        model: str = typer.Argument(..., metavar="MODEL", help="Model path, GGUF file or alias (smollm2)."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle (.bin) checkpoints."),
    ) -> None:
        """Load MODEL and print its class, parameter counts and MoE layout."""
        from ..loading import load_trained, trained_parts
        from ..eval.cost import parameter_counts

        m = load_trained(model, allow_pickle=allow_pickle)
        counts = parameter_counts(m)
        report = {"model": model, "class": type(m).__name__, "parameters": counts}
        parts = trained_parts(model)
        if parts is not None:
            report[parts[0]] = {"base": parts[1]}
        moe = getattr(m.config, "moe", None)
        if moe:
            report["moe"] = moe
            report["moe_layers"] = m.config.moe_layers
        if as_json:
            print(json.dumps(report))
            return
        print(f"{model}: {report['class']}")
        print(f"  parameters: {counts['total']:,} total, {counts['active']:,} active per token")
        if parts is not None:
            print(f"  {parts[0]} weights on {'the anchor ' if parts[0] == 'composition' else ''}{parts[1]}")
        if moe:
            n = m.config.num_hidden_layers
            layers = list(range(n)) if m.config.moe_layers is None else list(m.config.moe_layers)
            where = "all" if len(layers) == n else (", ".join(map(str, layers)) or "none")
            shared = moe.get("num_shared_experts") or 0
            print(f"  MoE layers: {where} (of {n}); {moe['num_experts']} experts of width {moe['expert_size']}, "
                  f"top-{moe['top_k']}, router {moe.get('router', 'topk')}"
                  + (f", {shared} shared expert(s)" + (" (gated)" if moe.get("shared_expert_gate") else "") if shared else ""))
            rest = other_settings(moe)
            if rest:
                print("  MoE settings: " + ", ".join(f"{k}={v}" for k, v in rest.items()))
