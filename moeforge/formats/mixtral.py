"""Mixtral checkpoints <-> moeforge models: the explicit weight-key table and config mapping.

On disk, transformers (v4 and v5) and vLLM store Mixtral experts per expert:

==================================================================  ================================
Mixtral key (layer i, expert e)                                     moeforge tensor
==================================================================  ================================
model.layers.{i}.block_sparse_moe.gate.weight        (E, H)         model.layers.{i}.mlp.router.weight
model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight  (I, H)     ...mlp.experts.gate_up_proj[e, :I]   (gate)
model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight  (I, H)     ...mlp.experts.gate_up_proj[e, I:]   (up)
model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight  (H, I)     ...mlp.experts.down_proj[e]
==================================================================  ================================

The stacked in-memory layout of transformers v5 (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``
(E, 2I, H), ``mlp.experts.down_proj`` (E, H, I)) is accepted too. Every other key (embeddings,
attention, norms, ``lm_head``) is identical to LLaMA's and maps to itself.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import MoeforgeError
from ..models.configuration_moeforge import MoeforgeConfig
from ..models.build import model_from_state
from ..models.modeling_moeforge import MoeforgeForCausalLM
from ..convert.streaming import PlanEntry
from .export import LLAMA_FIELDS, Exporter, ExportSpec, MoELayerWeights, config_to_dict, llama_fields, moeforge_aux_loss_coef
from .export import checked_moeforge_config, parse_hf_config
from .registry import EXPORTERS, register_importer

ROUTER = "model.layers.{i}.block_sparse_moe.gate.weight"
EXPERT_W = "model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"
STACKED_ROUTER = "model.layers.{i}.mlp.gate.weight"
STACKED_GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"
STACKED_DOWN = "model.layers.{i}.mlp.experts.down_proj"

MF_ROUTER = "model.layers.{i}.mlp.router.weight"
MF_GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"
MF_DOWN = "model.layers.{i}.mlp.experts.down_proj"

_LLAMA_FIELDS = LLAMA_FIELDS + ("sliding_window",)
#: MoE settings a Mixtral checkpoint holds (the rest must keep their defaults to export exactly)
MIXTRAL_HELD = frozenset({"num_experts", "top_k", "expert_size", "router", "normalize_weights", "aux_loss_coef",
                          "input_jitter", "glu", "activation", "num_shared_experts", "shared_expert_size"})


def moeforge_config_from_mixtral(cfg: dict[str, Any]) -> MoeforgeConfig:
    """Map a Mixtral ``config.json`` dict onto :class:`MoeforgeConfig` (top-k softmax, renormalised).

    The dict is parsed by transformers' ``MixtralConfig`` first, so Mixtral's own defaults apply
    to absent fields and older (transformers v4) files with ``rope_theta`` / ``rope_scaling`` get
    the same ``rope_parameters`` transformers would use.
    """
    from transformers import MixtralConfig

    if cfg.get("hidden_act", "silu") != "silu":
        raise MoeforgeError(f"Mixtral checkpoint uses hidden_act={cfg['hidden_act']!r}; only 'silu' experts are supported.")
    mc = parse_hf_config(MixtralConfig, cfg, "Mixtral")
    fields = {k: getattr(mc, k) for k in _LLAMA_FIELDS if getattr(mc, k, None) is not None}
    fields["head_dim"] = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    fields["intermediate_size"] = mc.intermediate_size
    fields["moe"] = {
        "num_experts": mc.num_local_experts,
        "top_k": mc.num_experts_per_tok,
        "expert_size": mc.intermediate_size,
        "router": "topk",
        "normalize_weights": True,
        "aux_loss_coef": moeforge_aux_loss_coef(mc.router_aux_loss_coef, mc.num_hidden_layers),
        "input_jitter": float(mc.router_jitter_noise or 0.0),
    }
    return checked_moeforge_config(fields, "Mixtral")


def mixtral_state_to_moeforge(get, keys: set[str], config: MoeforgeConfig) -> dict[str, torch.Tensor]:
    """Translate Mixtral tensors into moeforge's key space.

    Args:
        get: callable key -> tensor reading one tensor of the checkpoint.
        keys: every key in the checkpoint.
        config: the moeforge config built by :func:`moeforge_config_from_mixtral`.
    Returns:
        a full moeforge state dict (tied ``lm_head`` omitted when tied).
    Raises:
        MoeforgeError when an expected key is missing or a tensor has the wrong shape.
    """
    e_count = config.moe["num_experts"]
    inter = config.moe["expert_size"]
    hidden = config.hidden_size
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in keys:
            raise MoeforgeError(f"Mixtral checkpoint is missing tensor {key!r}; the checkpoint is incomplete.")
        t = get(key)
        if tuple(t.shape) != shape:
            raise MoeforgeError(f"Mixtral tensor {key!r} has shape {tuple(t.shape)}, expected {shape}.")
        used.add(key)
        return t

    for i in range(config.num_hidden_layers):
        if any(k.startswith(f"model.layers.{i}.block_sparse_moe.") for k in keys):  # per-expert layout
            out[MF_ROUTER.format(i=i)] = take(ROUTER.format(i=i), (e_count, hidden)).float()
            first = take(EXPERT_W.format(i=i, e=0, w="w1"), (inter, hidden))
            gate_up = torch.empty(e_count, 2 * inter, hidden, dtype=first.dtype)
            down = torch.empty(e_count, hidden, inter, dtype=gate_up.dtype)
            for e in range(e_count):
                gate_up[e, :inter] = first if e == 0 else take(EXPERT_W.format(i=i, e=e, w="w1"), (inter, hidden))
                gate_up[e, inter:] = take(EXPERT_W.format(i=i, e=e, w="w3"), (inter, hidden))
                down[e] = take(EXPERT_W.format(i=i, e=e, w="w2"), (hidden, inter))
            out[MF_GATE_UP.format(i=i)] = gate_up
            out[MF_DOWN.format(i=i)] = down
        else:
            out[MF_ROUTER.format(i=i)] = take(STACKED_ROUTER.format(i=i), (e_count, hidden)).float()
            out[MF_GATE_UP.format(i=i)] = take(STACKED_GATE_UP.format(i=i), (e_count, 2 * inter, hidden))
            out[MF_DOWN.format(i=i)] = take(STACKED_DOWN.format(i=i), (e_count, hidden, inter))
    moe_key = re.compile(r"model\.layers\.\d+\.(block_sparse_moe|mlp)\.")
    for key in keys:
        if key in used:
            continue
        if moe_key.match(key):
            raise MoeforgeError(f"unexpected Mixtral tensor {key!r}; this checkpoint is not a plain Mixtral model.")
        out[key] = get(key)
    return out


@register_importer("mixtral")
def load_mixtral(directory: Path, cfg: dict[str, Any], *, dtype: torch.dtype = torch.float32) -> MoeforgeForCausalLM:
    """Open a Mixtral checkpoint directory as a :class:`MoeforgeForCausalLM` (moeforge's MoE layer)."""
    from safetensors import safe_open

    from ..utils.io import check_safetensors, safetensors_files

    config = moeforge_config_from_mixtral(cfg)
    files = safetensors_files(directory)
    check_safetensors(files)
    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {k: h for h in handles for k in h.keys()}
    state = mixtral_state_to_moeforge(lambda k: where[k].get_tensor(k), set(where), config)
    return model_from_state(config, state, dtype=dtype)


# ---------------------------------------------------------------------------------------- export
class MixtralExporter(Exporter):
    """moeforge -> Mixtral: per-expert ``w1``/``w3``/``w2`` on disk, the layout transformers and vLLM read.

    Exact when every layer is MoE, routing is softmax top-k with renormalised weights (``topk``
    router, ``normalize_weights``), there are no shared experts and no attention biases; the
    output scale is folded into ``w2``.
    """

    name = "mixtral"
    fold_scale = True

    def unsupported(self, spec: ExportSpec) -> str | None:
        moe = spec.moe
        if spec.config.moe_layers is not None and len(set(spec.config.moe_layers)) < spec.num_layers:
            return "Mixtral has an MoE block in every layer, but only some layers were converted"
        if moe.get("router", "topk") != "topk":
            return f"Mixtral routes with softmax top-k; router {moe['router']!r} differs"
        if not moe.get("normalize_weights", True):
            return "Mixtral renormalises the top-k weights; normalize_weights=False differs"
        if moe.get("num_shared_experts", 0):
            return "Mixtral has no shared experts"
        if spec.qkv_bias or spec.o_bias:
            return "Mixtral attention has no biases (the dense model has attention biases)"
        if not moe.get("glu", True) or moe.get("activation", "silu") != "silu":
            return "Mixtral experts are SwiGLU (silu)"
        unheld = spec.unheld_settings(MIXTRAL_HELD)
        if unheld:
            return f"Mixtral's config has no field for {', '.join(unheld)}, which would be lost"
        return spec.grouped_mm_problem()

    def ffn_plan(self, spec: ExportSpec, i: int) -> list[PlanEntry]:
        e, m, h, dt = spec.num_experts, spec.expert_size, spec.hidden, spec.dtype
        out = [PlanEntry(ROUTER.format(i=i), (e, h), dt)]
        for x in range(e):
            out.append(PlanEntry(EXPERT_W.format(i=i, e=x, w="w1"), (m, h), dt))
            out.append(PlanEntry(EXPERT_W.format(i=i, e=x, w="w2"), (h, m), dt))
            out.append(PlanEntry(EXPERT_W.format(i=i, e=x, w="w3"), (m, h), dt))
        return out

    def ffn_tensors(self, spec: ExportSpec, i: int, weights) -> list[tuple[str, torch.Tensor]]:
        if not isinstance(weights, MoELayerWeights):
            raise TypeError("Mixtral export needs an MoE block in every layer")
        w = weights.folded()
        m, dt = spec.expert_size, spec.dtype
        out = [(ROUTER.format(i=i), w.router.to(dt))]
        for x in range(spec.num_experts):
            out.append((EXPERT_W.format(i=i, e=x, w="w1"), w.gate_up[x, :m].to(dt)))
            out.append((EXPERT_W.format(i=i, e=x, w="w2"), w.down[x].to(dt)))
            out.append((EXPERT_W.format(i=i, e=x, w="w3"), w.gate_up[x, m:].to(dt)))
        return out

    def config_dict(self, spec: ExportSpec, scales: dict[int, float]) -> dict[str, Any]:
        from transformers import MixtralConfig

        fields = llama_fields(spec.config)
        fields.update(
            intermediate_size=spec.expert_size,
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.moe["top_k"],
            router_aux_loss_coef=spec.hf_aux_loss_coef(),
            router_jitter_noise=float(spec.moe.get("input_jitter", 0.0)),
            sliding_window=spec.config.sliding_window,
        )
        return config_to_dict(MixtralConfig(**fields), spec.dtype, "MixtralForCausalLM")


EXPORTERS["mixtral"] = MixtralExporter()
