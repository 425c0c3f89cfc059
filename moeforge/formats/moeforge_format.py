"""moeforge's own format: the layout ``MoeforgeForCausalLM.save_pretrained`` writes.

Holds every converted model exactly (any router, shared experts, per-layer output scales in
``moe_overrides``, dense layers). ``import moeforge`` registers the classes with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(DIR)`` opens it after that import; no
``trust_remote_code`` is involved. Keys: see :mod:`moeforge.models.modeling_moeforge`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..convert.streaming import PlanEntry
from .export import DenseLayerWeights, Exporter, ExportSpec, MoELayerWeights, config_to_dict
from .registry import EXPORTERS

ROUTER = "model.layers.{i}.mlp.router.{name}"
GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"
DOWN = "model.layers.{i}.mlp.experts.down_proj"
SHARED = "model.layers.{i}.mlp.shared_experts.{p}_proj.weight"
DENSE = "model.layers.{i}.mlp.{p}_proj.weight"


class MoeforgeExporter(Exporter):
    name = "moeforge"
    fold_scale = False
    plain_transformers = False

    def unsupported(self, spec: ExportSpec) -> str | None:
        return None

    def attention_biases(self, spec: ExportSpec) -> tuple[bool, bool]:
        # LLaMA attention with attention_bias=True has all four biases (Qwen2's o_proj bias is zero)
        biased = bool(spec.config.attention_bias)
        return biased, biased

    def ffn_plan(self, spec: ExportSpec, i: int) -> list[PlanEntry]:
        h, dt = spec.hidden, spec.dtype
        if not spec.is_moe(i):
            inter = spec.config.intermediate_size
            return [PlanEntry(DENSE.format(i=i, p=p), s, dt) for p, s in
                    (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter)))]
        e, m, sw = spec.num_experts, spec.expert_size, spec.shared_width
        out = [PlanEntry(ROUTER.format(i=i, name=n), shape, torch.float32) for n, shape in spec.router_state.items()]
        out.append(PlanEntry(GATE_UP.format(i=i), (e, 2 * m, h), dt))
        out.append(PlanEntry(DOWN.format(i=i), (e, h, m), dt))
        if sw:
            out.append(PlanEntry(SHARED.format(i=i, p="gate"), (sw, h), dt))
            out.append(PlanEntry(SHARED.format(i=i, p="up"), (sw, h), dt))
            out.append(PlanEntry(SHARED.format(i=i, p="down"), (h, sw), dt))
        return out

    def ffn_tensors(self, spec: ExportSpec, i: int, weights) -> list[tuple[str, torch.Tensor]]:
        dt = spec.dtype
        if isinstance(weights, DenseLayerWeights):
            return [(DENSE.format(i=i, p="gate"), weights.gate.to(dt)), (DENSE.format(i=i, p="up"), weights.up.to(dt)),
                    (DENSE.format(i=i, p="down"), weights.down.to(dt))]
        w: MoELayerWeights = weights
        state = {"weight": w.router, **w.router_extra}
        out = [(ROUTER.format(i=i, name=n), state[n].float()) for n in spec.router_state]
        out.append((GATE_UP.format(i=i), w.gate_up.to(dt)))
        out.append((DOWN.format(i=i), w.down.to(dt)))
        if spec.shared_width:
            out.append((SHARED.format(i=i, p="gate"), w.shared_gate.to(dt)))
            out.append((SHARED.format(i=i, p="up"), w.shared_up.to(dt)))
            out.append((SHARED.format(i=i, p="down"), w.shared_down.to(dt)))
        return out

    def config_dict(self, spec: ExportSpec, scales: dict[int, float]) -> dict[str, Any]:
        return config_to_dict(final_moeforge_config(spec, scales), spec.dtype, "MoeforgeForCausalLM")

    def load(self, directory, dtype: torch.dtype = torch.float32):
        from ..models import MoeforgeForCausalLM

        return MoeforgeForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True).eval()


def final_moeforge_config(spec: ExportSpec, scales: dict[int, float]):
    """The converted model's MoeforgeConfig with its output scales: one global value, or per layer."""
    from ..models.configuration_moeforge import MoeforgeConfig

    cfg = spec.config.to_dict()
    for k in ("architectures", "transformers_version", "model_type", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    moe = dict(cfg["moe"])
    values = set(scales.values())
    overrides = dict(cfg.get("moe_overrides") or {})
    if len(values) == 1:
        moe["output_scale"] = float(values.pop())
    elif values:
        for i, s in scales.items():
            overrides.setdefault(str(i), {})["output_scale"] = float(s)
    cfg["moe"] = moe
    cfg["moe_overrides"] = overrides or None
    return MoeforgeConfig(**cfg)


EXPORTERS["moeforge"] = MoeforgeExporter()
