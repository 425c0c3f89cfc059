"""Qwen2-MoE checkpoints <-> moeforge models: the stock format that holds shared experts.

transformers' ``qwen2_moe`` block computes
``y = sum_{top-k} w_e E_e(x) + sigmoid(w_sg . x) * Shared(x)`` with one shared MLP of width
``shared_expert_intermediate_size``, optional renormalisation (``norm_topk_prob``), q/k/v
biases (``qkv_bias``) and dense layers listed in ``mlp_only_layers``. moeforge's shared experts
are ungated, so the export writes a zero gate row (sigmoid(0) = 0.5 exactly) and doubles the
shared ``down_proj`` (a power-of-two scaling, exact in floating point): the product is the
ungated shared output bit for bit.

Key table, layer i (e: expert), on disk as transformers writes it:

========================================================  =================================
Qwen2-MoE key                                             moeforge tensor
========================================================  =================================
model.layers.{i}.mlp.gate.weight              (E, H)      mlp.router.weight
model.layers.{i}.mlp.experts.{e}.gate_proj.weight (m, H)  mlp.experts.gate_up_proj[e, :m]
model.layers.{i}.mlp.experts.{e}.up_proj.weight   (m, H)  mlp.experts.gate_up_proj[e, m:]
model.layers.{i}.mlp.experts.{e}.down_proj.weight (H, m)  mlp.experts.down_proj[e]
model.layers.{i}.mlp.shared_expert.gate_proj.weight       mlp.shared_experts.gate_proj.weight
model.layers.{i}.mlp.shared_expert.up_proj.weight         mlp.shared_experts.up_proj.weight
model.layers.{i}.mlp.shared_expert.down_proj.weight       2 x mlp.shared_experts.down_proj.weight (ungated)
model.layers.{i}.mlp.shared_expert_gate.weight  (1, H)    zeros (ungated), mlp.shared_expert_gate.weight (gated)
model.layers.{i}.mlp.{gate,up,down}_proj.weight           same key (dense layers)
========================================================  =================================

Importing (``moeforge.load``) accepts only what moeforge represents exactly: full attention, every
layer MoE or listed in ``mlp_only_layers``. A checkpoint whose shared-expert gates are all zero
(moeforge's own exports) opens ungated with the shared ``down_proj`` halved back; any non-zero
gate (Qwen1.5-MoE, Qwen2-MoE as released) opens with ``shared_expert_gate`` on and every tensor
as stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..convert.streaming import PlanEntry
from ..errors import MoeforgeError
from ..models.build import model_from_state
from ..models.configuration_moeforge import MoeforgeConfig
from ..models.modeling_moeforge import MoeforgeForCausalLM
from .export import DenseLayerWeights, Exporter, ExportSpec, MoELayerWeights, config_to_dict, llama_fields, moeforge_aux_loss_coef
from .export import checked_moeforge_config, parse_hf_config
from .registry import EXPORTERS, register_importer

GATE = "model.layers.{i}.mlp.gate.weight"
EXPERT = "model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
SHARED = "model.layers.{i}.mlp.shared_expert.{p}_proj.weight"
SHARED_GATE = "model.layers.{i}.mlp.shared_expert_gate.weight"
DENSE = "model.layers.{i}.mlp.{p}_proj.weight"
STACKED_GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"
STACKED_DOWN = "model.layers.{i}.mlp.experts.down_proj"

MF_ROUTER = "model.layers.{i}.mlp.router.weight"
MF_GATE_UP = "model.layers.{i}.mlp.experts.gate_up_proj"
MF_DOWN = "model.layers.{i}.mlp.experts.down_proj"
MF_SHARED = "model.layers.{i}.mlp.shared_experts.{p}_proj.weight"
MF_SHARED_GATE = "model.layers.{i}.mlp.shared_expert_gate.weight"


class Qwen2MoeExporter(Exporter):
    """moeforge -> Qwen2-MoE (exact with shared experts, dense layers and q/k/v biases)."""

    name = "qwen2_moe"
    fold_scale = True

    def unsupported(self, spec: ExportSpec) -> str | None:
        moe = spec.moe
        if moe.get("router", "topk") != "topk":
            return f"Qwen2-MoE routes with softmax top-k; router {moe['router']!r} differs"
        if spec.o_bias:
            return "Qwen2-MoE has no o_proj bias (the dense model has one)"
        if not moe.get("glu", True) or moe.get("activation", "silu") != "silu":
            return "Qwen2-MoE experts are SwiGLU (silu)"
        unheld = spec.unheld_settings(QWEN2_MOE_HELD)
        if unheld:
            return f"Qwen2-MoE's config has no field for {', '.join(unheld)}, which would be lost"
        if moe.get("shared_expert_gate"):
            return "conversions write ungated shared experts; a gated model is saved with save_pretrained"
        return spec.grouped_mm_problem()

    def attention_biases(self, spec: ExportSpec) -> tuple[bool, bool]:
        return spec.qkv_bias, False

    def ffn_plan(self, spec: ExportSpec, i: int) -> list[PlanEntry]:
        h, dt = spec.hidden, spec.dtype
        if not spec.is_moe(i):
            inter = spec.config.intermediate_size
            return [PlanEntry(DENSE.format(i=i, p=p), s, dt) for p, s in
                    (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter)))]
        e, m, sw = spec.num_experts, spec.expert_size, spec.shared_width
        out = [PlanEntry(GATE.format(i=i), (e, h), dt)]
        for x in range(e):
            out.append(PlanEntry(EXPERT.format(i=i, e=x, p="gate"), (m, h), dt))
            out.append(PlanEntry(EXPERT.format(i=i, e=x, p="up"), (m, h), dt))
            out.append(PlanEntry(EXPERT.format(i=i, e=x, p="down"), (h, m), dt))
        out.append(PlanEntry(SHARED.format(i=i, p="gate"), (sw, h), dt))
        out.append(PlanEntry(SHARED.format(i=i, p="up"), (sw, h), dt))
        out.append(PlanEntry(SHARED.format(i=i, p="down"), (h, sw), dt))
        out.append(PlanEntry(SHARED_GATE.format(i=i), (1, h), dt))
        return out

    def ffn_tensors(self, spec: ExportSpec, i: int, weights) -> list[tuple[str, torch.Tensor]]:
        dt, h = spec.dtype, spec.hidden
        if isinstance(weights, DenseLayerWeights):
            return [(DENSE.format(i=i, p="gate"), weights.gate.to(dt)), (DENSE.format(i=i, p="up"), weights.up.to(dt)),
                    (DENSE.format(i=i, p="down"), weights.down.to(dt))]
        w: MoELayerWeights = weights.folded()
        m = spec.expert_size
        out = [(GATE.format(i=i), w.router.to(dt))]
        for x in range(spec.num_experts):
            out.append((EXPERT.format(i=i, e=x, p="gate"), w.gate_up[x, :m].to(dt)))
            out.append((EXPERT.format(i=i, e=x, p="up"), w.gate_up[x, m:].to(dt)))
            out.append((EXPERT.format(i=i, e=x, p="down"), w.down[x].to(dt)))
        if w.shared_down is not None:
            sg, su, sd = w.shared_gate.to(dt), w.shared_up.to(dt), (w.shared_down.to(dt) * 2)
        else:
            sg, su, sd = torch.zeros(0, h, dtype=dt), torch.zeros(0, h, dtype=dt), torch.zeros(h, 0, dtype=dt)
        out += [(SHARED.format(i=i, p="gate"), sg), (SHARED.format(i=i, p="up"), su), (SHARED.format(i=i, p="down"), sd),
                (SHARED_GATE.format(i=i), torch.zeros(1, h, dtype=dt))]
        return out

    def config_dict(self, spec: ExportSpec, scales: dict[int, float]) -> dict[str, Any]:
        from transformers import Qwen2MoeConfig

        c = spec.config
        fields = llama_fields(c)
        dense_layers = [i for i in range(spec.num_layers) if not spec.is_moe(i)]
        fields.update(
            intermediate_size=c.intermediate_size,
            moe_intermediate_size=spec.expert_size,
            shared_expert_intermediate_size=spec.shared_width,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.moe["top_k"],
            norm_topk_prob=bool(spec.moe.get("normalize_weights", True)),
            decoder_sparse_step=1,
            mlp_only_layers=dense_layers,
            qkv_bias=spec.qkv_bias,
            router_aux_loss_coef=spec.hf_aux_loss_coef(),
        )
        if c.sliding_window:
            fields.update(use_sliding_window=True, sliding_window=c.sliding_window, max_window_layers=spec.num_layers,
                          layer_types=["sliding_attention"] * spec.num_layers)
        return config_to_dict(Qwen2MoeConfig(**fields), spec.dtype, "Qwen2MoeForCausalLM")


#: MoE settings a Qwen2-MoE checkpoint holds (the rest must keep their defaults to export exactly)
QWEN2_MOE_HELD = frozenset({"num_experts", "top_k", "expert_size", "router", "normalize_weights", "aux_loss_coef",
                            "glu", "activation", "num_shared_experts", "shared_expert_size", "shared_expert_gate"})

EXPORTERS["qwen2_moe"] = Qwen2MoeExporter()


# ---------------------------------------------------------------------------------------- import
def moeforge_config_from_qwen2_moe(cfg: dict[str, Any]) -> MoeforgeConfig:
    """Map a Qwen2-MoE ``config.json`` onto :class:`MoeforgeConfig`; refuse what is not exact."""
    from transformers import Qwen2MoeConfig

    if cfg.get("hidden_act", "silu") != "silu":
        raise MoeforgeError(f"Qwen2-MoE checkpoint uses hidden_act={cfg['hidden_act']!r}; only 'silu' is supported.")
    qc = parse_hf_config(Qwen2MoeConfig, cfg, "Qwen2-MoE")
    types = set(qc.layer_types or ["full_attention"])
    if types != {"full_attention"} and types != {"sliding_attention"}:
        raise MoeforgeError("the Qwen2-MoE checkpoint mixes sliding-window and full-attention layers, which moeforge does not represent.")
    fields: dict[str, Any] = {}
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
              "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
              "attention_dropout"):
        if getattr(qc, k, None) is not None:
            fields[k] = getattr(qc, k)
    fields["head_dim"] = getattr(qc, "head_dim", None) or qc.hidden_size // qc.num_attention_heads
    fields["intermediate_size"] = qc.intermediate_size
    fields["attention_bias"] = bool(qc.qkv_bias)
    if types == {"sliding_attention"}:
        fields["sliding_window"] = qc.sliding_window
    n = qc.num_hidden_layers
    step = qc.decoder_sparse_step
    if not isinstance(step, int) or step < 1:
        raise MoeforgeError(
            f"the Qwen2-MoE config.json has decoder_sparse_step={step!r}; it must be a positive integer (every "
            "step-th layer is MoE: 1 for every layer); fix the file."
        )
    moe_layers = [i for i in range(n) if i not in qc.mlp_only_layers and (i + 1) % step == 0]
    shared = qc.shared_expert_intermediate_size
    fields["moe"] = {
        "num_experts": qc.num_experts,
        "top_k": qc.num_experts_per_tok,
        "expert_size": qc.moe_intermediate_size,
        "router": "topk",
        "normalize_weights": bool(qc.norm_topk_prob),
        "num_shared_experts": 1 if shared else 0,
        "shared_expert_size": shared or None,
        "aux_loss_coef": moeforge_aux_loss_coef(qc.router_aux_loss_coef, len(moe_layers)),
    }
    fields["moe_layers"] = None if len(moe_layers) == n else moe_layers
    return checked_moeforge_config(fields, "Qwen2-MoE")


def qwen2_moe_state_to_moeforge(get, keys: set[str], config: MoeforgeConfig) -> dict[str, torch.Tensor]:
    """Translate Qwen2-MoE tensors into moeforge's key space (see the module's key table)."""
    moe = config.moe
    e_count, m, h = moe["num_experts"], moe["expert_size"], config.hidden_size
    sw = moe.get("shared_expert_size") or 0
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in keys:
            raise MoeforgeError(f"Qwen2-MoE checkpoint is missing tensor {key!r}; the checkpoint is incomplete.")
        t = get(key)
        if tuple(t.shape) != shape:
            raise MoeforgeError(f"Qwen2-MoE tensor {key!r} has shape {tuple(t.shape)}, expected {shape}.")
        used.add(key)
        return t

    for i in range(config.num_hidden_layers):
        if not config.is_moe_layer(i):
            for p in ("gate", "up", "down"):
                key = DENSE.format(i=i, p=p)
                shape = (h, config.intermediate_size) if p == "down" else (config.intermediate_size, h)
                out[key] = take(key, shape)
            continue
        out[MF_ROUTER.format(i=i)] = take(GATE.format(i=i), (e_count, h)).float()
        if STACKED_GATE_UP.format(i=i) in keys:
            out[MF_GATE_UP.format(i=i)] = take(STACKED_GATE_UP.format(i=i), (e_count, 2 * m, h))
            out[MF_DOWN.format(i=i)] = take(STACKED_DOWN.format(i=i), (e_count, h, m))
        else:
            first = take(EXPERT.format(i=i, e=0, p="gate"), (m, h))
            gate_up = torch.empty(e_count, 2 * m, h, dtype=first.dtype)
            down = torch.empty(e_count, h, m, dtype=first.dtype)
            for x in range(e_count):
                gate_up[x, :m] = take(EXPERT.format(i=i, e=x, p="gate"), (m, h))
                gate_up[x, m:] = take(EXPERT.format(i=i, e=x, p="up"), (m, h))
                down[x] = take(EXPERT.format(i=i, e=x, p="down"), (h, m))
            out[MF_GATE_UP.format(i=i)] = gate_up
            out[MF_DOWN.format(i=i)] = down
        gate_row = take(SHARED_GATE.format(i=i), (1, h))
        if sw:
            out[MF_SHARED.format(i=i, p="gate")] = take(SHARED.format(i=i, p="gate"), (sw, h))
            out[MF_SHARED.format(i=i, p="up")] = take(SHARED.format(i=i, p="up"), (sw, h))
            down = take(SHARED.format(i=i, p="down"), (h, sw))
            if moe.get("shared_expert_gate"):
                out[MF_SHARED_GATE.format(i=i)] = gate_row
                out[MF_SHARED.format(i=i, p="down")] = down
            else:  # a zero gate is a constant 0.5: fold it into down_proj (exact, a power of two)
                out[MF_SHARED.format(i=i, p="down")] = down * 0.5
        else:
            for p in ("gate", "up", "down"):
                key = SHARED.format(i=i, p=p)
                if key in keys:
                    take(key, (h, 0) if p == "down" else (0, h))
    for key in keys:
        if key in used:
            continue
        if ".mlp." in key:
            raise MoeforgeError(f"unexpected Qwen2-MoE tensor {key!r}; this checkpoint is not a plain Qwen2-MoE model.")
        out[key] = get(key)
    if config.attention_bias:  # LLaMA attention with bias=True also has an o_proj bias; Qwen2's is zero
        for i in range(config.num_hidden_layers):
            key = f"model.layers.{i}.self_attn.o_proj.bias"
            if key not in out:
                out[key] = torch.zeros(h, dtype=out[f"model.layers.{i}.self_attn.o_proj.weight"].dtype)
    return out


@register_importer("qwen2_moe")
def load_qwen2_moe(directory: Path, cfg: dict[str, Any], *, dtype: torch.dtype = torch.float32) -> MoeforgeForCausalLM:
    """Open a Qwen2-MoE checkpoint directory as a :class:`MoeforgeForCausalLM` (moeforge's MoE layer)."""
    from ..convert.streaming import SafetensorsReader
    from ..utils.io import safetensors_files

    config = moeforge_config_from_qwen2_moe(cfg)
    reader = SafetensorsReader(safetensors_files(directory))
    try:
        keys = reader.keys()
        if config.moe.get("shared_expert_size") and any(
            bool(reader.get(SHARED_GATE.format(i=i)).ne(0).any())
            for i in range(config.num_hidden_layers) if config.is_moe_layer(i) and SHARED_GATE.format(i=i) in keys
        ):
            config.moe["shared_expert_gate"] = True
        state = qwen2_moe_state_to_moeforge(reader.get, keys, config)
    finally:
        reader.close()
    return model_from_state(config, state, dtype=dtype)
